# -*- test-case-name: tests.test_listening -*-
"""
Listening sockets: made by the parent from endpoint descriptions, adopted
by every worker.

The parent lets Twisted's own endpoint parsers create each socket (so every
description Twisted knows parses the way Twisted users expect), then stops
reading from it at once: the parent never accepts a connection.  Workers
adopt the same descriptor with C{adoptStreamPort}.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import re
import socket
import stat
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from twisted.internet import tcp, unix
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.endpoints import serverFromString
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IListeningPort, IProtocolFactory, IStreamServerEndpoint
from twisted.internet.posixbase import PosixReactorBase
from twisted.internet.protocol import DatagramProtocol, Factory
from twisted.logger import Logger
from twisted.python.failure import Failure

from maccept._proxy import endpointType, splitProxy
from maccept._socketpath import SocketPath, dropOwnLock, pathProblem
from maccept._wire import ListenerHandle

#: The listen backlog when a description names none (the kernel caps it at
#: net.core.somaxconn).
DEFAULT_BACKLOG = 1024

_log = Logger()

#: Endpoint types whose sockets a worker can adopt as stream ports.
STREAM_TYPES = ("tcp", "tcp6", "unix", "ssl", "systemd")
#: ... and as datagram ports (C{udp:PORT[:interface=ADDR]}; Twisted has no
#: UDP endpoint, so maccept parses these itself).
DATAGRAM_TYPES = ("udp",)


class ListenError(Exception):
    """
    A C{--listen} description cannot be used; the message says why.
    """


def checkDescription(description: str) -> None:
    """
    Check the syntax of a server endpoint description without listening.

    @raise ListenError: naming the problem in one line.
    """
    if any(character in description for character in "\r\n\0"):
        raise ListenError("the description holds a line break or a NUL")
    if (len(description) - len(description.rstrip("\\"))) % 2:
        # Twisted's parser fails on it with "generator raised StopIteration".
        raise ListenError("it ends in a backslash, which escapes nothing")
    proxied, inner = splitProxy(description)
    if proxied:
        if endpointType(inner) in DATAGRAM_TYPES:
            raise ListenError("the PROXY protocol (haproxy:) needs a stream listener, not udp")
        if splitProxy(inner)[0]:
            raise ListenError("haproxy: is given twice (one PROXY header per connection)")
        checkDescription(inner)
        return
    kind = endpointType(description)
    if kind in DATAGRAM_TYPES:
        parseUDP(description)
        return
    if kind in STREAM_TYPES:
        problem = _optionProblem(description)
        if problem is not None:
            raise ListenError(problem)
    if kind == "unix" and not unixPath(description):
        raise ListenError("the socket's path is empty (unix:PATH)")
    try:
        # Parsing only stores the reactor; nothing runs on it.
        serverFromString(None, description)
    except Exception as e:
        if kind == "systemd":
            raise ListenError(_systemdProblem(e)) from None
        if kind == "ssl" and isinstance(e, OSError):
            # The certificate and key are read here, in the parent, at start-up.
            raise ListenError(f"cannot read the certificate or key: {e}") from None
        if "Unknown endpoint type" in str(e):
            typed = description.split(":", 1)[0]
            hint = " (endpoint types are lower case)" if typed != kind else ""
            raise ListenError(f"unknown endpoint type {typed!r}{hint}") from None
        if kind in STREAM_TYPES:
            raise ListenError(_parseProblem(e)) from None
    if kind not in STREAM_TYPES:
        known = ", ".join(STREAM_TYPES + DATAGRAM_TYPES) + ", and haproxy: before a stream type"
        raise ListenError(f"endpoint type {kind!r} is not supported (use one of {known})")


def _fields(description: str) -> list[str]:
    """
    The colon-separated fields after the type, split where a colon is not
    escaped (C{\\:} inside an IPv6 address or a path).
    """
    return re.split(r"(?<!\\):", description)[1:]


#: Options whose value names a file the parent must be able to read.
_FILE_OPTIONS = ("privateKey", "certKey", "extraCertChain", "dhParameters", "caCertsDir")
#: A UNIX socket's C{mode=}: octal, as chmod(1) takes it.
_FILE_MODE = re.compile(r"(0[oO])?0*[0-7]{1,4}")
#: The largest backlog listen(2) takes (an int; the kernel caps it further).
_MAX_BACKLOG = 2**31 - 1


def _optionProblem(description: str) -> str | None:
    """
    What Twisted's parser would take silently or report in its own terms:
    an option given twice, an empty interface (every address), a backlog
    below 1 or too large, a file option naming no readable file.
    """
    seen: set[str] = set()
    fields = _fields(description)
    for index, field in enumerate(fields):
        key, equals, value = field.partition("=")
        if not equals:
            continue
        value = value.replace("\\:", ":")
        if key in seen:
            return f"{key}= is given twice"
        seen.add(key)
        if key == "interface" and not value:
            if any("=" not in later for later in fields[index + 1 :]):
                return "escape the colons of an IPv6 address in interface= (interface=\\:\\:1)"
            return "interface= is empty (leave it out to listen on every address)"
        if key == "backlog" and value.lstrip("-").isdigit():
            backlog = int(value)
            if backlog < 1:
                return f"backlog must be at least 1, got {backlog}"
            if backlog > _MAX_BACKLOG:
                return f"backlog {backlog} is too large (at most {_MAX_BACKLOG})"
        if key == "mode" and not _FILE_MODE.fullmatch(value):
            # Twisted reads it in octal, and reports only "invalid literal".
            return f"mode must be an octal file mode such as 0660, got {value!r}"
        if key in _FILE_OPTIONS and not os.access(value, os.R_OK):
            return f"cannot read {key}={value}"
        problem = _tlsOptionProblem(key, value)
        if problem is not None:
            return problem
        if key == "index" and value.startswith("-"):
            # Python would count it from the end of systemd's descriptors.
            return f"index must be 0 or more, got {value}"
    return None


def _tlsOptionProblem(key: str, value: str) -> str | None:
    """
    What Twisted's C{ssl:} parser leaves for the first handshake to find
    (in a worker, once per connection): Diffie-Hellman parameters OpenSSL
    will not load, and reports an C{sslmethod} as a missing attribute.
    """
    if key not in ("dhParameters", "sslmethod"):
        return None
    from OpenSSL import SSL

    if key == "sslmethod":
        methods = [
            name
            for name in dir(SSL)
            if name.endswith("_METHOD") and "CLIENT" not in name and not name.startswith("DTLS")
        ]
        if value not in methods:
            return f"sslmethod must be one of {', '.join(sorted(methods))}, got {value!r}"
        return None
    try:
        SSL.Context(SSL.TLS_METHOD).load_tmp_dh(value.encode())
    except SSL.Error as e:
        return f"cannot load dhParameters={value}: {_sslReason(e)}"
    return None


_STRAY_OPTION = re.compile(r":([A-Za-z]\w*=.*)$")


def parseUDP(description: str) -> tuple[int, str]:
    """
    C{udp:PORT[:interface=ADDR]} to C{(port, interface)}.

    @raise ListenError: naming the problem in one line.
    """
    # The interface runs to the end: an IPv6 address may keep its colons.
    fields = description.partition(":")[2].split(":", 1)
    try:
        port = int(fields[0])
    except ValueError:
        raise ListenError(f"expected a number, got {fields[0]!r}") from None
    if not 0 <= port <= 65535:
        raise ListenError(f"port {port} is out of range (0-65535)")
    interface = ""
    if len(fields) > 1:
        key, equals, value = fields[1].partition("=")
        if key != "interface" or not equals:
            raise ListenError(f"unknown option {fields[1]!r} (udp takes interface=ADDR)")
        interface = value.replace("\\:", ":")
        # An address holds no '=', so a ':name=' in it starts another option.
        stray = _STRAY_OPTION.search(interface)
        if stray:
            raise ListenError(f"unknown option {stray[1]!r} (udp takes interface=ADDR)")
        try:
            ipaddress.ip_address(interface)
        except ValueError:
            raise ListenError(f"interface {interface!r} is not an IP address") from None
    return port, interface


def _systemdProblem(e: Exception) -> str:
    # Twisted reads systemd's variables when it is imported, and removes
    # LISTEN_FDS and LISTEN_PID if they are for this process.
    passed, forPid = os.environ.get("LISTEN_FDS"), os.environ.get("LISTEN_PID")
    if passed and forPid != str(os.getpid()) and isinstance(e, (IndexError, KeyError)):
        return (
            f"systemd's descriptors are for pid {forPid} (LISTEN_PID), not this process "
            f"({os.getpid()}): a wrapper that forks must exec maccept in its own process"
        )
    names = os.environ.get("LISTEN_FDNAMES")
    if isinstance(e, IndexError) and names:
        # Twisted kept these descriptors (and removed LISTEN_FDS).
        count = len(names.split(":"))
        return f"systemd passed {count} descriptor(s), named {names}: none at that index"
    if isinstance(e, IndexError):
        if not passed and not names and _listeningAt(LISTEN_FDS_START):
            # Twisted takes descriptors only with their names (systemd 227+),
            # and drops the variables of those without.
            return "systemd passed descriptors without names (systemd-socket-activate: --fdname)"
        return (
            "systemd passed no descriptor at that index "
            f"(LISTEN_FDS={passed or 'unset'}; run under socket activation)"
        )
    if isinstance(e, KeyError):
        if not names:
            return f"systemd passed no descriptor named {e}, nor any (run under socket activation)"
        return (
            f"systemd passed no descriptor named {e}, only {names}"
            " (see FileDescriptorName= and LISTEN_FDNAMES)"
        )
    if isinstance(e, AttributeError):
        return "unknown domain (use domain=INET, INET6 or UNIX)"
    return _parseProblem(e)


#: The first descriptor systemd passes (sd_listen_fds(3)).
LISTEN_FDS_START = 3


def _socketFacts(fd: int) -> tuple[int, int, bool]:
    """
    The type, family and whether it listens, of the socket at C{fd}.

    @raise OSError: if C{fd} is not an open socket.
    """
    if not stat.S_ISSOCK(os.fstat(fd).st_mode):
        raise OSError(errno.ENOTSOCK, os.strerror(errno.ENOTSOCK))
    with socket.socket(fileno=os.dup(fd)) as probe:
        return (
            probe.getsockopt(socket.SOL_SOCKET, socket.SO_TYPE),
            probe.getsockopt(socket.SOL_SOCKET, socket.SO_DOMAIN),
            bool(probe.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)),
        )


def _listeningAt(fd: int) -> bool:
    """
    Whether descriptor C{fd} is a listening socket: one systemd passed.
    """
    try:
        return _socketFacts(fd)[2]
    except OSError:
        return False


def _parseProblem(e: Exception) -> str:
    """
    Twisted's parsers report in their own terms (a parser function's
    arguments, OpenSSL's error stack): say it in the description's.
    """
    text = str(e)
    if "invalid literal for int()" in text:
        return f"expected a number, got {text.rsplit(': ', 1)[-1]}"
    if isinstance(e, TypeError):
        missing = re.search(r"missing \d+ required positional argument: '(\w+)'", text)
        if missing:
            return f"{missing.group(1)} is missing"
        unexpected = re.search(r"unexpected keyword argument '(\w+)'", text)
        if unexpected:
            return f"unknown option {unexpected.group(1)}="
        if "multiple values for argument" in text or "positional argument" in text:
            return (
                "too many fields: escape the colons of an IPv6 address or a path "
                "(interface=\\:\\:1)"
            )
    if isinstance(e, OverflowError):
        return "a number in it is too large"
    if type(e).__module__.startswith("OpenSSL"):
        return f"cannot load the certificate or key: {_sslReason(e)}"
    return text or e.__class__.__name__


def _sslReason(e: Exception) -> str:
    """
    Every reason on OpenSSL's error stack, on one line.
    """
    from maccept._tls import openSSLReasons

    reasons = [
        f"{library}: {reason}" if library else reason for library, reason in openSSLReasons(e)
    ]
    return "; ".join(reasons) or str(e) or "not a PEM certificate and key"


class _NeverAccepts(Factory):
    """
    The factory the parent listens with.  The parent stops reading its
    ports before the reactor runs, so this refuses anything that slips by.
    """

    noisy = False

    def buildProtocol(self, addr: Any) -> None:
        return None


@dataclass
class ListeningSocket:
    """
    A socket the parent listens on and hands to every worker.
    """

    description: str
    port: IListeningPort
    family: str
    #: C{stream} or C{datagram}.
    kind: str = "stream"
    #: A UNIX socket's path and lock, which the owning parent removes.
    socketPath: SocketPath | None = None

    @property
    def address(self) -> str:
        """
        Where clients reach this socket: C{HOST:PORT}, C{[HOST]:PORT} for
        IPv6, or the path of a UNIX socket.
        """
        host = self.port.getHost()
        if isinstance(host, IPv6Address):
            return f"[{host.host}]:{host.port}"
        if isinstance(host, IPv4Address):
            return f"{host.host}:{host.port}"
        return os.fsdecode(host.name)  # type: ignore[attr-defined]

    def fileno(self) -> int:
        return self.port.fileno()  # type: ignore[attr-defined,no-any-return]

    def handleAt(self, fd: int) -> ListenerHandle:
        """
        Describe this socket to a worker that finds it at descriptor C{fd}.
        """
        return ListenerHandle(
            fd=fd, family=self.family, description=self.description, kind=self.kind
        )

    def close(self, keepPath: bool = False) -> None:
        """
        Close the parent's copy of the socket, and for a UNIX socket remove
        its path and lock, which only the parent may do: the one that owns
        them (see L{SocketPath}), and not when C{keepPath} (it handed the
        socket to a new parent on an upgrade).

        Not C{stopListening}: on a TCP port Twisted created, that calls
        C{shutdown(2)}, which would stop every worker's accept on the shared
        socket and reset the connections waiting in its backlog.  Closed
        this way, the socket lives until the last draining worker closes
        its own copy, and only then refuses new connections.
        """
        release(self.port)
        if self.socketPath is not None and not keepPath:
            self.socketPath.remove()


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
        kind, domain, accepting = _socketFacts(fileno)
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


def unixPath(description: str) -> str | None:
    """
    The path of a C{unix:} description (C{unix:PATH} or
    C{unix:address=PATH}); C{None} for other types.
    """
    if endpointType(description) != "unix":
        return None
    for field in _fields(description):
        key, equals, value = field.partition("=")
        if not equals:
            return field.replace("\\:", ":")
        if key == "address":
            return value.replace("\\:", ":")
    return None


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
    family, datagram = socketKind(fd)
    try:
        if datagram:
            port = reactor.adoptDatagramPort(fd, family, DatagramProtocol())
        else:
            port = adoptStream(reactor, fd, family, _NeverAccepts())
        port.stopReading()
    finally:
        os.close(fd)
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
        cause = error.socketError
        if isinstance(cause, OSError) and cause.strerror:
            return f"cannot listen: {cause.strerror.lower()}"
        return f"cannot listen: {cause}"
    return f"cannot listen: {error}"


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

        contextFactory = serverFromString(reactor, inner)._sslContextFactory
        # Load the files now: one changed since the parent checked them
        # (before a HUP) fails this worker's start, not every handshake.
        contextFactory.getContext()
        factory = HandshakeCountingFactory(contextFactory, factory, onHandshakeFailed)
    if proxied:
        from maccept._proxy import ProxyWrappingFactory

        factory = ProxyWrappingFactory(factory, onProxyRejected, clock=reactor)
    return adoptStream(reactor, handle.fd, handle.addressFamily, factory)


def socketKind(fd: int) -> tuple[int, bool]:
    """
    The address family of the socket at C{fd}, and whether it is a
    datagram socket.
    """
    kind, family, _ = _socketFacts(fd)
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
