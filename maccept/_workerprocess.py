# -*- test-case-name: tests.test_pool -*-
"""
One worker process as the parent sees it: its state, its output, its
control channel, and how it ended.
"""

from __future__ import annotations

import contextlib
import signal
from collections import deque
from typing import TYPE_CHECKING, Any

from twisted.internet import defer, error
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger
from twisted.protocols import amp
from twisted.python.failure import Failure

from maccept._logforward import LineLogger, reemit, workerSystem
from maccept._procfs import isStopped, residentBytes
from maccept._states import WorkerState, nextWorkerState
from maccept._wire import (
    STATS,
    Drain,
    Farewell,
    Heartbeat,
    LogEvent,
    QuietAMP,
    ReplaceMe,
    WorkerFailed,
    WorkerReady,
)

if TYPE_CHECKING:
    from maccept._pool import WorkerPool


def describeExit(reason: Failure) -> str:
    """
    Say how a process ended: C{exit code 3}, C{signal 9 (SIGKILL)}.
    """
    value = reason.value
    if isinstance(value, error.ProcessTerminated) and value.signal is not None:
        try:
            name = signal.Signals(value.signal).name
        except ValueError:
            name = "unknown"
        return f"signal {value.signal} ({name})"
    code = getattr(value, "exitCode", None)
    return f"exit code {code if code is not None else 0}"


