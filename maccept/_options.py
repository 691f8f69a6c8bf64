# -*- test-case-name: tests.test_options -*-
"""
The C{twistd maccept} command line.

L{Options} raises L{usage.UsageError} like any Twisted options class, so it
can be tested and embedded; L{CommandLineOptions} is what twistd uses and
turns that error into the one line a person at a terminal needs.
"""

from __future__ import annotations

import os
import sys

from twisted.python import usage

import twisted
from maccept._affinity import availableCPUs, parseCPUs
from maccept._board import MAX_WORKERS
from maccept._descriptions import (
    DATAGRAM_TYPES,
    ListenError,
    checkDescription,
    endpointType,
    shown,
    splitProxy,
    systemdDescriptor,
    unixPath,
)
from maccept._handover import HandOverError, inheritedDescriptions, tellOldParentWhy
from maccept._output import endsQuietlyIfClosed
from maccept._procfs import residentBytes
from maccept._protocols import ProtocolSpecError, resolveProtocol
from maccept._reactor import WORKER_REACTORS

DEFAULT_LISTEN = "tcp:7007:interface=127.0.0.1"
BALANCE_MODES = ("even", "greedy")


def parseNumber(option: str, value: str, integer: bool, minimum: float) -> float:
    """
    A number no smaller than C{minimum}, or a L{usage.UsageError} naming
    C{option}.
    """
    kind = "a whole number" if integer else "a number"
    try:
        number: float = int(value) if integer else float(value)
    except ValueError:
        raise usage.UsageError(f"--{option}: expected {kind}, got {value!r}") from None
    if number != number or number in (float("inf"), float("-inf")):
        raise usage.UsageError(f"--{option}: expected a finite number, got {value!r}")
    if number < minimum:
        raise usage.UsageError(f"--{option}: must be at least {minimum:g}, got {value.strip()}")
    return number


#: The shortest watchdog C{--timeout}, in seconds.
MIN_WATCHDOG_TIMEOUT = 1.0


