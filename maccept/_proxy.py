# -*- test-case-name: tests.test_proxy -*-
"""
The PROXY protocol (v1 and v2) on C{--listen haproxy:...}: Twisted's
HAProxy parsers and wrapper, plus what a pre-fork server needs of them: the
protocol is connected only once the header says who the client is; a
malformed header drops that connection, logged and counted, never the
worker; and a client's half-close still reaches the protocol.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.interfaces import IHalfCloseableProtocol, IProtocolFactory
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger
from twisted.protocols.haproxy._exceptions import InvalidProxyHeader
from twisted.protocols.haproxy._v1parser import V1Parser
from twisted.protocols.haproxy._v2parser import V2Parser
from twisted.protocols.haproxy._wrapper import HAProxyProtocolWrapper, HAProxyWrappingFactory
from twisted.python.failure import Failure
from zope.interface import directlyProvides, providedBy

#: The prefix of a C{--listen} description that asks for the PROXY protocol.
PREFIX = "haproxy:"


class _ProxyProtocolWrapper(HAProxyProtocolWrapper):
    """
    Unlike Twisted's wrapper, connects the wrapped protocol only once the
    header is read, so that C{getPeer()} in its C{connectionMade} is
    already the original client; a connection dropped before that never
    reaches the protocol at all.
    """

    factory: ProxyWrappingFactory
    _innerConnected = False

    def makeConnection(self, transport: Any) -> None:
        directlyProvides(self, providedBy(transport))
        Protocol.makeConnection(self, transport)
        self.factory.registerProtocol(self)

    def dataReceived(self, data: bytes) -> None:
        if self._proxyInfo is not None:
            self.wrappedProtocol.dataReceived(data)
            return
        if self._parser is None:
            if len(data) >= 16 and data[:12] == V2Parser.PREFIX and data[12] & 0xF0 == 0x20:
                self._parser = V2Parser()
            elif len(data) >= 8 and data[:5] == V1Parser.PROXYSTR:
                self._parser = V1Parser()
            else:
                self._reject()
                return
        try:
            self._proxyInfo, remaining = self._parser.feed(data)
        except InvalidProxyHeader:
            self._reject()
            return
        if self._proxyInfo is not None:
            self._innerConnected = True
            self.wrappedProtocol.makeConnection(self)  # type: ignore[arg-type]
            if remaining and self.connected:
                self.wrappedProtocol.dataReceived(remaining)

    def _reject(self) -> None:
        self.factory.rejected(self)
        self.transport.abortConnection()  # type: ignore[union-attr]

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self._innerConnected:
            super().connectionLost(reason)
        else:
            self.factory.unregisterProtocol(self)

    # Half-close, which Twisted's ProtocolWrapper does not pass on.

    def __conform__(self, interface: object) -> object:
        if interface is IHalfCloseableProtocol and self._halfCloseable() is not None:
            return self
        return None

    def _halfCloseable(self) -> Any:
        return IHalfCloseableProtocol(self.wrappedProtocol, None)

    def readConnectionLost(self) -> None:
        inner = self._halfCloseable()
        if inner is not None:
            inner.readConnectionLost()

    def writeConnectionLost(self) -> None:
        inner = self._halfCloseable()
        if inner is not None:
            inner.writeConnectionLost()


class ProxyWrappingFactory(HAProxyWrappingFactory):
    """
    Reads the PROXY header before the wrapped factory's protocol sees a
    byte; C{onRejected} is called for each connection dropped for a
    malformed header.
    """

    protocol = _ProxyProtocolWrapper  # type: ignore[assignment]
    log = Logger()

    def __init__(self, wrappedFactory: IProtocolFactory, onRejected: Callable[[], None]) -> None:
        super().__init__(wrappedFactory)
        self.onRejected = onRejected

    def rejected(self, wrapper: HAProxyProtocolWrapper) -> None:
        self.log.warn(
            "dropped a connection from {peer}: malformed PROXY protocol header",
            peer=wrapper.transport.getPeer() if wrapper.transport else None,
        )
        self.onRejected()


def splitProxy(description: str) -> tuple[bool, str]:
    """
    C{(True, inner)} for C{haproxy:INNER}, else C{(False, description)}.
    """
    if description.lower().startswith(PREFIX):
        return True, description[len(PREFIX) :]
    return False, description
