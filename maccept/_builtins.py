# -*- test-case-name: tests.test_plugins,tests.test_protocols -*-
"""
The protocols maccept ships as plugins: echo (RFC 862, the default, over TCP
and UDP), discard (RFC 863), chargen (RFC 864), daytime (RFC 867) and a static
web site.
"""

from __future__ import annotations

import os
import time
from typing import Any

from twisted.internet.error import MessageLengthError
from twisted.internet.interfaces import IHalfCloseableProtocol, IProtocolFactory, IPullProducer
from twisted.internet.protocol import DatagramProtocol, Factory, Protocol
from twisted.logger import Logger
from twisted.protocols import wire
from twisted.python import usage
from zope.interface import implementer

from maccept._connections import queuedBytes
from maccept._tally import Tally


def hasPendingOutput(transport: object) -> bool:
    """
    Whether C{transport} still holds bytes it has not handed to the kernel;
    C{True} where it cannot tell (a wrapper's), C{False} with no transport.
    """
    return transport is not None and queuedBytes(transport) != 0


class Echo(Protocol):
    """
    RFC 862 echo with backpressure.

    The transport is registered as its own producer: when the client stops
    reading and the write buffer fills, the transport pauses reading from
    the client, so a client that only sends cannot grow the worker's memory.
    When the client half-closes, everything already received is still sent
    back before the connection closes.

    Half-close costs a reactor turn per connection (the close waits for a
    writable event), so Echo takes it only when it matters: Twisted asks
    for L{IHalfCloseableProtocol} when the client's FIN arrives, and
    C{__conform__} answers yes only while echoed bytes are still queued.
    Otherwise the connection closes at once, as a plain protocol's would.
    """

    def __conform__(self, interface: object) -> object:
        if interface is IHalfCloseableProtocol and hasPendingOutput(self.transport):
            return self
        return None

    def connectionMade(self) -> None:
        self.transport.registerProducer(self.transport, True)  # type: ignore[union-attr]

    def dataReceived(self, data: bytes) -> None:
        self.transport.write(data)  # type: ignore[union-attr]

    def readConnectionLost(self) -> None:
        self.transport.loseConnection()  # type: ignore[union-attr]

    def writeConnectionLost(self) -> None:
        self.transport.loseConnection()  # type: ignore[union-attr]


#: Source ports whose datagrams are not echoed: those of the services that
#: answer every datagram (echo, daytime, quote of the day, chargen, time).
#: A datagram forged to come from one of them (or from this very port: an
#: echo server of the same port elsewhere, or this socket itself) would
#: set two echoes answering each other for ever.
LOOPING_PORTS = frozenset({7, 13, 17, 19, 37})


class DatagramEcho(DatagramProtocol):
    """
    RFC 862 echo over UDP: each datagram goes back to where it came from.
    C{counts} (the worker's connection tracker) adds up the bytes.

    A datagram that cannot be answered (a forged source such as port 0, a
    reply too large for the path) is dropped, and the drops are logged at
    most every 10 s with how many there were (L{Tally}): anyone can forge
    datagrams, and a traceback each would flood the log.  So is one whose
    answer would be answered again without end (L{LOOPING_PORTS}), as
    inetd refuses them.
    """

    log = Logger()

    def __init__(self, counts: Any = None, echoPorts: set[int] | None = None) -> None:
        self.counts = counts
        #: The ports of the worker's UDP echoes, this one's among them (from
        #: L{startProtocol}): two of them would answer each other too.
        self.echoPorts = echoPorts if echoPorts is not None else set()
        self.unanswered = Tally(
            self.log,
            "dropped {count} datagram(s) that could not be answered, the last from {addr}: {error}",
        )
        self.looping = Tally(
            self.log,
            "dropped {count} datagram(s) from a port that would answer the echo back"
            " (a loop a forged source sets up), the last from {addr}",
        )

    def startProtocol(self) -> None:
        # Once, not per datagram: getHost() is a getsockname() call.
        self.echoPorts.add(self.transport.getHost().port)  # type: ignore[union-attr]

    def datagramReceived(self, datagram: bytes, addr: Any) -> None:
        if self.counts is not None:
            self.counts.bytesReceived += len(datagram)
        if addr[1] in LOOPING_PORTS or addr[1] in self.echoPorts:
            self.looping.add(addr=addr)
            return
        try:
            self.transport.write(datagram, addr)  # type: ignore[union-attr]
        except (OSError, MessageLengthError) as e:
            self.unanswered.add(addr=addr, error=e)
            return
        if self.counts is not None:
            self.counts.bytesSent += len(datagram)


