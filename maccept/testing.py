"""
A testing kit for protocols served by maccept: start a real pool on an
ephemeral loopback port from a test, talk to it, stop it.

With trial::

    from maccept.testing import startPool

    class EchoTests(TestCase):
        @inlineCallbacks
        def test_echo(self):
            pool = yield startPool(protocol="myapp.protocols:factory", workers=2)
            self.addCleanup(pool.stop)
            ...  # connect to pool.address.host, pool.address.port

With pytest and pytest-twisted, the C{maccept_pool} fixture (registered
through the C{pytest11} entry point, see L{maccept.pytest_plugin}) takes the
same arguments and stops its pools at teardown.

The pool is the real C{twistd -n maccept} in a child process, so what a
test sees is what production sees: worker processes, signals, reloads.
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import signal
import sys
from collections.abc import Sequence
from typing import Any

from twisted.internet import defer, protocol
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.python.failure import Failure

from maccept._descriptions import DATAGRAM_TYPES, endpointType
from maccept._procfs import childrenOf as childrenOf  # the kit's, for tests
from maccept._procfs import liveProcesses

#: The parent's log line once every worker accepts.
_READY = re.compile(r"all (\d+) workers ready on ([^\n]+)\n")
#: The old parent's log line once a new one (USR2) has taken over.
_HANDED_OVER = re.compile(r"upgrade: the new parent \(pid (\d+)\) serves")
#: A reload in the parent's log: its generation starts (or it is ignored),
#: then that generation is ready, or the reload fails.
_RELOAD_STARTS = re.compile(
    r"reloading: starting generation (\d+)|(reload ignored: .*|queued reload dropped: .*)"
)
#: Logged once the old workers have let go of the listeners: a connection
#: made after it meets the new code.
_RELOADED = "reload: generation {generation} alone accepts"
_RELOAD_FAILED = re.compile(r"reload failed, keeping the old workers: .*")
#: twistd in a session (and process group) of its own, so that a kill of
#: that group reaches its workers too; and sent SIGTERM if the test process
#: dies first (a test runner's timeout, say), so that no pool outlives it.
#: (The test process's pid comes in L{TEST_PROCESS}: had it died before the
#: signal was asked for, twistd exits at once.)
TEST_PROCESS = "MACCEPT_TEST_PROCESS"
_TWISTD = (
    "import ctypes, os, signal, sys; os.setsid(); "
    "ctypes.CDLL(None).prctl(1, signal.SIGTERM); "  # PR_SET_PDEATHSIG
    f"parent = os.environ.pop({TEST_PROCESS!r}, None); "
    "parent is None or int(parent) == os.getppid() or sys.exit(1); "
    "from twisted.scripts.twistd import run; run()"
)


class PoolStartError(Exception):
    """
    The pool exited, or did not become ready in time; the message ends with
    the end of its log.
    """


class ReloadError(Exception):
    """
    A reload failed (the old workers serve on) or was ignored, or did not
    end in time; the message is the parent's line, or the end of its log.
    """


class RunningPool:
    """
    A pool started by L{startPool}.

    @ivar address: where it listens (C{.host}, C{.port}): the first of
        C{addresses}.
    @ivar addresses: where each C{--listen} listens, in their order: an
        C{IPv4Address} or C{IPv6Address}, or a C{UNIXAddress}.
    """

    def __init__(self, process: _PoolProcess, addresses: list[Any]) -> None:
        self._process = process
        self.addresses = addresses
        self.address = addresses[0]

    @property
    def pid(self) -> int:
        """
        The serving parent's pid: the one started, or after a C{USR2}
        upgrade the new parent that took over.
        """
        return self._process.servingPid()

    @property
    def pids(self) -> list[int]:
        """
        The live worker pids (of the serving parent), read from C{/proc} at
        each call.
        """
        return childrenOf(self.pid)

    @property
    def log(self) -> str:
        """
        Everything the pool has logged so far.
        """
        return self._process.output()

    def signal(self, signum: int) -> None:
        """
        Send C{signum} to the parent (C{SIGHUP} reloads, C{SIGTTIN} adds a
        worker...).
        """
        self._process.signalServing(signum)

    def reload(self, timeout: float = 30.0) -> defer.Deferred[int]:
        """
        Reload (SIGHUP) and fire with the new generation's number once its
        workers all accept and the old ones have stopped accepting (they
        drain what they hold): from then on every new connection meets the
        new code.  Fail with L{ReloadError}
        if the reload fails (the old workers serve on), is ignored, or does
        not end within C{timeout} seconds.
        """
        since = len(self._process.output())
        self.signal(signal.SIGHUP)
        return self._process.whenReloaded(since, timeout)

    def stop(self, timeout: float = 30.0) -> defer.Deferred[None]:
        """
        Stop gracefully (SIGTERM); kill after C{timeout} seconds.  Fires
        once the parent has exited, and with it every worker.
        """
        return self._process.stop(timeout)


class _PoolProcess(protocol.ProcessProtocol):
    def __init__(self, reactor: Any) -> None:
        self.reactor = reactor
        self.chunks: list[bytes] = []
        # Cancelled (a test's timeout, addTimeout): kill the pool, which
        # then fails the start with CancelledError once it is gone.
        self.ready: defer.Deferred[list[Any]] = defer.Deferred(self._cancelled)
        #: Reloads waited for: where in the output each looks from.
        self._reloads: list[tuple[int, defer.Deferred[int]]] = []
        self.ended: Failure | None = None
        self._endWaiters: list[defer.Deferred[None]] = []
        #: Fires once the parent has exited and its group is empty: one
        #: watch, however many wait (see L{whenEnded}).
        self._gone: defer.Deferred[None] | None = None

    def _cancelled(self, ready: defer.Deferred[list[Any]]) -> None:
        self.stop(0)

    def connectionMade(self) -> None:
        # The pool's process group: the parent's pid (it calls setsid),
        # kept for once the transport has forgotten it.
        self.pid: int = self.transport.pid  # type: ignore[union-attr]

    def servingPid(self) -> int:
        """
        The parent that serves: the one started, until it logs that a new
        parent (C{USR2}) has taken over.  The new one, its child, stays in
        its process group, and holds its output pipes once it has gone.
        """
        handedOver = _HANDED_OVER.findall(self.output())
        return int(handedOver[-1]) if handedOver else self.pid

    def output(self) -> str:
        return b"".join(self.chunks).decode("utf-8", "replace")

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        self.chunks.append(data)
        if self._reloads:
            self._checkReloads()
        if self.ready.called:
            return
        match = _READY.search(self.output())
        if match:
            self.ready.callback([_address(shown) for shown in shlex.split(match.group(2))])

    def whenReloaded(self, since: int, timeout: float) -> defer.Deferred[int]:
        """
        Fire with the generation of the first reload to end in the output
        after offset C{since}; fail with L{ReloadError} if it fails.
        """
        reloaded: defer.Deferred[int] = defer.Deferred()
        self._reloads.append((since, reloaded))

        def timedOut() -> None:
            if not reloaded.called:
                self._reloads.remove((since, reloaded))
                reloaded.errback(ReloadError(f"no reload within {timeout:g}s:\n{self._tail()}"))

        timer = self.reactor.callLater(timeout, timedOut)
        reloaded.addBoth(lambda result: (timer.active() and timer.cancel(), result)[1])
        self._checkReloads()
        return reloaded

    def _checkReloads(self) -> None:
        output = self.output()
        for since, reloaded in list(self._reloads):
            outcome = _reloadOutcome(output, since)
            if outcome is None:
                continue
            self._reloads.remove((since, reloaded))
            if isinstance(outcome, int):
                reloaded.callback(outcome)
            else:
                reloaded.errback(ReloadError(outcome))

    def processEnded(self, reason: Failure) -> None:
        self.ended = reason
        if not self.ready.called:
            self.ready.errback(
                PoolStartError(f"maccept exited before it was ready:\n{self._tail()}")
            )
        reloads, self._reloads = self._reloads, []
        for _, reloaded in reloads:
            reloaded.errback(
                ReloadError(f"maccept exited before the reload ended:\n{self._tail()}")
            )
        waiters, self._endWaiters = self._endWaiters, []
        for waiter in waiters:
            waiter.callback(None)

    def _tail(self) -> str:
        return "\n".join(self.output().splitlines()[-20:])

    def signalServing(self, signum: int) -> None:
        """
        Send C{signum} to the parent serving now, if any is left.
        """
        serving = self.servingPid()
        # Not to the parent started once it has been reaped: its pid may be
        # another process's by now.
        reaped = self.transport.pid is None  # type: ignore[union-attr]
        if self.ended is None and not (serving == self.pid and reaped):
            with contextlib.suppress(ProcessLookupError):  # exited; its workers leaving
                os.kill(serving, signum)

    def whenEnded(self) -> defer.Deferred[None]:
        """
        Fire once the parent has exited and no process of its group is
        left: workers killed with the group may outlive it by a moment.
        """
        if self._gone is None:
            if self.ended is not None:
                parentEnded: defer.Deferred[None] = defer.succeed(None)
            else:
                parentEnded = defer.Deferred()
                self._endWaiters.append(parentEnded)
            self._gone = parentEnded.addCallback(lambda _: self._groupGone())
        d: defer.Deferred[None] = defer.Deferred()
        self._gone.addCallback(lambda _: d.callback(None))
        return d

    #: Seconds the pool's process group may take to empty once its parent
    #: has exited (the workers follow it at once), before what is left is
    #: killed: children a worker started and left behind.
    lingering = 2.0

    def _groupGone(self, within: float = 10.0) -> defer.Deferred[None]:
        """
        Fire once the pool's process group is empty: so that a test leaves
        no process, what a worker started and left behind is killed after
        L{lingering} seconds.
        """
        gone: defer.Deferred[None] = defer.Deferred()
        started = self.reactor.seconds()
        killed = False

        def check() -> None:
            nonlocal killed
            elapsed = self.reactor.seconds() - started
            if not groupMembers(self.pid) or elapsed > within:
                gone.callback(None)
                return
            if elapsed >= self.lingering and not killed:
                killed = True
                with contextlib.suppress(OSError):  # gone, or not ours to kill
                    os.killpg(self.pid, signal.SIGKILL)
            self.reactor.callLater(0.02, check)

        check()
        return gone

    def stop(self, timeout: float) -> defer.Deferred[None]:
        if self.ended is None:
            # The parent serving now: after a USR2 upgrade, the new one
            # (a TERM to the old one before it takes over stops both).
            self.signalServing(signal.SIGTERM)
            killer = self.reactor.callLater(timeout, self._kill)
            d = self.whenEnded()
            d.addBoth(lambda result: (killer.active() and killer.cancel(), result)[1])
            return d
        # Ended already (killed, say): what it left behind goes all the same.
        return self.whenEnded()

    def _kill(self) -> None:
        if self.ended is None:
            # The parent's own process group holds its workers too, and a
            # new parent an upgrade started.
            with contextlib.suppress(OSError):  # gone meanwhile
                os.killpg(self.pid, signal.SIGKILL)


def _namesGracefulTimeout(arg: str) -> bool:
    # getopt takes any unambiguous prefix: --graceful 5, --graceful-t=5.
    name = arg.partition("=")[0]
    return len(name) > 3 and "--graceful-timeout".startswith(name)


#: The pool's --graceful-timeout unless a test sets its own.
TEST_GRACEFUL_TIMEOUT = 1


def _listenedOn(listen: Sequence[str], extraArgs: Sequence[str]) -> list[str]:
    """
    Every C{--listen} description, in the order the parent shows them.
    """
    descriptions = list(listen)
    args = iter(extraArgs)
    for arg in args:
        if arg in ("--listen", "-l"):
            descriptions.append(next(args, ""))
        elif arg.startswith("--listen="):
            descriptions.append(arg.partition("=")[2])
        elif arg.startswith("-l"):  # -lDESCRIPTION, as getopt takes it
            descriptions.append(arg[2:])
    return descriptions


def startPool(
    protocol: str = "echo",
    workers: int = 1,
    extraArgs: Sequence[str] = (),
    reactor: Any = None,
    timeout: float = 30.0,
    listen: Sequence[str] = ("tcp:0:interface=127.0.0.1",),
) -> defer.Deferred[RunningPool]:
    """
    Start C{twistd -n maccept} serving C{protocol} with C{workers} workers
    on C{listen} (by default an ephemeral port of 127.0.0.1); fire with a
    L{RunningPool} once every worker accepts, or fail with
    L{PoolStartError}.

    C{extraArgs} are more C{maccept} options (C{--timeout}, C{--balance},
    ...).  Unless they set C{--graceful-timeout}, it is 1 s, not 30: a test
    that fails with a client still connected should not wait half a minute
    to stop its pool.  The child sees this process's C{sys.path}, so a
    protocol module the test can import, the pool can import too.

    Cancelling the returned Deferred (C{addTimeout}, say) kills the pool
    and fails it with C{CancelledError} once no process is left.  Trial's
    own test timeout does not cancel it: keep C{timeout} below the test's.
    """
    if isinstance(listen, str):
        listen = (listen,)
    if reactor is None:
        from twisted.internet import reactor as installed

        reactor = installed
    process = _PoolProcess(reactor)
    args = [sys.executable, "-c", _TWISTD, "-n", "--pidfile=", "maccept"]
    for description in listen:
        args += ["--listen", description]
    args += ["--workers", str(workers)]
    args += ["--protocol", protocol, *extraArgs]
    if not any(_namesGracefulTimeout(arg) for arg in extraArgs):
        args += ["--graceful-timeout", str(TEST_GRACEFUL_TIMEOUT)]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [p for p in sys.path if p] + [env.get("PYTHONPATH", "")]
    ).rstrip(os.pathsep)
    env["PYTHONUNBUFFERED"] = "1"
    env[TEST_PROCESS] = str(os.getpid())
    reactor.spawnProcess(process, sys.executable, args, env=env, childFDs={0: "w", 1: "r", 2: "r"})

    def timedOut() -> None:
        if not process.ready.called:
            process.ready.errback(
                PoolStartError(f"not ready within {timeout:.0f}s:\n{process._tail()}")
            )
            process.stop(0)

    timer = reactor.callLater(timeout, timedOut)

    def started(addresses: list[Any]) -> RunningPool:
        timer.cancel()
        for n, description in enumerate(_listenedOn(listen, extraArgs)[: len(addresses)]):
            if endpointType(description) in DATAGRAM_TYPES:
                addresses[n] = type(addresses[n])("UDP", addresses[n].host, addresses[n].port)
        return RunningPool(process, addresses)

    def failed(failure: Failure) -> defer.Deferred[RunningPool]:
        if timer.active():
            timer.cancel()
        # Wait for the process to be gone, so nothing is left behind.
        return process.whenEnded().addCallback(lambda _: failure)

    return process.ready.addCallbacks(started, failed)


def _reloadOutcome(output: str, since: int) -> int | str | None:
    """
    How the first reload logged after offset C{since} ended: its generation,
    or why it did not (a line of the parent's); C{None} while it runs.  A
    reload queued behind another is the one whose generation starts after
    C{since}, not the one that was running.
    """
    started = _RELOAD_STARTS.search(output, since)
    if started is None:
        return None
    if started.group(2) is not None:
        return started.group(2).strip()
    generation = int(started.group(1))
    ready = output.find(_RELOADED.format(generation=generation), started.end())
    # A failure is this reload's only before the next one starts (a reload
    # queued behind it starts as this one is ready, before its old workers
    # have all stopped accepting, and may fail at once).
    following = output.find("reloading: starting generation", started.end())
    failed = _RELOAD_FAILED.search(
        output, started.end(), following if following >= 0 else len(output)
    )
    if failed is not None and (ready < 0 or failed.start() < ready):
        return failed.group(0).strip()
    return generation if ready >= 0 else None


def _address(shown: str) -> Any:
    """
    A listener's address as the parent's ready line shows it: C{HOST:PORT},
    C{[HOST]:PORT}, or a UNIX socket's path.
    """
    if shown.startswith("["):
        host, _, port = shown[1:].rpartition("]:")
        return IPv6Address("TCP", host, int(port))
    host, colon, port = shown.rpartition(":")
    if colon and port.isdigit() and not shown.startswith(("/", "@")):
        return IPv4Address("TCP", host, int(port))
    return UNIXAddress(shown)


def groupMembers(pgid: int) -> list[int]:
    """
    Live processes in process group C{pgid}.
    """
    return sorted(member for member, _, group in liveProcesses() if group == pgid)
