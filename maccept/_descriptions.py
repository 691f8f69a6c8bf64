# -*- test-case-name: tests.test_listening,tests.test_command_line -*-
"""
Endpoint descriptions: read (their type, a C{haproxy:} prefix), and checked
before anything listens.

Every C{--listen} and C{--metrics} value is a Twisted server endpoint
description.  Twisted's parsers take some wrong ones silently, and report
others in their own terms (a parser function's arguments, OpenSSL's error
stack, C{generator raised StopIteration}); this says what is wrong in the
description's terms, in one line, at start-up.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import re
import shlex
import socket
import stat

from twisted.internet.endpoints import serverFromString

#: Endpoint types whose sockets a worker can adopt as stream ports.
STREAM_TYPES = ("tcp", "tcp6", "unix", "ssl", "systemd")


#: ... and as datagram ports (C{udp:PORT[:interface=ADDR]}; Twisted has no
#: UDP endpoint, so maccept parses these itself).
DATAGRAM_TYPES = ("udp",)


#: The prefix of a C{--listen} description that asks for the PROXY protocol
#: (L{maccept._proxy}).
PREFIX = "haproxy:"


def endpointType(description: str) -> str:
    """
    The endpoint type a description starts with, lower case (C{tcp},
    C{unix}, C{haproxy}...), as the checks compare it: a description in
    upper case is refused by name (L{checkDescription}).
    """
    return description.split(":", 1)[0].lower()


def splitProxy(description: str) -> tuple[bool, str]:
    """
    C{(True, inner)} for C{haproxy:INNER}, else C{(False, description)}.
    """
    if description.lower().startswith(PREFIX):
        return True, description[len(PREFIX) :]
    return False, description


class ListenError(Exception):
    """
    A C{--listen} description cannot be used; the message says why.
    """


def shown(value: str) -> str:
    """
    C{value} as an error line can show it: escaped if it holds a line
    break or another unprintable character.
    """
    return value if value.isprintable() else repr(value)


def asWord(text: str) -> str:
    """
    C{text} as one word of a line that C{shlex.split} reads back (the
    testing kit reads the addresses of the ready line so): as it is, or
    quoted if it holds a space or a quote (a UNIX socket's path may).
    """
    if any(character.isspace() or character in "'\"\\" for character in text):
        return shlex.quote(text)
    return text


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
        raise ListenError("the socket's path is missing or empty (unix:PATH)")
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


def _option(field: str) -> tuple[str, bool, str]:
    """
    A field as C{(key, True, value)} for C{key=value}, or C{("", False,
    value)} for a positional one; an escaped C{=} (C{\\=} in a path) does
    not split, and the value is unescaped as Twisted's parser does.
    """
    parts = re.split(r"(?<!\\)=", field, maxsplit=1)
    if len(parts) == 1:
        return "", False, _ESCAPED.sub(r"\1", field)
    return parts[0], True, _ESCAPED.sub(r"\1", parts[1])


#: A backslash and the character it escapes.
_ESCAPED = re.compile(r"\\(.)")


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
    tls = endpointType(description) == "ssl"
    fields = _fields(description)
    for index, field in enumerate(fields):
        key, equals, value = _option(field)
        if not equals:
            continue
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
        if key == "index" and value.startswith("-"):
            # Python would count it from the end of systemd's descriptors.
            return f"index must be 0 or more, got {value}"
        if not tls:
            continue  # an ssl: option elsewhere is Twisted's "unknown option"
        if key in _FILE_OPTIONS and not os.access(value, os.R_OK):
            return f"cannot read {key}={value}"
        problem = _tlsOptionProblem(key, value)
        if problem is not None:
            return problem
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
    if passed is not None and not passed.isdigit():
        return f"LISTEN_FDS={passed!r} is not a count of descriptors (set by systemd)"
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
            if not passed and _listeningAt(LISTEN_FDS_START):
                return (
                    f"systemd passed descriptors without names, so none named {e} "
                    "(systemd-socket-activate: --fdname; a unit: FileDescriptorName=)"
                )
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


def socketFacts(fd: int) -> tuple[int, int, bool]:
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
        return socketFacts(fd)[2]
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


def systemdDescriptor(description: str) -> int | None:
    """
    The descriptor a C{systemd:} description adopts (by index or name);
    C{None} for other types, or one that names none.
    """
    if endpointType(description) != "systemd":
        return None
    try:
        fileno = getattr(serverFromString(None, description), "fileno", None)
    except Exception:
        return None
    return fileno if isinstance(fileno, int) else None


def unixPath(description: str) -> str | None:
    """
    The path of a C{unix:} description (C{unix:PATH} or
    C{unix:address=PATH}); C{None} for other types.
    """
    if endpointType(description) != "unix":
        return None
    for field in _fields(description):
        key, equals, value = _option(field)
        if not equals or key == "address":
            return value
    return None
