# -*- test-case-name: tests.test_listening,tests.test_serving,tests.test_tls,tests.test_upgrade -*-
"""
The worker's side of the listening sockets: adopting the parent's
descriptors as ports that accept, wrapped as their descriptions ask
(L{wrapLikeEndpoint}, which a new parent's own ports adopted from an old
one use too), and letting go of them when it drains.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from typing import Any

from twisted.internet import tcp, unix
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IListeningPort, IProtocolFactory
from twisted.internet.posixbase import PosixReactorBase
from twisted.logger import Logger
from twisted.python.failure import Failure

from maccept._descriptions import endpointType, socketFacts, splitProxy
from maccept._wire import ListenerHandle

_log = Logger()


def adopt(
    reactor: Any,
    handle: ListenerHandle,
    factory: IProtocolFactory,
    onProxyRejected: Callable[[], None] = lambda: None,
    onHandshakeFailed: Callable[[], None] = lambda: None,
) -> IListeningPort:
    """
    Adopt the parent's socket in a worker and start accepting on it,
    re-applying the wrapping its description asks for: TLS for C{ssl:}
    (the worker loads the certificate itself; the parent checked it at
    start-up), and outside that the PROXY protocol for C{haproxy:}, whose
    header comes before the TLS handshake.
    """
    proxied, inner = splitProxy(handle.description)
    if endpointType(inner) == "ssl":
        from maccept._tls import HandshakeCountingFactory

        def countedTLS(contextFactory: Any, wrapped: IProtocolFactory) -> IProtocolFactory:
            # Load the files now: one changed since the parent checked them
            # (before a HUP) fails this worker's start, not every handshake.
            contextFactory.getContext()
            return HandshakeCountingFactory(contextFactory, wrapped, onHandshakeFailed)

        factory = wrapLikeEndpoint(serverFromString(reactor, inner), factory, countedTLS)
    if proxied:
        from maccept._proxy import ProxyWrappingFactory

        factory = ProxyWrappingFactory(factory, onProxyRejected, clock=reactor)
    return adoptStream(reactor, handle.fd, handle.addressFamily, factory)


def wrapLikeEndpoint(
    endpoint: Any,
    factory: IProtocolFactory,
    withTLS: Callable[[Any, IProtocolFactory], IProtocolFactory] | None = None,
) -> IProtocolFactory:
    """
    What C{endpoint.listen} does to C{factory} besides listening, for a
    socket adopted instead: the wrapper of a wrapping endpoint (Twisted's
    C{haproxy:}), and TLS for C{ssl:}: C{withTLS(contextFactory, factory)},
    by default Twisted's L{TLSMemoryBIOFactory}.  (These are Twisted's
    private attributes: no public API adopts with them.)
    """
    wrapper = getattr(endpoint, "_wrapperFactory", None)
    if wrapper is not None:
        return wrapLikeEndpoint(endpoint._wrappedEndpoint, wrapper(factory), withTLS)
    context = getattr(endpoint, "_sslContextFactory", None)
    if context is None:
        return factory
    if withTLS is None:
        from twisted.protocols.tls import TLSMemoryBIOFactory

        return TLSMemoryBIOFactory(context, False, factory)
    return withTLS(context, factory)


def socketKind(fd: int) -> tuple[int, bool]:
    """
    The address family of the socket at C{fd}, and whether it is a
    datagram socket.
    """
    kind, family, _ = socketFacts(fd)
    return family, kind == socket.SOCK_DGRAM


def adoptStream(reactor: Any, fd: int, family: int, factory: IProtocolFactory) -> IListeningPort:
    """
    C{reactor.adoptStreamPort}, except that a UNIX socket is adopted as
    L{AdoptedUNIXPort}, left as its maker made it.
    """
    if family == socket.AF_UNIX and isinstance(reactor, PosixReactorBase):
        unixPort: AdoptedUNIXPort = AdoptedUNIXPort._fromListeningDescriptor(reactor, fd, factory)
        unixPort.startListening()
        return unixPort
    port: IListeningPort = reactor.adoptStreamPort(fd, family, factory)
    return port


class AdoptedUNIXPort(unix.Port):
    """
    A UNIX port adopted from the parent, left as the parent made it (for
    the reactors built on Twisted's posix base, whose C{adoptStreamPort}
    makes a L{unix.Port}).

    Twisted's C{startListening} on an adopted UNIX socket chmods the path to
    its default 0666 and calls C{listen} again with its default backlog of
    50: that widens a C{mode=} the user asked for, shrinks the backlog the
    parent set, and fails with EPERM in a worker that runs as another user
    than the one that made the path (C{twistd --uid}).
    """

    #: Closing the port must not shut down the socket every process shares.
    _shouldShutdown = False

    def connectionLost(self, reason: Failure) -> None:
        # Not unix.Port's, which unlinks the parent's path: a worker whose
        # reactor stops while it still accepts closes its own copy only.
        tcp.Port.connectionLost(self, reason)

    def startListening(self) -> None:
        factory: Any = self.factory
        adopted: Any = self._preexistingSocket
        _log.info(
            "{factory} starting on {path!r}",
            factory=self._getLogPrefix(factory),
            path=os.fsdecode(self._bindPath),
        )
        tcp._reservedFD.reserve()  # what the accept loop closes on EMFILE
        factory.doStart()
        self._preexistingSocket = None
        self.socket = adopted
        self.fileno = adopted.fileno  # type: ignore[method-assign]
        self.connected = True
        self.numberAccepts = 100
        self.startReading()


def release(port: IListeningPort) -> None:
    """
    Stop accepting on an adopted port without disturbing the siblings.

    C{stopListening} on an adopted UNIX port would unlink the socket path for
    every process; on an adopted TCP port it closes without C{shutdown(2)}.
    Closing the worker's own descriptor is all that is wanted in both cases.
    """
    port.stopReading()  # type: ignore[attr-defined]
    port.socket.close()  # type: ignore[attr-defined]
