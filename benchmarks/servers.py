"""
The echo servers the benchmark compares, and how to start and stop them.

Every competitor serves RFC 862 echo on one loopback TCP socket with the same
accept backlog (L{BACKLOG} unless told otherwise: maccept's default; Twisted's
is 50), from a chosen number of processes:

    - C{maccept}: C{twistd -n maccept --workers N}; C{maccept-greedy} adds
      C{--balance greedy} (Twisted's own accept loop), for comparison with
      maccept's default even balancing; C{maccept-epoll} and
      C{maccept-asyncio} run the workers on Twisted's own epoll reactor or
      its asyncio reactor (uvloop's loop where installed) instead of
      maccept's default; C{maccept-pinned} adds C{--cpu-affinity auto}
      (each worker on one of the server CPUs).  Not run unless asked for.
    - C{twisted}: one process, C{reactor.listenTCP}; the baseline every
      multi-process Twisted server has to beat.
    - C{recipe}: the naive Twisted recipe.  The parent listens, stops reading
      the port, and spawns N processes that C{adoptStreamPort} the inherited
      descriptor.  No balancing, no supervision.
    - C{recipe-reuseport}: the same recipe, except that each worker gets a
      listening socket of its own, all bound to the port with
      C{SO_REUSEPORT}, so the kernel picks a worker by a hash of each
      connection's addresses: no shared queue, no wake-up of every worker.
      Not run unless asked for.
    - C{asyncio} and C{uvloop}: the parent makes the socket and forks N
      children that each serve it with their own event loop.

Run one by hand with C{python benchmarks/servers.py KIND --port P --processes
N}; the harness uses L{ServerSpec} and L{RunningServer}.  Each Python serving
process prints C{READY <pid>} once it accepts, so the harness knows when to
start the load.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import http.client
import importlib.util
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import _procfs

#: Default accept queue length for every competitor: maccept's default.  With
#: Twisted's 50, a burst of 256 connects overflows the queue, SYNs wait a
#: second to be retried and SYN cookies reset some connections, which then
#: measures the queue rather than the server.
BACKLOG = 1024
HOST = "127.0.0.1"
KINDS = (
    "maccept",
    "maccept-greedy",
    "maccept-epoll",
    "maccept-asyncio",
    "maccept-pinned",
    "twisted",
    "recipe",
    "recipe-reuseport",
    "asyncio",
    "uvloop",
)
DEFAULT_KINDS = ("maccept", "twisted", "recipe", "asyncio", "uvloop")
#: Kinds that serve from a single process whatever the worker count.
SINGLE_PROCESS = ("twisted",)
READY = "READY"


def available_kinds() -> tuple[str, ...]:
    """
    The kinds this interpreter can run: uvloop only when it is importable.
    """
    return tuple(k for k in KINDS if k != "uvloop" or importlib.util.find_spec("uvloop"))


def twistdCommand() -> list[str]:
    """
    C{twistd} beside this interpreter, or run through it where Twisted was
    installed without scripts (C{pip install --target}).
    """
    script = Path(sys.executable).with_name("twistd")
    if script.exists():
        return [str(script)]
    return [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]


@dataclass(frozen=True)
class ServerSpec:
    """
    One competitor at one process count, on one port.
    """

    kind: str
    processes: int
    port: int
    backlog: int = BACKLOG
    #: maccept's /metrics port, from which the accept path's counters are read.
    metricsPort: int | None = None

    @property
    def isMaccept(self) -> bool:
        return self.kind.startswith("maccept")

    def command(self) -> list[str]:
        """
        The command line that runs this server in the foreground.
        """
        if self.isMaccept:
            listen = f"tcp:{self.port}:interface={HOST}:backlog={self.backlog}"
            command = [*twistdCommand(), "-n", "--pidfile=", "maccept"]
            command += ["--workers", str(self.processes), "--listen", listen]
            if self.metricsPort is not None:
                command += ["--metrics", f"tcp:{self.metricsPort}:interface={HOST}"]
            if self.kind == "maccept-greedy":
                command += ["--balance", "greedy"]
            elif self.kind in ("maccept-epoll", "maccept-asyncio"):
                command += ["--worker-reactor", self.kind.removeprefix("maccept-")]
            elif self.kind == "maccept-pinned":
                command += ["--cpu-affinity", "auto"]
            return command
        options = {"--port": self.port, "--processes": self.processes, "--backlog": self.backlog}
        flags = [text for option, value in options.items() for text in (option, str(value))]
        return [sys.executable, "-u", __file__, self.kind, *flags]

    def isReady(self, log: str) -> bool:
        """
        Whether the server's output so far says that every worker accepts.
        """
        if self.isMaccept:
            return f"all {self.processes} workers ready on" in log
        return log.count(f"{READY} ") >= self.processes

    def workerPids(self, parent: int) -> list[int]:
        """
        The processes that accept connections: the parent's children, or the
        parent itself for a single-process server.
        """
        if self.kind in SINGLE_PROCESS:
            return [parent]
        children = _procfs.children(parent)
        if self.isMaccept:
            # "maccept: worker N" once setproctitle is installed.
            markers = ("maccept._worker", "maccept: worker")
            workers = [p for p in children if any(m in _procfs.cmdline(p) for m in markers)]
            children = workers or children
        return sorted(children)


#: maccept's counters of its accept path, by the benchmark's names for them.
ACCEPT_COUNTERS = {
    "accepted": ("maccept_connections_accepted_total", ()),
    "balance_pauses": ("maccept_accept_pauses_total", (("reason", "balance"),)),
    "empty_wakeups": ("maccept_accept_empty_wakeups_total", ()),
    "batches": ("maccept_accept_batches_total", ()),
}


def acceptCounters(metricsText: str) -> dict[str, float]:
    """
    The accept path's counters in a maccept /metrics page; those its
    version lacks are left out.
    """
    from prometheus_client.parser import text_string_to_metric_families

    found = {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(metricsText)
        for sample in family.samples
    }
    return {name: found[key] for name, key in ACCEPT_COUNTERS.items() if key in found}


class ServerError(Exception):
    """
    A server exited or did not become ready; the message holds its log tail.
    """


class RunningServer:
    """
    A server started in its own process group, pinned to C{cpus}.

    Stopped by its pid with SIGTERM; anything of its process group still
    alive after C{stopTimeout} seconds is killed by group id, so a benchmark
    never leaves processes behind.
    """

    stopTimeout = 15.0

    def __init__(self, spec: ServerSpec, cpus: set[int], logPath: Path) -> None:
        self.spec = spec
        self.cpus = cpus
        self.logPath = logPath
        self.process: subprocess.Popen[bytes] | None = None
        self.startedAt = 0.0
        self.readyAfter = 0.0

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def start(self, timeout: float = 60.0) -> None:
        """
        Start the server and return once every worker accepts.

        @raise ServerError: if it exits first or takes over C{timeout} s.
        """
        self.logPath.parent.mkdir(parents=True, exist_ok=True)
        cpus = self.cpus
        with self.logPath.open("wb") as log:
            self.startedAt = time.monotonic()
            self.process = subprocess.Popen(
                self.spec.command(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=lambda: os.sched_setaffinity(0, cpus),
            )
        self._waitReady(timeout)

    def _waitReady(self, timeout: float) -> None:
        deadline = self.startedAt + timeout
        while time.monotonic() < deadline:
            if self.spec.isReady(self.log()):
                self.readyAfter = time.monotonic() - self.startedAt
                return
            if self.process is not None and self.process.poll() is not None:
                raise ServerError(f"{self.spec} exited:\n{self.logTail()}")
            time.sleep(0.005)
        self.stop()
        raise ServerError(f"{self.spec} not ready after {timeout:.0f}s:\n{self.logTail()}")

    def acceptCounters(self) -> dict[str, float]:
        """
        A maccept server's accept-path counters now (see L{acceptCounters});
        empty for other servers, and when the page cannot be read or parsed
        (the counters are a diagnosis: a slow parent must not cost the
        run).  The workers report every second, so these lag by up to a
        second.
        """
        if self.spec.metricsPort is None:
            return {}
        url = f"http://{HOST}:{self.spec.metricsPort}/metrics"
        try:
            with urllib.request.urlopen(url, timeout=5) as page:
                return acceptCounters(page.read().decode())
        except (OSError, http.client.HTTPException, ValueError) as e:
            print(f"   (no accept-path counters: {e})", file=sys.stderr)
            return {}

    def log(self) -> str:
        return self.logPath.read_text(errors="replace")

    def logTail(self, lines: int = 20) -> str:
        return "\n".join(self.log().splitlines()[-lines:])

    def workerPids(self) -> list[int]:
        return self.spec.workerPids(self.pid)

    def exited(self, workers: Iterable[int] = ()) -> str | None:
        """
        What of the server has exited, or None while all of it runs: the
        process started (with its status), else any of C{workers} (the
        pids it started with: a maccept parent replaces a worker that dies,
        so its pids now would not show the crash).  The load generator
        cannot tell: a dead server's port refuses connections, which a full
        accept queue also causes, and that is not counted as a failure.
        """
        if self.process is None:
            return "server not running"
        status = self.process.poll()
        if status is not None:
            return f"server {_exitStatus(status)}"
        gone = [pid for pid in workers if not _procfs.alive(pid, self.process.pid)]
        if gone:
            return f"worker{'s' if len(gone) > 1 else ''} {', '.join(map(str, gone))} exited"
        return None

    def stop(self) -> None:
        """
        SIGTERM the server by pid, wait, then SIGKILL whatever is left of its
        process group (the group id is the pid we started).
        """
        if self.process is None:
            return
        group = self.process.pid
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(self.stopTimeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(group, signal.SIGKILL)
                self.process.wait()
        self._reapGroup(group)
        self.process = None

    def _reapGroup(self, group: int) -> None:
        deadline = time.monotonic() + 5
        while _procfs.groupMembers(group) and time.monotonic() < deadline:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(group, signal.SIGKILL)
            time.sleep(0.05)

    def __enter__(self) -> RunningServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _exitStatus(status: int) -> str:
    """
    A C{Popen.returncode} in words: "exited with status 1", "killed by SIGKILL".
    """
    if status >= 0:
        return f"exited with status {status}"
    try:
        return f"killed by {signal.Signals(-status).name}"
    except ValueError:
        return f"killed by signal {-status}"


def freePort() -> int:
    """
    A loopback port nobody listens on right now.
    """
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


# The servers themselves: run in the subprocesses started above.


def _announce() -> None:
    print(f"{READY} {os.getpid()}", flush=True)


def _twistedFactory() -> Any:
    from twisted.internet.protocol import Factory, Protocol

    class Echo(Protocol):
        """
        Echo as a Twisted user would write it: no flow control.
        """

        def dataReceived(self, data: bytes) -> None:
            self.transport.write(data)  # type: ignore[union-attr]

    factory = Factory.forProtocol(Echo)
    factory.noisy = False
    return factory


def serveTwisted(port: int, processes: int, backlog: int) -> None:
    """
    One process, C{listenTCP}: the baseline.
    """
    from twisted.internet import reactor

    if processes != 1:
        raise SystemExit("twisted serves from one process only")
    reactor.listenTCP(port, _twistedFactory(), backlog=backlog, interface=HOST)
    reactor.callWhenRunning(_announce)
    reactor.run()


def _reusePortSockets(port: int, count: int, backlog: int) -> list[socket.socket]:
    """
    C{count} listening sockets on one port, each with an accept queue of
    its own (C{SO_REUSEPORT}).
    """
    sockets = []
    for _ in range(count):
        listening = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listening.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listening.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        listening.bind((HOST, port))
        listening.listen(backlog)
        listening.setblocking(False)
        sockets.append(listening)
    return sockets


def serveRecipe(port: int, processes: int, backlog: int, reusePort: bool = False) -> None:
    """
    The parent of the naive recipe: listen, stop reading, spawn workers that
    adopt the descriptor (with C{reusePort}, each its own); on shutdown,
    SIGTERM them.
    """
    from twisted.internet import reactor, tcp
    from twisted.internet.protocol import ProcessProtocol

    if reusePort:
        # Kept open here (and referenced, or they close) as the recipe's
        # parent keeps its port: idle.
        sockets = _reusePortSockets(port, processes, backlog)
        fds = [s.fileno() for s in sockets]
    else:
        listening = reactor.listenTCP(port, _twistedFactory(), backlog=backlog, interface=HOST)
        assert isinstance(listening, tcp.Port)
        listening.stopReading()
        fds = [listening.fileno()] * processes
    children = []
    for fd in fds:
        children.append(
            reactor.spawnProcess(
                ProcessProtocol(),
                sys.executable,
                [sys.executable, "-u", __file__, "recipe-worker", "--fd", str(fd)],
                env=os.environ.copy(),
                childFDs={0: 0, 1: 1, 2: 2, fd: fd},
            )
        )

    def stopChildren() -> None:
        for child in children:
            with contextlib.suppress(Exception):
                child.signalProcess("TERM")

    reactor.addSystemEventTrigger("before", "shutdown", stopChildren)
    reactor.run()


def serveRecipeWorker(fd: int) -> None:
    """
    A worker of the naive recipe: adopt the inherited listening socket.
    """
    from twisted.internet import reactor

    reactor.adoptStreamPort(fd, socket.AF_INET, _twistedFactory())  # type: ignore[attr-defined]
    os.close(fd)
    reactor.callWhenRunning(_announce)
    reactor.run()


class _AsyncioEcho(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: Any = transport

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)


def _serveLoop(loop: asyncio.AbstractEventLoop, listening: socket.socket, backlog: int) -> None:
    asyncio.set_event_loop(loop)
    loop.run_until_complete(loop.create_server(_AsyncioEcho, sock=listening, backlog=backlog))
    loop.add_signal_handler(signal.SIGTERM, loop.stop)
    _announce()
    loop.run_forever()


def _loopFactory(kind: str) -> Callable[[], asyncio.AbstractEventLoop]:
    if kind == "uvloop":
        import uvloop

        # Typed here: where uvloop is not installed mypy knows nothing of it.
        newLoop: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
        return newLoop
    return asyncio.new_event_loop


def serveForked(kind: str, port: int, processes: int, backlog: int) -> None:
    """
    Make the socket, fork C{processes} children that serve it with an
    asyncio (or uvloop) loop each, and wait; SIGTERM is passed on.
    """
    newLoop = _loopFactory(kind)
    listening = socket.create_server((HOST, port), backlog=backlog)
    listening.setblocking(False)
    children = []
    for _ in range(processes):
        pid = os.fork()
        if pid == 0:
            _serveLoop(newLoop(), listening, backlog)
            os._exit(0)
        children.append(pid)
    listening.close()

    def forward(signum: int, frame: Any) -> None:
        for child in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signal.SIGTERM)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    for child in children:
        os.waitpid(child, 0)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Run one benchmark echo server.")
    parser.add_argument("kind", choices=[*KINDS, "recipe-worker"])
    parser.add_argument("--port", type=int, default=7007)
    parser.add_argument("--processes", type=int, default=1)
    parser.add_argument("--backlog", type=int, default=BACKLOG, help="accept queue length")
    parser.add_argument("--fd", type=int, help="recipe-worker: the inherited listening socket")
    args = parser.parse_args(argv)
    if args.kind.startswith("maccept"):
        spec = ServerSpec(args.kind, args.processes, args.port, args.backlog)
        os.execv(spec.command()[0], spec.command())
    elif args.kind == "twisted":
        serveTwisted(args.port, args.processes, args.backlog)
    elif args.kind in ("recipe", "recipe-reuseport"):
        serveRecipe(args.port, args.processes, args.backlog, args.kind == "recipe-reuseport")
    elif args.kind == "recipe-worker":
        serveRecipeWorker(args.fd)
    else:
        serveForked(args.kind, args.port, args.processes, args.backlog)


if __name__ == "__main__":
    main()
