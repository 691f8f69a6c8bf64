# -*- test-case-name: tests.test_listening,tests.test_serviceports -*-
"""
Listening sockets, the parent's side: made from endpoint descriptions
(L{maccept._descriptions} checks them first), or taken over from systemd or
from an old parent (USR2).

The parent lets Twisted's own endpoint parsers create each socket (so every
description Twisted knows parses the way Twisted users expect), then stops
reading from it at once: the parent never accepts a connection.  Workers
adopt the same descriptor (L{maccept._adopting}).
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.endpoints import serverFromString
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import (
    IAddress,
    IListeningPort,
    IProtocolFactory,
    IStreamServerEndpoint,
)
from twisted.internet.protocol import DatagramProtocol, Factory
from twisted.python.failure import Failure

from maccept._adopting import adoptStream, release, socketKind
from maccept._descriptions import (
    DATAGRAM_TYPES,
    ListenError,
    checkDescription,
    endpointType,
    parseUDP,
    socketFacts,
    splitProxy,
    unixPath,
)
from maccept._socketpath import SocketPath, dropOwnLock, pathProblem
from maccept._wire import ListenerHandle

#: The listen backlog when a description names none (the kernel caps it at
#: net.core.somaxconn).
DEFAULT_BACKLOG = 1024


class _NeverAccepts(Factory):
    """
    The factory the parent listens with.  The parent stops reading its
    ports before the reactor runs, so this refuses anything that slips by.
    """

    noisy = False

    def buildProtocol(self, addr: Any) -> None:
        return None


@dataclass(kw_only=True)
class ParentSocket:
    """
    A socket the parent owns: a listener it hands to the workers, or one of
    its own ports (L{maccept._serviceports}).

    @ivar socketPath: a UNIX socket's path and lock, which the owning
        parent removes.
    """

    port: IListeningPort
    socketPath: SocketPath | None = None

    def fileno(self) -> int:
        return self.port.fileno()  # type: ignore[attr-defined,no-any-return]

    def close(self, handedOver: bool = False) -> None:
        """
        Close the parent's copy of the socket, and for a UNIX socket remove
        its path and lock, which only the parent may do: the one that owns
        them (see L{SocketPath}), and not when C{handedOver} (to a new
        parent, on an upgrade).

        Not C{stopListening}: on a TCP port Twisted created, that calls
        C{shutdown(2)}, which would stop every worker's accept on the shared
        socket and reset the connections waiting in its backlog, or close a
        handed-over socket for the new parent too.  Closed this way, the
        socket lives until the last process holding a copy closes it.
        """
        release(self.port)
        if self.socketPath is not None and not handedOver:
            self.socketPath.remove()


@dataclass(kw_only=True)
class ListeningSocket(ParentSocket):
    """
    A socket the parent listens on and hands to every worker.
    """

    description: str
    family: str
    #: C{stream} or C{datagram}.
    kind: str = "stream"

    @property
    def address(self) -> str:
        """
        Where clients reach this socket (L{addressText}).
        """
        return addressText(self.port.getHost())

    def handleAt(self, fd: int) -> ListenerHandle:
        """
        Describe this socket to a worker that finds it at descriptor C{fd}.
        """
        return ListenerHandle(
            fd=fd, family=self.family, description=self.description, kind=self.kind
        )


def addressText(address: IAddress) -> str:
    """
    Where a socket listens, as an operator would type it: C{HOST:PORT},
    C{[HOST]:PORT} for IPv6, or the path of a UNIX socket.
    """
    if isinstance(address, IPv6Address):
        return f"[{address.host}]:{address.port}"
    if isinstance(address, IPv4Address):
        return f"{address.host}:{address.port}"
    return os.fsdecode(address.name)  # type: ignore[attr-defined]


def listen(reactor: Any, description: str) -> ListeningSocket:
    """
    Create the listening socket for C{description}; accept nothing on it.

    @raise ListenError: if the description is bad or the socket cannot be
        bound (address in use, permission denied, missing directory).
    """
    checkDescription(description)
    if endpointType(description) in DATAGRAM_TYPES:
        return _listenUDP(reactor, description)
    # haproxy:INNER: the parent makes INNER's socket; workers add the PROXY
    # protocol when they adopt it (they read the prefix from the description).
    _, inner = splitProxy(description)
    fromSystemd = endpointType(inner) == "systemd"
    endpoint = serverFromString(reactor, inner)
    if fromSystemd:
        _checkSystemdSocket(endpoint)
    port = listenNow(endpoint, _NeverAccepts(), unixPath(inner))
    port.stopReading()  # type: ignore[attr-defined]
    if "backlog=" not in inner and not fromSystemd:
        # Twisted's default backlog (50) overflows under a burst of
        # connections; an overflowing SYN waits a second to be retried.
        port.socket.listen(DEFAULT_BACKLOG)  # type: ignore[attr-defined]
    family = socket.AddressFamily(port.socket.family).name  # type: ignore[attr-defined]
    # A systemd socket's path belongs to systemd.
    owned = None if fromSystemd else SocketPath.of(f"--listen {description}", port)
    return ListeningSocket(description=description, port=port, family=family, socketPath=owned)


def _checkSystemdSocket(endpoint: Any) -> None:
    """
    Refuse a descriptor from systemd that is not what C{systemd:} adopts:
    a listening stream socket of the family C{domain=} names.  (A datagram
    socket, from C{ListenDatagram=}, would be adopted as a stream port, and
    every worker would spin on a failing C{accept}.)

    @raise ListenError: naming what systemd passed instead.
    """
    fileno, family = getattr(endpoint, "fileno", None), getattr(endpoint, "addressFamily", None)
    if not isinstance(fileno, int):
        return
    try:
        kind, domain, accepting = socketFacts(fileno)
    except OSError as e:
        raise ListenError(f"systemd's descriptor {fileno} is not a socket ({e.strerror})") from None
    if kind != socket.SOCK_STREAM:
        raise ListenError(
            "systemd passed a datagram socket; systemd: needs a stream socket (ListenStream=)"
        )
    if not accepting:
        raise ListenError("systemd passed a socket that is not listening")
    if family is not None and domain != family:
        names = {
            int(socket.AF_INET): "INET",
            int(socket.AF_INET6): "INET6",
            int(socket.AF_UNIX): "UNIX",
        }
        raise ListenError(
            f"systemd passed an {names.get(domain, str(domain))} socket, not the "
            f"domain={names.get(family, str(family))} of the description"
        )


def _listenUDP(reactor: Any, description: str) -> ListeningSocket:
    portNumber, interface = parseUDP(description)
    try:
        port = reactor.listenUDP(portNumber, DatagramProtocol(), interface=interface)
    except CannotListenError as e:
        raise ListenError(_listenProblem(e)) from None
    port.stopReading()
    family = socket.AddressFamily(port.socket.family).name
    return ListeningSocket(description=description, port=port, family=family, kind="datagram")


def adoptListener(reactor: Any, description: str, fd: int) -> ListeningSocket:
    """
    In a new parent after an upgrade: take over the socket the old parent
    made for C{description}, inherited at C{fd}, instead of making one.
    """
    port, family, datagram = adoptHandedOver(
        reactor,
        fd,
        _NeverAccepts(),
        # Only a hand-over's variable names it: set by hand, or stale.
        lambda e: (
            f"the descriptor {fd} handed over from an old parent is not a socket to listen on"
            f" ({e.strerror or e}): unset MACCEPT_INHERIT"
        ),
    )
    # Its path and lock are the old parent's until this one takes over.
    fromSystemd = endpointType(splitProxy(description)[1]) == "systemd"
    path = None if fromSystemd else SocketPath.of(f"--listen {description}", port, owned=False)
    return ListeningSocket(
        description=description,
        port=port,
        family=socket.AddressFamily(family).name,
        kind="datagram" if datagram else "stream",
        socketPath=path,
    )


def adoptHandedOver(
    reactor: Any, fd: int, factory: IProtocolFactory, problem: Callable[[OSError], str]
) -> tuple[IListeningPort, int, bool]:
    """
    In a new parent: adopt the socket an old parent handed over at C{fd},
    not reading from it yet, then close C{fd} (the port holds its own copy).
    A stream socket accepts with C{factory}.

    @return: the port, its address family, and whether it is a datagram
        socket.
    @raise ListenError: C{problem(e)}, if C{fd} is not a socket to adopt.
    """
    try:
        family, datagram = socketKind(fd)
        if datagram:
            port = reactor.adoptDatagramPort(fd, family, DatagramProtocol())
        else:
            port = adoptStream(reactor, fd, family, factory)
        port.stopReading()
    except OSError as e:
        raise ListenError(problem(e)) from None
    finally:
        with contextlib.suppress(OSError):
            os.close(fd)
    return port, family, datagram


def listenNow(
    endpoint: IStreamServerEndpoint, factory: IProtocolFactory, path: str | None = None
) -> IListeningPort:
    """
    Listen on C{endpoint} before the reactor runs, so that a failure is
    known at once.  For a UNIX socket at C{path}, a path that cannot be a
    socket is refused before Twisted locks it, and the lock a failed listen
    took is removed.

    @raise ListenError: naming why it cannot listen.
    """
    problem = pathProblem(path) if path is not None else None
    if problem is not None:
        raise ListenError(problem)
    result: list[object] = []
    endpoint.listen(factory).addBoth(result.append)
    if not result:
        raise ListenError("the endpoint did not listen at once")
    outcome = result[0]
    if isinstance(outcome, Failure):
        if path is not None:
            dropOwnLock(path)
            holder = _lockHolder(path, outcome.value)
            if holder is not None:
                raise ListenError(
                    f"cannot listen: another process (pid {holder}) holds {path} "
                    f"(its lock, {path}.lock, names it)"
                ) from None
        raise ListenError(_listenProblem(outcome.value or Exception())) from None
    port: IListeningPort = outcome  # type: ignore[assignment]
    return port


def _lockHolder(path: str, error: BaseException | None) -> str | None:
    """
    The pid in C{PATH.lock} when Twisted could not take that lock: a
    live process listens at C{path} (Twisted takes over a dead one's).
    """
    if not isinstance(error, CannotListenError) or error.socketError != "Cannot acquire lock":
        return None
    try:
        return os.readlink(path + ".lock")
    except OSError:
        return None


def _listenProblem(error: BaseException) -> str:
    if isinstance(error, CannotListenError):
        error = error.socketError
    if isinstance(error, OSError) and error.strerror:
        # Its file names, if any: the lock's symlink names the pid first.
        named = error.filename2 or error.filename
        where = f": {os.fsdecode(named)}" if isinstance(named, (str, bytes)) else ""
        return f"cannot listen: {error.strerror.lower()}{where}"
    return f"cannot listen: {error}"