def echoFactory() -> IProtocolFactory:
    """
    The default protocol: RFC 862 echo.
    """
    return Factory.forProtocol(Echo)


def echoPlugin(options: object) -> IProtocolFactory:
    """
    The echo plugin's factory (it has no options).
    """
    return echoFactory()


def discardFactory(options: usage.Options) -> IProtocolFactory:
    return Factory.forProtocol(wire.Discard)


class Daytime(Protocol):
    """
    RFC 867: one line with the date and time (UTC), then close.
    (Twisted's C{wire.Daytime} adds bytes to a str and fails on Python 3.)
    """

    def connectionMade(self) -> None:
        now = time.strftime("%A, %B %d, %Y %H:%M:%S-UTC", time.gmtime())
        self.transport.write(now.encode("ascii") + b"\r\n")  # type: ignore[union-attr]
        self.transport.loseConnection()  # type: ignore[union-attr]


def daytimeFactory(options: usage.Options) -> IProtocolFactory:
    return Factory.forProtocol(Daytime)


#: RFC 864's rotating pattern: 72 of the 95 printable characters per line,
#: starting one character later on each line.
_PRINTABLE = bytes(range(32, 127))
_LINES = b"".join(
    (_PRINTABLE * 2)[start : start + 72] + b"\r\n" for start in range(len(_PRINTABLE))
)


@implementer(IPullProducer)
class Chargen(Protocol):
    """
    RFC 864: an endless stream of text, written only as fast as the client
    reads (a pull producer: the transport asks for the next chunk when the
    last one has gone).
    """

    chunk = _LINES * 9  # about 70 KiB: a whole cycle of lines, nine times

    def connectionMade(self) -> None:
        self.transport.registerProducer(self, False)  # type: ignore[union-attr]

    def resumeProducing(self) -> None:
        self.transport.write(self.chunk)  # type: ignore[union-attr]

    def stopProducing(self) -> None:
        pass


def chargenFactory(options: usage.Options) -> IProtocolFactory:
    return Factory.forProtocol(Chargen)


class WebOptions(usage.Options):
    optParameters = [["path", None, None, "The directory to serve."]]

    def postOptions(self) -> None:
        path = self["path"]
        if path is None:
            raise usage.UsageError("path: missing (use --protocol-option path=DIR)")
        if not os.path.isdir(path):
            raise usage.UsageError(f"path: no such directory: {path}")
        self["path"] = os.path.abspath(path)


def webFactory(options: usage.Options) -> Any:
    from twisted.web.resource import NoResource
    from twisted.web.server import Site
    from twisted.web.static import File

    class Files(File):
        """
        Twisted's L{File}, answering 404 to a path segment with a NUL byte
        (C{GET /%00}), on which C{stat} raises: a 500 and a traceback per
        request otherwise.
        """

        def getChild(self, path: bytes, request: Any) -> Any:
            if b"\0" in path:
                return NoResource()
            return super().getChild(path, request)

    from maccept._httpchannel import SmallRequestsChannel

    site = Site(Files(options["path"]))
    site.noisy = False
    # Static files take no request body: one would be spooled to disk.
    site.protocol = SmallRequestsChannel  # type: ignore[assignment]
    return site
