# -*- test-case-name: tests.test_pool,tests.test_pool_supervision -*-
"""
The parent's rounds over its workers, every heartbeat interval (at most a
second; see L{beatInterval}): a worker that hangs,
never gets ready or grows past its memory cannot be trusted to say so
itself.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from maccept._procfs import residentBytes
from maccept._states import WorkerState
from maccept._workerprocess import WorkerProcess

if TYPE_CHECKING:
    from maccept._pool import WorkerPool


def beatInterval(watchdogTimeout: float) -> float:
    """
    How often workers report, and the watchdog looks at them: four times
    per C{--timeout}, at most once a second (once a second with none).
    """
    return min(1.0, watchdogTimeout / 4) if watchdogTimeout else 1.0


class Watchdog:
    """
    Kill a worker not ready within C{--start-timeout}; dump the stacks of
    one silent for C{--timeout}, then kill it (the pool starts another);
    replace one over C{--max-memory}.
    """

    log = Logger()

    #: Seconds between rounds (L{beatInterval}, set on L{start}).
    interval = 1.0

    def __init__(self, pool: WorkerPool) -> None:
        self.pool = pool
        self._loop = LoopingCall(self.tick)
        self._loop.clock = pool.reactor
        #: When the last round ran, and when the parent last came back
        #: from a stall of its own (see L{_parentStalled}).
        self._lastRound: float | None = None
        self._resumedAt = 0.0
        #: Generations told of that their workers start over --max-memory.
        self._freshOverLimit: set[int] = set()

    def start(self) -> None:
        # As often as workers beat: so that a stall of half the timeout
        # shows as a late round.
        self.interval = beatInterval(self.pool.settings.watchdogTimeout)
        self._lastRound = self.pool.reactor.seconds()
        self._loop.start(self.interval, now=False)

    def stop(self) -> None:
        if self._loop.running:
            self._loop.stop()

    def tick(self) -> None:
        """
        One round: every worker, each on its own (one that fails to be
        checked is logged, and the others are checked still).
        """
        now = self.pool.reactor.seconds()
        self._parentStalled(now)
        for worker in list(self.pool.workers):
            try:
                self._check(worker, now)
            except Exception:
                self.log.failure("checking worker {number}", number=worker.number)

    def _parentStalled(self, now: float) -> None:
        """
        Notice a round that comes late by half the watchdog timeout or more:
        the parent itself was stopped or stalled (a full log pipe, a paused
        VM, the clock stepped forward), and the heartbeats sent meanwhile
        wait unread in its control channels.  A worker's silence is then
        counted from now, or the parent would kill every healthy worker.
        Shorter delays cannot make a beating worker look silent for the
        whole timeout, since workers beat four times per timeout.  (A parent
        that stalls that long at every round would catch no hung worker:
        it is in no state to supervise, and says so each time.)
        """
        last, self._lastRound = self._lastRound, now
        timeout = self.pool.settings.watchdogTimeout
        if last is None or not timeout or now - last < max(2 * self.interval, timeout / 2):
            return
        self._resumedAt = now
        self.log.warn(
            "the parent itself did not run for {gap:.1f}s: counting the workers' silence"
            " (--timeout {timeout:g}) from now",
            gap=now - last,
            timeout=timeout,
        )

    def overdue(self, worker: WorkerProcess, now: float) -> float:
        """
        How long past its beat a serving worker's report is, once it has
        missed one whole: its reactor runs at least that late (a blocked
        one sends nothing to say so), where a report a little late is only
        the way there.  Zero for a worker not serving (starting, draining:
        one that said farewell reports no more), and while the parent's own
        rounds come late: the reports may wait unread in its channels.
        """
        if (
            worker.state is not WorkerState.READY
            or worker.signalled
            or self._lastRound is None
            or now - self._lastRound > 2 * self.interval
        ):
            return 0.0
        silence = self._silence(worker, now)
        return silence - self.interval if silence > 2 * self.interval else 0.0

    def _silence(self, worker: WorkerProcess, now: float) -> float:
        return now - max(worker.lastHeartbeat, self._resumedAt)

    def _check(self, worker: WorkerProcess, now: float) -> None:
        startTimeout = self.pool.startTimeout
        if worker.state is WorkerState.STARTING:
            if now - worker.startedAt > startTimeout and worker.failureReason is None:
                worker.failureReason = f"not ready within {startTimeout:g}s (--start-timeout)"
                worker.signal("KILL")
        elif not self._hung(worker, now):
            self._checkMemory(worker)

    def _hung(self, worker: WorkerProcess, now: float) -> bool:
        timeout = self.pool.settings.watchdogTimeout
        if not timeout or worker.declaredHung or worker.state is WorkerState.STOPPED:
            return False
        if worker.readyAt is None:
            # Drained while it started: still importing, say, and bounded
            # by its drain's deadline, not by silence.
            return False
        silent = self._silence(worker, now)
        if silent <= timeout:
            return False
        self.log.error(
            "worker {number} (pid {pid}) silent for {silent:.0f}s (--timeout {timeout:g}): "
            "dumping its stacks, then {outcome}",
            # One already leaving (drained by a reload, a scale, a stop) is
            # not replaced.
            outcome="replacing it" if worker.stopReason is None else "killing it",
            number=worker.number,
            pid=worker.pid,
            silent=silent,
            timeout=timeout,
        )
        worker.declaredHung = True
        # A draining worker keeps its reason: it is not to be replaced.
        worker.stopReason = worker.stopReason or "watchdog"
        worker.signal("USR1")
        worker.killAfter(worker.stackDumpGrace)
        return True

    def _checkMemory(self, worker: WorkerProcess) -> None:
        limit = self.pool.settings.maxMemory
        if limit is None or worker.pid is None or worker.state is not WorkerState.READY:
            return
        rss = residentBytes(worker.pid)
        if rss is None or rss <= limit:
            return
        if worker.freshMemory is not None and worker.freshMemory > limit:
            # Its replacement would start as large: replacing it would
            # never end.  (The start-up floor measures the parent, whose
            # size a worker's may exceed: its factory is made there.)
            if worker.generation not in self._freshOverLimit:
                self._freshOverLimit.add(worker.generation)
                self.log.error(
                    "worker {number} took {fresh} MiB as it started, over --max-memory "
                    "{limit} MiB: workers that start over it are not replaced for their "
                    "memory (raise --max-memory)",
                    number=worker.number,
                    fresh=f"{worker.freshMemory / 2**20:.1f}",
                    limit=f"{limit / 2**20:g}",
                )
            return
        self.pool.replace(
            worker,
            "recycle",
            why=f"resident memory {rss / 2**20:.1f} MiB over --max-memory {limit / 2**20:g} MiB",
        )
