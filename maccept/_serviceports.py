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

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from twisted.internet.address import UNIXAddress
from twisted.internet.endpoints import UNIXServerEndpoint, serverFromString
from twisted.internet.interfaces import IListeningPort
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory

from maccept._adopting import wrapLikeEndpoint
from maccept._descriptions import ListenError, shown, unixPath
from maccept._listening import ParentSocket, addressText, adoptHandedOver, listenNow
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
                # Not reading yet: the old parent answers until this one
                # has taken over (L{ServicePort.answer}): not both, by turns.
                port = adoptServicePort(reactor, inherited.pop(label), wrapped)
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


def adoptServicePort(reactor: Any, fd: int, factory: Any) -> IListeningPort:
    """
    Adopt the socket an old parent handed over at C{fd}, not answering yet
    (L{adoptHandedOver}).
    """
    port, _, _ = adoptHandedOver(
        reactor, fd, factory, lambda e: f"cannot adopt the inherited socket: {e.strerror}"
    )
    return port


def describe(port: IListeningPort) -> str:
    """
    Where a service port listens, as an operator would type it: a UNIX
    socket's path, or the URL of an HTTP one.
    """
    address = port.getHost()
    if isinstance(address, UNIXAddress):
        return addressText(address)
    scheme = "https" if _servesTLS(getattr(port, "factory", None)) else "http"
    return f"{scheme}://{addressText(address)}/"


def _servesTLS(factory: Any) -> bool:
    while factory is not None:
        if isinstance(factory, TLSMemoryBIOFactory):
            return True
        factory = getattr(factory, "wrappedFactory", None)
    return False
