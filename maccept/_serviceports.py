# -*- test-case-name: tests.test_serviceports,tests.test_upgrade -*-
"""
The parent's own ports: C{--metrics} (HTTP) and C{--control} (AMP on a
UNIX socket).

They follow the listeners through an upgrade (SIGUSR2): the old parent
hands the sockets to the new one, which adopts them instead of binding
again (the old parent still holds the port, and the control socket's
lock).  The old parent then closes its own copies at once, without
C{shutdown(2)}, which would close them for the new parent too, and
without removing the control socket's path and lock, which become the new
parent's once it takes over (L{maccept._socketpath}).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from twisted.internet.address import UNIXAddress
from twisted.internet.endpoints import UNIXServerEndpoint, serverFromString
from twisted.internet.interfaces import IListeningPort
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory

from maccept._adopting import adoptStream, socketKind
from maccept._descriptions import ListenError, shown, unixPath
from maccept._listening import ParentSocket, listenNow
from maccept._socketpath import SocketPath

if TYPE_CHECKING:
    from maccept._pool import WorkerPool

_log = Logger(namespace="maccept")


@dataclass(kw_only=True)
class ServicePort(ParentSocket):
    """
    One of the parent's own ports.

    @ivar label: the option as given (C{--metrics DESC}, C{--control PATH}),
        which also names the socket in an upgrade's hand-over.
    """

    label: str

    def answer(self) -> None:
        """
        Start answering on a port adopted from an old parent, once this
        parent has taken over (a no-op on one it opened itself).
        """
        self.port.startReading()  # type: ignore[attr-defined]


def wantedPorts(
    options: Mapping[str, Any], pool: WorkerPool, stopFromControl: Callable[[], bool]
) -> list[tuple[str, Any, Any]]:
    """
    What the options ask for: C{(label, endpoint maker, factory)}.
    """
    wanted: list[tuple[str, Any, Any]] = []
    if options["metrics"] is not None:
        from maccept._http import metricsSite

        description = options["metrics"]
        wanted.append(
            (
                f"--metrics {shown(description)}",
                lambda reactor: serverFromString(reactor, description),
                metricsSite(pool),
            )
        )
    if options["control"] is not None:
        from maccept._control import controlFactory

        path = options["control"]
        wanted.append(
            (
                f"--control {shown(path)}",
                lambda reactor: UNIXServerEndpoint(reactor, path, mode=0o600, wantPID=True),
                controlFactory(pool, stopFromControl),
            )
        )
    return wanted


def openServicePorts(
    reactor: Any,
    options: Mapping[str, Any],
    pool: WorkerPool,
    stopFromControl: Callable[[], bool],
    inherited: dict[str, int],
) -> list[ServicePort]:
    """
    Listen on the parent's own ports, or adopt those an old parent handed
    over (taken out of C{inherited}).

    @raise ListenError: naming the option that cannot listen (the ports
        opened so far are closed again).
    """
    ports: list[ServicePort] = []
    for label, makeEndpoint, factory in wantedPorts(options, pool, stopFromControl):
        try:
            if label in inherited:
                # The path and lock stay the old parent's until we take over;
                # the socket is bare: wrap the factory as the endpoint would
                # (TLS for ssl:, else an upgrade would serve plain HTTP).
                wrapped = wrapLikeEndpoint(makeEndpoint(reactor), factory)
                port = adoptServicePort(reactor, inherited.pop(label), wrapped)
                # The old parent answers until this one has taken over
                # (L{ServicePort.answer}): not both, by turns.
                port.stopReading()  # type: ignore[attr-defined]
                path = SocketPath.of(label, port, owned=False)
                servicePort = ServicePort(label=label, port=port, socketPath=path)
            else:
                port = _listenAt(reactor, label, makeEndpoint, factory)
                servicePort = ServicePort(
                    label=label, port=port, socketPath=SocketPath.of(label, port)
                )
        except ListenError as e:
            for opened in ports:
                opened.close()
            raise ListenError(f"{label}: {e}") from None
        ports.append(servicePort)
        _log.info(
            "{option}: listening on {address}", option=label, address=describe(servicePort.port)
        )
    return ports


def _listenAt(reactor: Any, label: str, makeEndpoint: Any, factory: Any) -> IListeningPort:
    """
    Listen for C{label} (C{--metrics DESCRIPTION} or C{--control PATH}),
    naming the UNIX path, if any, for L{listenNow}'s path checks.
    """
    option, _, value = label.partition(" ")
    path = value if option == "--control" else unixPath(value)
    return listenNow(makeEndpoint(reactor), factory, path)


def wrapLikeEndpoint(endpoint: Any, factory: Any) -> Any:
    """
    What C{endpoint.listen} does to C{factory} besides listening: the
    wrapper of a wrapping endpoint (C{haproxy:}), TLS for C{ssl:}.  (These
    are Twisted's private attributes: no public API adopts with them.)
    """
    wrapper = getattr(endpoint, "_wrapperFactory", None)
    if wrapper is not None:
        return wrapLikeEndpoint(endpoint._wrappedEndpoint, wrapper(factory))
    context = getattr(endpoint, "_sslContextFactory", None)
    if context is not None:
        return TLSMemoryBIOFactory(context, False, factory)
    return factory


def adoptServicePort(reactor: Any, fd: int, factory: Any) -> IListeningPort:
    """
    Serve the socket an old parent handed over at C{fd}, then close C{fd}
    (the port holds its own copy).
    """
    try:
        port = adoptStream(reactor, fd, socketKind(fd)[0], factory)
    except OSError as e:
        raise ListenError(f"cannot adopt the inherited socket: {e.strerror}") from None
    finally:
        os.close(fd)
    return port


def describe(port: IListeningPort) -> str:
    """
    Where a service port listens, as an operator would type it.
    """
    address = port.getHost()
    if isinstance(address, UNIXAddress):
        return str(address.name.decode() if isinstance(address.name, bytes) else address.name)
    host: str = address.host  # type: ignore[attr-defined]
    scheme = "https" if _servesTLS(getattr(port, "factory", None)) else "http"
    return f"{scheme}://{f'[{host}]' if ':' in host else host}:{address.port}/"  # type: ignore[attr-defined]


def _servesTLS(factory: Any) -> bool:
    while factory is not None:
        if isinstance(factory, TLSMemoryBIOFactory):
            return True
        factory = getattr(factory, "wrappedFactory", None)
    return False