def startupMiB() -> int:
    """
    This process's resident memory in MiB: Python, Twisted, maccept and the
    protocol's code loaded, which is what a worker needs before it serves
    anything.
    """
    return -(-(residentBytes(os.getpid()) or 0) // 2**20)


def parseWorkers(value: str) -> int:
    """
    C{auto} or a positive integer.
    """
    if value == "auto":
        # The CPUs this process may run on.
        return min(len(availableCPUs()), MAX_WORKERS)
    try:
        count = int(value)
    except ValueError:
        raise usage.UsageError(
            f"--workers: expected a positive integer or 'auto', got {value!r}"
        ) from None
    if count < 1:
        raise usage.UsageError(f"--workers: must be at least 1, got {count}")
    if count > MAX_WORKERS:
        raise usage.UsageError(f"--workers: at most {MAX_WORKERS}, got {count}")
    return count


class Options(usage.Options):
    """
    Options of C{twistd maccept}.
    """

    synopsis = "[options]"
    longdesc = (
        "Serve a protocol from a pool of worker processes that all accept on "
        "the same listening sockets, which this parent process creates.  "
        "Signals to the parent: TERM, INT or QUIT stop gracefully (a second one kills "
        "the workers at once), HUP reloads every worker without refusing a "
        "connection, TTIN adds a worker, TTOU removes one, USR2 upgrades maccept "
        "itself (a new parent takes the sockets over).  See also maccept-ctl."
    )

    optParameters = [
        ["workers", "w", "auto", "Number of worker processes, or 'auto' for one per usable CPU."],
        [
            "protocol",
            "p",
            "echo",
            "A protocol plugin's name (echo, discard, chargen, daytime, web, or "
            "your own: see --help-protocols), or module:attribute naming a "
            "protocol factory, a factory or protocol class, or a callable "
            "returning a factory.",
        ],
        [
            "graceful-timeout",
            None,
            "30",
            "Seconds a stopping worker may take to finish its open connections; "
            "then it aborts those still open (clients see a reset) and exits.",
        ],
        [
            "stop-delay",
            None,
            "0",
            "Seconds from a stop request (TERM, INT, QUIT, maccept-ctl stop) to the drain, "
            "while /healthz answers 503 and the workers go on accepting, so that a load "
            "balancer takes this host out before any connection is refused.",
        ],
        [
            "start-timeout",
            None,
            "10",
            "Seconds a new worker may take to accept (its workerStarting hook "
            "included) before the start, or the reload, is given up.",
        ],
        [
            "timeout",
            "t",
            "30",
            "Seconds a worker's reactor may stay blocked before the worker's "
            "stacks are logged and it is replaced (0: no watchdog).",
        ],
        [
            "max-connections",
            None,
            None,
            "Replace a worker after it accepted this many connections (default: never).",
        ],
        [
            "max-connections-jitter",
            None,
            "0",
            "Add a random 0..J to --max-connections per worker, so that workers "
            "are not all replaced at once.",
        ],
        [
            "max-memory",
            None,
            None,
            "Replace a worker whose resident memory exceeds this many MiB (default: never).",
        ],
        [
            "max-concurrent",
            None,
            None,
            "Per worker: at this many open connections stop accepting, and accept "
            "again below it; new connections wait in the backlog (default: no limit).",
        ],
        [
            "idle-timeout",
            None,
            "0",
            "Abort a connection on which no byte moved for this many seconds "
            "(the client sees a reset; 0: never).",
        ],
        [
            "metrics",
            None,
            None,
            "An endpoint description on which the parent serves /metrics "
            "(Prometheus) and /healthz, e.g. tcp:9107:interface=127.0.0.1 (default: off).",
        ],
        [
            "control",
            None,
            None,
            "A UNIX socket path on which the parent takes maccept-ctl commands "
            "(mode 0600; default: off).",
        ],
        [
            "worker-reactor",
            None,
            "fast",
            "The reactor every worker runs: 'fast' (epoll, dispatching events "
            "without a logging context each), 'epoll' (Twisted's own) or 'asyncio' "
            "(Twisted's asyncio reactor, on uvloop when installed).",
        ],
        [
            "balance",
            None,
            "even",
            "How workers share new connections: 'even' (a worker ahead of the "
            "others pauses accepting) or 'greedy' (Twisted's own accept loop).",
        ],
        [
            "cpu-affinity",
            None,
            None,
            "Pin each worker to one CPU: 'auto' (the CPUs maccept may run on, "
            "one thread of each core first, one per worker in turn) or a list "
            "such as 0-3,8 (default: off).",
        ],
    ]

    def __init__(self) -> None:
        super().__init__()
        self["listen"] = []
        self["protocol-option"] = []

    def opt_protocol_option(self, item: str) -> None:
        """
        KEY=VALUE for the protocol plugin's own options (repeatable), e.g.
        --protocol web --protocol-option path=/srv/www.
        """
        if not item.partition("=")[0].strip():
            raise usage.UsageError(f"--protocol-option: expected KEY=VALUE or KEY, got {item!r}")
        self["protocol-option"].append(item)

    def opt_help(self) -> None:
        """
        Display this help and exit.
        """
        with endsQuietlyIfClosed():
            super().opt_help()

    def opt_help_protocols(self) -> None:
        """
        List the protocol plugins installed, and exit.
        """
        from maccept._plugins import pluginsByName

        with endsQuietlyIfClosed():
            for name, plugins in sorted(pluginsByName().items()):
                for plugin in plugins:
                    clash = (
                        "  (ambiguous: several plugins have this name)" if len(plugins) > 1 else ""
                    )
                    print(f"{name:12} {plugin.description}{clash}")
            raise SystemExit(0)

    def opt_version(self) -> None:
        """
        Display maccept's version, with Twisted's and Python's, and exit.
        """
        with endsQuietlyIfClosed():
            print(versionLine())
            raise SystemExit(0)

    def opt_listen(self, description: str) -> None:
        """
        A server endpoint description to accept on (repeatable; default
        tcp:7007:interface=127.0.0.1).  Supported: tcp, tcp6, unix, ssl,
        systemd, haproxy:
        before any of them (PROXY protocol), and udp:PORT[:interface=ADDR]
        (UDP echo).
        """
        self["listen"].append(description)

    opt_l = opt_listen

    def parseArgs(self, *arguments: str) -> None:
        """
        maccept takes options only: name the stray word rather than say
        "wrong number of arguments".
        """
        if arguments:
            raise usage.UsageError(
                f"unexpected argument {arguments[0]!r} (every option starts with --)"
            )

    def _refuseSharedSockets(self) -> None:
        """
        Refuse two of maccept's sockets at one UNIX path, or on one of
        systemd's descriptors: the second would only fail to take the
        path's lock, or adopt whatever holds that descriptor number by
        then, in words that name neither.
        """
        described = [("--listen", d) for d in self["listen"]]
        if self["metrics"] is not None:
            described.append(("--metrics", self["metrics"]))
        # (option, its value, (what is shared, which one)).
        sockets: list[tuple[str, str, tuple[str, object]]] = []
        for option, value in described:
            inner = splitProxy(value)[1]
            path, fd = unixPath(inner), systemdDescriptor(inner)
            if path and not path.startswith(("@", "\0")):
                sockets.append((option, value, ("path", os.path.abspath(path))))
            if fd is not None:
                sockets.append((option, value, ("systemd descriptor", fd)))
        if self["control"] is not None:
            path = os.path.abspath(self["control"])
            sockets.append(("--control", self["control"], ("path", path)))
        owners: dict[tuple[str, object], str] = {}
        for option, value, key in sockets:
            if key in owners:
                raise usage.UsageError(
                    f"{option} {shown(value)}: the same {key[0]} as {owners[key]}"
                )
            owners[key] = f"{option} {shown(value)}"

    def postOptions(self) -> None:
        """
        Check every value, in the order a user reads them: the numbers and
        names, then the endpoints, then the protocol (whose code is then
        loaded, which --max-memory's floor measures).
        """
        self._checkChoicesAndNumbers()
        self._checkListeners()
        self._checkServicePorts()
        self._refuseSharedSockets()
        try:
            resolveProtocol(self["protocol"], self["protocol-option"])
        except ProtocolSpecError as e:
            raise usage.UsageError(f"--protocol: {e}") from None
        if self["max-memory"] is not None:
            # Measured now that the protocol's code is loaded, as a worker's
            # will be: a limit below that would replace workers without end.
            self["max-memory"] = int(
                parseNumber("max-memory", self["max-memory"], True, startupMiB() + 1)
            )

    def _checkChoicesAndNumbers(self) -> None:
        self["workers"] = parseWorkers(self["workers"])
        if self["balance"] not in BALANCE_MODES:
            raise usage.UsageError(
                f"--balance: expected one of {', '.join(BALANCE_MODES)}, got {self['balance']!r}"
            )
        if self["worker-reactor"] not in WORKER_REACTORS:
            raise usage.UsageError(
                f"--worker-reactor: expected one of {', '.join(WORKER_REACTORS)}, "
                f"got {self['worker-reactor']!r}"
            )
        for seconds, minimum in [
            ("graceful-timeout", 0),
            ("stop-delay", 0),
            ("start-timeout", 1),
            ("timeout", 0),
            ("idle-timeout", 0),
        ]:
            self[seconds] = parseNumber(seconds, self[seconds], integer=False, minimum=minimum)
        if 0 < self["timeout"] < MIN_WATCHDOG_TIMEOUT:
            # Workers beat four times per timeout: shorter, and idle workers
            # spin on heartbeats or are all killed as hung.
            raise usage.UsageError(
                f"--timeout: must be 0 (off) or at least {MIN_WATCHDOG_TIMEOUT:g}, "
                f"got {self['timeout']:g}"
            )
        self["max-connections-jitter"] = int(
            parseNumber("max-connections-jitter", self["max-connections-jitter"], True, 0)
        )
        for count in ("max-connections", "max-concurrent"):
            if self[count] is not None:
                self[count] = int(parseNumber(count, self[count], True, 1))
        if self["cpu-affinity"] is not None:
            try:
                self["cpu-affinity"] = parseCPUs(self["cpu-affinity"], availableCPUs())
            except ValueError as e:
                raise usage.UsageError(f"--cpu-affinity: {e}") from None
        if self["max-connections"] is None and self["max-connections-jitter"]:
            raise usage.UsageError(
                "--max-connections-jitter: spreads --max-connections, which is not given"
            )

    def _checkListeners(self) -> None:
        if not self["listen"]:
            self["listen"] = [DEFAULT_LISTEN]
        # After an upgrade the old parent's sockets come ready-made: a
        # systemd: description, for one, no longer finds LISTEN_FDS.  An
        # ssl: one is still checked: its certificate and key are read
        # anew, and a bad pair should stop this parent, not its workers.
        try:
            inherited = set(inheritedDescriptions())
        except HandOverError as e:
            raise usage.UsageError(str(e)) from None
        for description in self["listen"]:
            kind = endpointType(splitProxy(description)[1])
            if description in inherited and kind != "ssl":
                continue
            try:
                checkDescription(description)
            except ListenError as e:
                raise usage.UsageError(f"--listen {shown(description)}: {e}") from None

    def _checkServicePorts(self) -> None:
        control = self["control"]
        if control is not None and (not control or any(c in control for c in "\r\n\0")):
            raise usage.UsageError(
                f"--control {shown(control)}: the path is empty or holds a line break or a NUL"
            )
        if self["metrics"] is not None:
            metrics = self["metrics"]
            try:
                checkDescription(metrics)
                proxied, inner = splitProxy(metrics)
                if endpointType(inner) in DATAGRAM_TYPES:
                    raise ListenError("the metrics are served over HTTP, not UDP")
                if proxied:
                    # Twisted's own PROXY wrapper would serve it, unchecked
                    # and without a deadline; a balancer's health check on
                    # its own port sends no header anyway.
                    raise ListenError(
                        "the PROXY protocol (haproxy:) is for --listen; serve the metrics on "
                        "the address itself"
                    )
            except ListenError as e:
                raise usage.UsageError(f"--metrics {shown(metrics)}: {e}") from None


# usage.Options keeps a docstring's line breaks and indentation inside the
# lines of --help: make each option's docstring one paragraph.
for _name, _method in list(vars(Options).items()):
    if _name.startswith("opt_") and _method.__doc__:
        _method.__doc__ = " ".join(_method.__doc__.split())


class CommandLineOptions(Options):
    """
    L{Options} as twistd parses them: a bad value exits with one line on
    stderr and status 2, rather than twistd's usage dump.
    """

    def parseOptions(self, options: list[str] | None = None) -> None:
        try:
            super().parseOptions(options)
        except usage.UsageError as e:
            fail(str(e))


def versionLine() -> str:
    """
    What C{--version} prints: maccept's version first, as users look for
    it, then what it runs on.
    """
    import platform
    from importlib.metadata import PackageNotFoundError, version

    try:
        mine = version("maccept")
    except PackageNotFoundError:  # run from a checkout that is not installed
        mine = "(not installed)"
    return f"maccept {mine} (Twisted {twisted.__version__}, Python {platform.python_version()})"


def fail(message: str) -> None:
    """
    Exit now with C{message} on stderr, no traceback.
    """
    sys.stderr.write(f"maccept: error: {message}\n")
    sys.stderr.flush()
    tellOldParentWhy(message)
    raise SystemExit(2)
