# -*- test-case-name: tests.test_pool,tests.test_pool_supervision -*-
"""
The parent's rounds over its workers, once a second: a worker that hangs,
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


class Watchdog:
    """
    Kill a worker not ready within C{--start-timeout}; dump the stacks of
    one silent for C{--timeout}, then kill it (the pool starts another);
    replace one over C{--max-memory}.
    """

    log = Logger()

    interval = 1.0
    #: Seconds between the stack dump of a hung worker and its kill.
    stackDumpGrace = 1.0

    def __init__(self, pool: WorkerPool) -> None:
        self.pool = pool
        self._loop = LoopingCall(self.tick)
        self._loop.clock = pool.reactor

    def start(self) -> None:
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
        for worker in list(self.pool.workers):
            try:
                self._check(worker, now)
            except Exception:
                self.log.failure("checking worker {number}", number=worker.number)

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
        silent = now - worker.lastHeartbeat
        if silent <= timeout:
            return False
        self.log.error(
            "worker {number} (pid {pid}) silent for {silent:.0f}s (--timeout {timeout:g}): "
            "dumping its stacks, then replacing it",
            number=worker.number,
            pid=worker.pid,
            silent=silent,
            timeout=timeout,
        )
        worker.declaredHung = True
        # A draining worker keeps its reason: it is not to be replaced.
        worker.stopReason = worker.stopReason or "watchdog"
        worker.signal("USR1")
        worker.killAfter(self.stackDumpGrace)
        return True

    def _checkMemory(self, worker: WorkerProcess) -> None:
        limit = self.pool.settings.maxMemory
        if limit is None or worker.pid is None or worker.state is not WorkerState.READY:
            return
        rss = residentBytes(worker.pid)
        if rss is not None and rss > limit:
            self.pool.replace(
                worker,
                "recycle",
                why=f"resident memory {rss // 2**20} MiB over --max-memory {limit // 2**20} MiB",
            )