class WorkerProcess(ProcessProtocol):
    """
    One worker process.

    @ivar stopReason: why the parent asked this worker to go (C{reload},
        C{scale}, C{recycle}, C{watchdog}, C{stop}, C{abandoned}: its
        generation failed to start), or C{None} while it has not: a worker
        that exits with no stop reason crashed (unless it was signalled).
    @ivar replaces: the worker this one takes over from once ready.
    @ivar readyAt: when it reported ready, or C{None} while it has not.
    """

    log = Logger()

    #: How many of a worker's last stderr lines its death notice repeats.
    lastWordsKept = 5

    def __init__(self, pool: WorkerPool, number: int, generation: int, startedAt: float) -> None:
        self.pool = pool
        self.number = number
        self.generation = generation
        self.startedAt = startedAt
        self.state = WorkerState.STARTING
        self.pid: int | None = None
        self.control: amp.AMP | None = None
        self.failureReason: str | None = None
        self.exitDescription: str | None = None
        #: It exited with status 0 (not killed, no error).
        self.exitedCleanly = False
        self.stopReason: str | None = None
        #: It received SIGTERM on its own and drains (see L{WorkerPool.replaceSignalled}).
        self.signalled = False
        self.replaces: WorkerProcess | None = None
        self.lastHeartbeat = startedAt
        self.readyAt: float | None = None
        #: Resident bytes as it got ready, before it served anything (read
        #: only with C{--max-memory}).
        self.freshMemory: int | None = None
        self.declaredHung = False
        #: Scaling down took it out of the pool while it was leaving anyway
        #: (hung, or told to stop by a signal of its own): no one replaces it.
        self.leavesPool = False
        # Zero for every counter a worker reports (see L{STATS}).
        self.stats: dict[str, Any] = {
            name.decode(): 0.0 if isinstance(argument, amp.Float) else 0 for name, argument in STATS
        }
        self.lastWords: deque[str] = deque(maxlen=self.lastWordsKept)
        self._killCalls: list[IDelayedCall] = []
        #: The process has exited (its pipes may still be open).
        self.hasExited = False
        #: It answered a drain, having let go of the listeners, or exited.
        self.acceptsNoMore = False
        self._acceptingWaiters: list[defer.Deferred[None]] = []
        self._pipesTimer: IDelayedCall | None = None
        self._stdout = LineLogger(lambda line: self._emitLine(line, "info"))
        self._stderr = LineLogger(self._stderrLine)

    #: Seconds between a worker's stack dump (C{USR1}) and its kill: a hung
    #: one (the watchdog's), or one that outlived its drain.
    stackDumpGrace = 1.0
    #: Seconds from a worker's exit to closing its output pipes, should a
    #: child of its own still hold them (see L{processExited}).
    pipesGrace = 1.0

    def __repr__(self) -> str:
        return f"<worker {self.number} pid {self.pid} {self.state.value}>"

    @property
    def system(self) -> str:
        return workerSystem(self.number, self.pid or 0)

    def handle(self, event: str) -> WorkerState:
        """
        Move to the state C{event} leads to (see L{maccept._states}).
        """
        self.state = nextWorkerState(self.state, event)
        return self.state

    # ProcessProtocol

    def connectionMade(self) -> None:
        self.pid = self.transport.pid  # type: ignore[union-attr]
        self.transport.closeStdin()  # type: ignore[union-attr]

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        if childFD == 1:
            self._stdout.dataReceived(data)
        elif childFD == 2:
            self._stderr.dataReceived(data)

    def processExited(self, reason: Failure) -> None:
        """
        The worker is gone; Twisted says it ended (L{processEnded}) only once
        its output pipes close too, and a child it started that inherited
        them (C{subprocess.Popen}) may hold them open for as long as it
        runs: the pool would wait on a dead worker, not replace it, and
        never finish a stop.  So the pipes are closed, a moment after the
        exit, for the worker's last lines to be read first.
        """
        self.hasExited = True
        self._noLongerAccepts()
        self._cancelKillCalls()  # nothing left to dump or kill
        self._pipesTimer = self.pool.reactor.callLater(self.pipesGrace, self._closePipes)

    def _cancelKillCalls(self) -> None:
        for call in self._killCalls:
            if call.active():
                call.cancel()
        self._killCalls = []

    def _closePipes(self) -> None:
        self._pipesTimer = None
        for childFD in (1, 2):
            self.transport.closeChildFD(childFD)  # type: ignore[union-attr]

    def processEnded(self, reason: Failure) -> None:
        if self._pipesTimer is not None and self._pipesTimer.active():
            self._pipesTimer.cancel()
        self._pipesTimer = None
        self._stdout.flush()
        self._stderr.flush()
        self._cancelKillCalls()
        self._noLongerAccepts()
        self.exitDescription = describeExit(reason)
        self.exitedCleanly = reason.check(error.ProcessDone) is not None
        self.handle("exit")
        self.pool.workerEnded(self)

    def _emitLine(self, line: str, level: str) -> None:
        getattr(self.log, level)("{line}", line=line, log_system=self.system)

    def _stderrLine(self, line: str) -> None:
        if line.strip():
            self.lastWords.append(line)
        self._emitLine(line, "warn")

    @property
    def shownState(self) -> WorkerState:
        """
        The state to report: a worker that received SIGTERM on its own
        stopped accepting at once, though it stays C{READY} to the pool
        until its replacement is (the pool's bookkeeping of replacements
        keys on that).
        """
        if self.signalled and self.state is WorkerState.READY:
            return WorkerState.DRAINING
        return self.state

    # What the worker tells us.

    def ready(self) -> None:
        if self.handle("ready") is WorkerState.READY:
            self.lastHeartbeat = self.readyAt = self.pool.reactor.seconds()
            if self.pool.settings.maxMemory is not None and self.pid is not None:
                self.freshMemory = residentBytes(self.pid)
            self.pool.workerReady(self)

    def failed(self, reason: str) -> None:
        self.failureReason = reason

    def heartbeat(self, **stats: Any) -> None:
        self.lastHeartbeat = self.pool.reactor.seconds()
        # A worker of older code (a reload after a rollback) leaves out
        # the counters it does not know: they stay where they were.
        stats = {name: value for name, value in stats.items() if value is not None}
        if self not in self.pool.workers:
            # The process ended before the parent read its last reports.
            self.pool.lateReport(self, stats)
        self.stats.update(stats)

    def askedToBeReplaced(self, reason: str, signalled: bool = False) -> None:
        if signalled:
            self.signalled = True
            self.pool.replaceSignalled(self, why=reason)
        else:
            self.pool.replace(self, "recycle", why=reason)

    # What we do to the worker.

    def drain(self, reason: str, timeout: float, killAfter: float) -> None:
        """
        Ask the worker to stop accepting and finish within C{timeout}
        seconds; kill it if it is still alive C{killAfter} seconds later.
        """
        if self.state in (WorkerState.DRAINING, WorkerState.STOPPED):
            return
        self.stopReason = self.stopReason or reason
        self.handle("drain")
        if self.control is not None and self.control.transport is not None:
            answered = self.control.callRemote(Drain, timeout=timeout)
            # Lost with the channel: its exit says it then.
            answered.addCallbacks(lambda _: self._noLongerAccepts(), lambda _: None)
        else:
            self.signal("TERM")
        # Its stacks first, a second before the kill: what held it is then
        # in the log, whatever it was.
        dumpAt = max(0.0, timeout + killAfter - self.stackDumpGrace)
        self._killCalls.append(self.pool.reactor.callLater(dumpAt, self._dumpStacks))
        self.killAfter(
            timeout + killAfter,
            f"{timeout + killAfter:g}s after it was told to drain (--graceful-timeout {timeout:g}s"
            f" and {killAfter:g}s more)",
            causes="a start or stop hook that never finished, code that blocks its reactor, or"
            " a thread that keeps the process alive? (its stacks are above)",
        )

    def stoppedAccepting(self) -> defer.Deferred[None]:
        """
        Fires once the worker takes no more connections: it answered a
        drain (which it does once it has let go of the listeners), or it
        exited.
        """
        if self.acceptsNoMore:
            return defer.succeed(None)
        waiting: defer.Deferred[None] = defer.Deferred()
        self._acceptingWaiters.append(waiting)
        return waiting

    def _noLongerAccepts(self) -> None:
        self.acceptsNoMore = True
        waiting, self._acceptingWaiters = self._acceptingWaiters, []
        for each in waiting:
            each.callback(None)

    def _dumpStacks(self) -> None:
        if not self.hasExited:
            self.signal("USR1")

    def kill(self, reason: str) -> None:
        self.stopReason = self.stopReason or reason
        self.signal("KILL")

    def killAfter(self, delay: float, why: str = "", causes: str = "") -> None:
        """
        Kill the worker C{delay} seconds from now unless it has exited by
        then; the timer goes with the process.  C{why}, if given, is logged
        with the kill, and the likely C{causes} (unless the process is
        stopped, which is cause enough): a SIGKILL in the log should never
        be a mystery.
        """
        self._killCalls = [call for call in self._killCalls if call.active()]
        self._killCalls.append(self.pool.reactor.callLater(delay, self._killLate, why, causes))

    def _killLate(self, why: str, causes: str = "") -> None:
        if self.hasExited:
            return
        if causes and self.pid is not None and isStopped(self.pid):
            causes = "it is stopped (SIGSTOP, or a debugger), so it dumped no stacks"
        if why and self.state is not WorkerState.STOPPED:
            self.log.warn(
                "worker {number} still running {why}: {causes}killing it",
                number=self.number,
                why=why,
                causes=f"{causes}: " if causes else "",
            )
        self.signal("KILL")

    def signal(self, name: str) -> None:
        """
        Send signal C{SIG<name>}, if the process is still there.
        """
        number = signal.Signals[f"SIG{name}"].value
        with contextlib.suppress(error.ProcessExitedAlready, AttributeError):
            self.transport.signalProcess(number)  # type: ignore[union-attr]


