# -*- test-case-name: tests.test_proxy -*-
"""
The PROXY protocol (v1 and v2) on C{--listen haproxy:...}: Twisted's
HAProxy parsers and wrapper, plus what a pre-fork server needs of them: the
protocol is connected only once the header says who the client is; a
malformed header drops that connection, logged and counted, never the
worker; and a client's half-close still reaches the protocol.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from collections.abc import Callable
from typing import Any

from twisted.internet.address import IPv6Address
from twisted.internet.interfaces import IHalfCloseableProtocol, IProtocolFactory, IReactorTime
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger
from twisted.protocols.haproxy._exceptions import InvalidProxyHeader
from twisted.protocols.haproxy._info import ProxyInfo
from twisted.protocols.haproxy._v1parser import V1Parser
from twisted.protocols.haproxy._v2parser import V2Parser
from twisted.protocols.haproxy._wrapper import HAProxyProtocolWrapper, HAProxyWrappingFactory
from twisted.python.failure import Failure
from zope.interface import directlyProvides, providedBy

from maccept._protocols import PassesRefusals
from maccept._tally import Tally

#: Seconds a client may take to send its whole PROXY header: a proxy sends
#: it at once, so a connection that has not is dropped (and counted) even
#: without C{--idle-timeout}.
HEADER_TIMEOUT = 10.0
_PORT = re.compile(rb"^[0-9]{1,5}$")
_V2_SIGNATURE = V2Parser.PREFIX
_V1_SIGNATURE = V1Parser.PROXYSTR + b" "


def _shortIPv6(info: ProxyInfo) -> ProxyInfo:
    """
    C{info} with its IPv6 addresses written as sockets write them (C{::1},
    C{::ffff:192.0.2.1}), as a v1 header gives them: Twisted's v2 parser
    writes out all eight groups (C{0:0:0:0:0:0:0:1}), so one client had two
    spellings.
    """

    def short(address: Any) -> Any:
        if isinstance(address, IPv6Address):
            host = socket.inet_ntop(
                socket.AF_INET6, socket.inet_pton(socket.AF_INET6, address.host)
            )
            return IPv6Address(address.type, host, address.port)
        return address

    return ProxyInfo(info.header, short(info.source), short(info.destination))


def headerKind(start: bytes) -> type[V1Parser] | type[V2Parser] | bool | None:
    """
    Which parser the first bytes of a connection call for: the parser's
    class; L{None} while they are still the start of either signature (a
    header may arrive in pieces); C{False} if they are neither.
    """
    if start.startswith(_V2_SIGNATURE):
        if len(start) > len(_V2_SIGNATURE) and start[len(_V2_SIGNATURE)] & 0xF0 != 0x20:
            return False
        if (
            len(start) > len(_V2_SIGNATURE) + 1
            and start[len(_V2_SIGNATURE)] & 0x0F == 0x1
            and start[len(_V2_SIGNATURE) + 1] & 0x0F == 0x2
        ):
            # PROXY with a datagram's addresses (UDP, or a UNIX datagram
            # socket), on a stream.  LOCAL (a proxy's own health check) is
            # taken whatever its family, as the specification says.
            return False
        # Twisted's v2 parser wants the 16 bytes before the length.
        return V2Parser if len(start) >= 16 else None
    if start.startswith(_V1_SIGNATURE):
        return _V1Parser
    if _V2_SIGNATURE.startswith(start) or _V1_SIGNATURE.startswith(start):
        return None
    return False


class _V1Parser(V1Parser):
    """
    Twisted's v1 parser, plus the bare C{PROXY UNKNOWN} line the
    specification allows (HAProxy sends it), and addresses and ports
    checked (an IPv6 address with no scope), and no field more than the
    six: Twisted takes
    C{PROXY TCP4 notanip ::1 99999 +5 extra} as given, and
    raises bare C{ValueError}s for a port that is not a number; and the
    107-byte limit on any line, not only on one without its CRLF yet.
    """

    #: The longest v1 line the specification allows, CRLF included.
    MAX_LINE = 107

    @classmethod
    def parse(cls, line: bytes) -> ProxyInfo:
        if len(line) + 2 > cls.MAX_LINE:
            raise InvalidProxyHeader()
        if line.rstrip(b"\r") == b"PROXY UNKNOWN":
            return ProxyInfo(line, None, None)
        try:
            info = super().parse(line)
            fields = line.split(b" ")
            if fields[1] != cls.UNKNOWN_PROTO:
                if len(fields) != 6:
                    raise ValueError(fields)  # a field more than the six
                version = 4 if fields[1] == cls.TCP4_PROTO else 6
                for host in fields[2:4]:
                    address = ipaddress.ip_address(host.decode("ascii"))
                    # A scope (fe80::1%eth0) names an interface of the
                    # proxy's, which no proxy sends and inet_pton refuses.
                    if address.version != version or getattr(address, "scope_id", None):
                        raise ValueError(host)
                for port in fields[4:6]:
                    if not _PORT.match(port) or int(port) > 65535:
                        raise ValueError(port)
        except (ValueError, UnicodeDecodeError, IndexError) as e:
            raise InvalidProxyHeader() from e
        return info


class _ProxyProtocolWrapper(HAProxyProtocolWrapper):
    """
    Unlike Twisted's wrapper, connects the wrapped protocol only once the
    header is read, so that C{getPeer()} in its C{connectionMade} is
    already the original client; a connection dropped before that never
    reaches the protocol at all.  A header may arrive in pieces, but must
    arrive within L{HEADER_TIMEOUT}.
    """

    factory: ProxyWrappingFactory
    _innerConnected = False
    _start = b""
    _deadline: Any = None
    _conforming = False

    def makeConnection(self, transport: Any) -> None:
        directlyProvides(self, providedBy(transport))
        Protocol.makeConnection(self, transport)
        self.factory.registerProtocol(self)
        self._deadline = self.factory.clock.callLater(self.factory.headerTimeout, self._tooSlow)

    def dataReceived(self, data: bytes) -> None:
        if self._proxyInfo is not None:
            self.wrappedProtocol.dataReceived(data)
            return
        if self._parser is None:
            data, self._start = self._start + data, b""
            kind = headerKind(data)
            if kind is None:
                self._start = data
                return
            if kind is False:
                self._reject("malformed PROXY protocol header")
                return
            self._parser = kind()  # type: ignore[operator]
        try:
            self._proxyInfo, remaining = self._parser.feed(data)
        except InvalidProxyHeader:
            self._reject("malformed PROXY protocol header")
            return
        if self._proxyInfo is not None:
            self._proxyInfo = _shortIPv6(self._proxyInfo)
            self._cancelDeadline()
            self._innerConnected = True
            self.wrappedProtocol.makeConnection(self)  # type: ignore[arg-type]
            if remaining and self.connected:
                self.wrappedProtocol.dataReceived(remaining)

    def _tooSlow(self) -> None:
        self._deadline = None
        transport: Any = self.transport
        if transport is None or transport.disconnecting or getattr(transport, "_aborting", False):
            return  # already on its way out (the idle reaper, a drain)
        self._reject(f"no complete PROXY protocol header within {self.factory.headerTimeout:g} s")

    def _cancelDeadline(self) -> None:
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
        self._deadline = None

    def _reject(self, why: str) -> None:
        self._cancelDeadline()
        self.factory.rejected(self, why)
        self.transport.abortConnection()  # type: ignore[union-attr]

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._cancelDeadline()
        if self._innerConnected:
            super().connectionLost(reason)
        else:
            self.factory.unregisterProtocol(self)

    # Half-close, which Twisted's ProtocolWrapper does not pass on: only to
    # a connected protocol, and without asking twice (a TLS protocol passes
    # the question back to its transport, which is this wrapper).

    def __conform__(self, interface: object) -> object:
        if interface is IHalfCloseableProtocol and self._halfCloseable() is not None:
            return self
        return None

    def _halfCloseable(self) -> Any:
        if not self._innerConnected or self._conforming:
            return None
        self._conforming = True
        try:
            return IHalfCloseableProtocol(self.wrappedProtocol, None)
        finally:
            self._conforming = False

    def readConnectionLost(self) -> None:
        inner = self._halfCloseable()
        if inner is not None:
            inner.readConnectionLost()

    def writeConnectionLost(self) -> None:
        inner = self._halfCloseable()
        if inner is not None:
            inner.writeConnectionLost()


class ProxyWrappingFactory(PassesRefusals, HAProxyWrappingFactory):
    """
    Reads the PROXY header before the wrapped factory's protocol sees a
    byte; C{onRejected} is called for each connection dropped for a
    malformed header, or for one that did not come in time.  The drops are
    logged at most every 10 s, with how many there were (L{Tally}): anyone
    who can connect can send a bad header.
    """

    protocol = _ProxyProtocolWrapper  # type: ignore[assignment]
    log = Logger()

    def __init__(
        self,
        wrappedFactory: IProtocolFactory,
        onRejected: Callable[[], None],
        clock: IReactorTime | None = None,
        headerTimeout: float = HEADER_TIMEOUT,
    ) -> None:
        super().__init__(wrappedFactory)
        self.onRejected = onRejected
        if clock is None:
            from twisted.internet import reactor as clock
        timer: Any = clock
        self.clock = timer
        self.headerTimeout = headerTimeout
        self.drops = Tally(
            self.log,
            "dropped {count} connection(s) for their PROXY protocol header, "
            "the last from {peer}: {why}",
            clock=timer.seconds,
        )

    def rejected(self, wrapper: HAProxyProtocolWrapper, why: str) -> None:
        self.drops.add(peer=wrapper.transport.getPeer() if wrapper.transport else None, why=why)
        self.onRejected()