class ParentControl(QuietAMP):
    """
    The parent's end of one worker's control channel.
    """

    def __init__(self, worker: WorkerProcess) -> None:
        super().__init__()
        self.worker = worker

    def connectionMade(self) -> None:
        super().connectionMade()
        self.worker.control = self

    @WorkerReady.responder
    def workerReady(self, pid: int) -> dict[str, Any]:
        self.worker.ready()
        return {}

    @WorkerFailed.responder
    def workerFailed(self, reason: str) -> dict[str, Any]:
        self.worker.failed(reason)
        return {}

    @Heartbeat.responder
    def heartbeat(self, **stats: Any) -> dict[str, Any]:
        self.worker.heartbeat(**stats)
        return {}

    @Farewell.responder
    def farewell(self, **stats: Any) -> dict[str, Any]:
        self.worker.heartbeat(**stats)
        return {}

    @ReplaceMe.responder
    def replaceMe(self, reason: str, signalled: bool | None = None) -> dict[str, Any]:
        self.worker.askedToBeReplaced(reason, bool(signalled))
        return {}

    @LogEvent.responder
    def logEvent(self, event: str) -> dict[str, Any]:
        # A sign of life too: heartbeats queue behind a busy worker's logs.
        self.worker.lastHeartbeat = self.worker.pool.reactor.seconds()
        reemit(event, self.worker.system)
        return {}
