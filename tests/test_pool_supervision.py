"""
The pool's supervision in its corners: reloads that fail, scaling while a
restart is pending, replacements that go wrong, processes that cannot be
started, and the timers that go with a worker; driven by a fake reactor
and clock, as in L{tests.test_pool}.
"""

from __future__ import annotations

import errno
import signal
from typing import Any

from twisted.logger import LogLevel, capturedLogs, formatEvent

from maccept import _pool, _watchdog, _workerprocess
from maccept._board import MAX_SLOTS, MAX_WORKERS
from maccept._pool import WorkerPool
from maccept._states import PoolState, WorkerState
from maccept._workerprocess import WorkerProcess
from tests.test_pool import PoolTestCase, texts


class SupervisionTestCase(PoolTestCase):
    def failSpawns(self, count: int = 1, after: int = 0) -> None:
        """
        Make C{count} calls to C{spawnProcess}, after the next C{after},
        fail as they do in a parent out of descriptors.
        """
        spawnProcess = self.reactor.spawnProcess
        calls = iter(range(after + count))

        def failing(*args: Any, **kwargs: Any) -> Any:
            if next(calls, None) in range(after, after + count):
                raise OSError(errno.EMFILE, "Too many open files")
            return spawnProcess(*args, **kwargs)

        self.reactor.spawnProcess = failing  # type: ignore[method-assign]

    def crashPending(self, pool: WorkerPool, number: int) -> None:
        """
        End worker C{number} as a young crash, so its restart waits.
        """
        self.process(self.workerIn(pool, number)).end(1)
        self.assertIn(number, [r.number for r in pool.pendingRestarts()])

    def numbers(self, pool: WorkerPool) -> list[int]:
        return sorted(w.number for w in pool.workers)

    def recycling(self) -> tuple[WorkerPool, WorkerProcess, WorkerProcess]:
        """
        A pool of two whose worker 2 reached --max-connections: the pool,
        that worker (serving on) and its replacement (starting).
        """
        pool = self.readyPool(2, maxConnections=100)
        serving = self.workerIn(pool, 2)
        serving.askedToBeReplaced("accepted 100 connections")
        [replacement] = [w for w in pool.workers if w.replaces is serving]
        return pool, serving, replacement


class RecycledDuringReloadTests(SupervisionTestCase):
    def test_recycleWaitsForTheReload(self) -> None:
        """
        A worker of the new generation that reaches --max-connections while
        its siblings still start is replaced once the reload is done: a
        reload needs its whole generation ready at once, which workers
        recycled as fast as they start would never be.
        """
        pool = self.readyPool(2, maxConnections=50)
        pool.reload()
        first, second = pool.ofGeneration(2)
        first.ready()
        first.askedToBeReplaced("accepted 50 connections")
        self.assertEqual(len(pool.ofGeneration(2)), 2)
        second.ready()
        self.assertEqual((pool.state, pool.generation), (PoolState.RUNNING, 2))
        [replacement] = [w for w in pool.workers if w.replaces is first]
        self.assertEqual(replacement.generation, 2)
        self.assertEqual(first.stopReason, "recycle")

    def test_recycleWaitingThenSignalled(self) -> None:
        """
        A worker whose recycle waits for the reload, then sent SIGTERM, has
        one successor, whether it leaves before its grace is over or after
        its replacement is ready.
        """
        for leavesAtOnce in (True, False):
            pool = self.readyPool(2, maxConnections=50)
            pool.reload()
            first, _ = pool.ofGeneration(2)
            first.ready()
            first.askedToBeReplaced("accepted 50 connections")
            first.askedToBeReplaced("it received SIGTERM", signalled=True)
            if leavesAtOnce:
                self.process(first).end(0)
                self.reactor.advance(_pool.SIGNAL_GRACE)
            else:
                self.reactor.advance(_pool.SIGNAL_GRACE)
                [replacement] = [w for w in pool.workers if w.replaces is first]
                replacement.ready()
                self.process(first).end(0)
            for worker in list(pool.ofGeneration(2)):
                if worker.state is WorkerState.STARTING:
                    worker.ready()
            for worker in pool.ofGeneration(1):
                self.process(worker).end(0)
            self.reactor.advance(_pool.SIGNAL_GRACE)
            self.assertEqual(sorted(w.number for w in pool.serving()), [1, 2], leavesAtOnce)

    def test_failedStartRetriedDuringReload(self) -> None:
        """
        A worker of the new generation that could not be started again
        (out of descriptors) is tried again while the reload still runs,
        so the reload can end.
        """
        pool = self.readyPool(2)
        pool.reload()
        first, second = pool.ofGeneration(2)
        first.ready()
        first.askedToBeReplaced("it received SIGTERM", signalled=True)
        self.process(first).end(0)
        self.failSpawns()
        self.reactor.advance(_pool.SIGNAL_GRACE)
        self.assertEqual([w for w in pool.ofGeneration(2) if w is not second], [])
        self.reactor.advance(pool.minRestartDelay)
        [again] = [w for w in pool.ofGeneration(2) if w is not second]
        again.ready()
        second.ready()
        self.assertEqual((pool.state, pool.generation), (PoolState.RUNNING, 2))

    def test_recycleDroppedWithAFailedReload(self) -> None:
        """
        If the reload fails instead, the recycle waiting for it goes with
        its generation.
        """
        pool = self.readyPool(2, maxConnections=50)
        pool.reload()
        first, second = pool.ofGeneration(2)
        first.ready()
        first.askedToBeReplaced("accepted 50 connections")
        self.process(second).end(1)
        for worker in pool.ofGeneration(2):
            self.process(worker).end(0)
        self.reactor.advance(pool.maxRestartDelay * 2)
        self.assertEqual(sorted(w.generation for w in pool.workers), [1, 1])


class AbandonedReloadTests(SupervisionTestCase):
    def test_readyNewWorkersDrained(self) -> None:
        """
        When a reload fails, new workers that are already ready (and may
        hold clients) drain gracefully; only those still starting are
        killed.
        """
        pool = self.readyPool(3)
        pool.reload()
        first, second, third = pool.ofGeneration(2)
        first.ready()
        self.process(second).end(1)
        self.assertEqual(self.process(first).signals, [signal.SIGTERM])
        self.assertIs(first.state, WorkerState.DRAINING)
        self.assertEqual(self.process(third).signals, [signal.SIGKILL])
        self.assertIs(pool.state, PoolState.RUNNING)

    def test_generationNotReused(self) -> None:
        """
        The next reload starts a generation of its own: a worker of the
        failed one, still draining, plays no part in it.
        """
        pool = self.readyPool(2)
        pool.reload()
        ready, dying = pool.ofGeneration(2)
        ready.ready()
        self.process(dying).end(1)
        pool.reload()
        self.assertEqual(pool.pendingGeneration, 3)
        self.process(ready).end(1)
        self.assertIs(pool.state, PoolState.RELOADING)
        for worker in pool.ofGeneration(3):
            worker.ready()
        self.assertIs(pool.state, PoolState.RUNNING)
        self.assertEqual(pool.generation, 3)


class ScaleDownTests(SupervisionTestCase):
    def test_pendingRestartCancelledFirst(self) -> None:
        """
        A worker waiting out its restart delay is a member of the pool and
        the cheapest to take out: the restart is cancelled, and the worker
        that serves is left alone.
        """
        pool = self.readyPool(2)
        first = self.workerIn(pool, 1)
        self.crashPending(pool, 2)
        pool.scaleDown()
        self.assertEqual(pool.size, 1)
        self.assertIs(first.state, WorkerState.READY)
        self.assertEqual(self.process(first).signals, [])
        self.assertEqual(self.delays(), [])
        self.reactor.advance(pool.maxRestartDelay)
        self.assertEqual(len(self.reactor.processes), 2)

    def test_nothingServing(self) -> None:
        """
        With every worker waiting for its restart, scaling down cancels one
        restart: one worker comes back, for a pool of one.
        """
        pool = self.readyPool(2)
        self.crashPending(pool, 1)
        self.crashPending(pool, 2)
        pool.scaleDown()
        self.assertEqual(pool.size, 1)
        self.reactor.advance(pool.maxRestartDelay)
        self.assertEqual(self.numbers(pool), [1])

    def test_hungWorkerIsTheVictim(self) -> None:
        """
        A worker the watchdog is killing is taken out first: it is not
        restarted, and the healthy workers go on serving.
        """
        pool = self.readyPool(3, watchdogTimeout=3.0)
        self.reactor.pump([1.0] * 2)
        for number in (1, 3):
            self.workerIn(pool, number).heartbeat()
        self.reactor.pump([1.0] * 2)
        hung = self.workerIn(pool, 2)
        self.assertEqual(hung.stopReason, "watchdog")
        with capturedLogs() as events:
            pool.scaleDown()
        self.assertEqual(pool.size, 2)
        self.assertIn(
            "scaling down to 2 workers: worker 2, leaving already, is not replaced", texts(events)
        )
        for number in (1, 3):
            self.assertIs(self.workerIn(pool, number).state, WorkerState.READY)
            self.assertEqual(self.process(self.workerIn(pool, number)).signals, [])
        self.process(hung).end(signal=signal.SIGKILL)
        self.reactor.advance(pool.maxRestartDelay)
        self.assertEqual(self.numbers(pool), [1, 3])
        self.assertEqual(pool.restarts["watchdog"], 1)

    def test_everyWorkerHung(self) -> None:
        """
        With every worker hung, scaling down takes one out; the others are
        restarted when the watchdog has killed them.
        """
        pool = self.readyPool(3, watchdogTimeout=3.0)
        self.reactor.advance(4.0)
        pool.scaleTo(1)
        self.assertEqual(pool.size, 1)
        for worker in list(pool.workers):
            self.process(worker).end(signal=signal.SIGKILL)
        self.reactor.advance(pool.maxRestartDelay)
        self.assertEqual(self.numbers(pool), [1])

    def test_signalledWorkerIsTheVictim(self) -> None:
        """
        So is a worker that received SIGTERM on its own: its replacement,
        due after the signal's grace, is not started.
        """
        pool = self.readyPool(2)
        leaving = self.workerIn(pool, 1)
        leaving.askedToBeReplaced("received SIGTERM", signalled=True)
        pool.scaleDown()
        self.assertEqual(pool.size, 1)
        self.assertEqual(self.process(self.workerIn(pool, 2)).signals, [])
        self.reactor.advance(1.0)
        self.assertEqual(self.numbers(pool), [1, 2])
        self.process(leaving).end(0)
        self.reactor.advance(pool.maxRestartDelay)
        self.assertEqual(self.numbers(pool), [2])
        self.assertIs(self.workerIn(pool, 2).state, WorkerState.READY)

    def test_signalledWorkerWithReplacementIsTheVictim(self) -> None:
        """
        Once its replacement has started, a signalled worker is still the
        one taken out: the replacement is stopped, and the healthy worker
        goes on serving.
        """
        pool = self.readyPool(2)
        leaving = self.workerIn(pool, 1)
        leaving.askedToBeReplaced("received SIGTERM", signalled=True)
        self.reactor.advance(_pool.SIGNAL_GRACE)
        [replacement] = [w for w in pool.workers if w.replaces is leaving]
        pool.scaleDown()
        self.assertEqual(pool.size, 1)
        healthy = self.workerIn(pool, 2)
        self.assertIs(healthy.state, WorkerState.READY)
        self.assertEqual(self.process(healthy).signals, [])
        self.assertEqual(replacement.stopReason, "scale")
        self.process(replacement).end(0)
        self.process(leaving).end(0)
        self.reactor.advance(pool.maxRestartDelay)
        self.assertEqual(pool.workers, [healthy])

    def test_recycledWorkerBeforeHigherNumbers(self) -> None:
        """
        So is a worker being recycled (its replacement starting), though
        others have higher numbers: it is leaving anyway.
        """
        pool = self.readyPool(3)
        recycled = self.workerIn(pool, 1)
        pool.replace(recycled, "recycle", why="it accepted 100 connections")
        [replacement] = [w for w in pool.workers if w.replaces is recycled]
        pool.scaleDown()
        self.assertEqual(pool.size, 2)
        self.assertIs(recycled.state, WorkerState.DRAINING)
        self.assertEqual(replacement.stopReason, "scale")
        for number in (2, 3):
            self.assertIs(self.workerIn(pool, number).state, WorkerState.READY)
            self.assertEqual(self.process(self.workerIn(pool, number)).signals, [])

    def test_signalledWorkerTakenOutOnce(self) -> None:
        """
        A signalled worker taken out of the pool is no longer a member: the
        next step down drains another worker, so each step takes one.
        """
        pool = self.readyPool(3)
        leaving = self.workerIn(pool, 3)
        leaving.askedToBeReplaced("received SIGTERM", signalled=True)
        pool.scaleTo(1)
        self.assertEqual(pool.size, 1)
        self.assertIs(self.workerIn(pool, 2).state, WorkerState.DRAINING)
        self.assertEqual([w.number for w in pool.serving()], [1])
        self.process(leaving).end(0)
        self.reactor.advance(1.0)
        self.assertEqual([w.number for w in pool.serving()], [1])

    def test_signalledWorkerNotRecycledForMemory(self) -> None:
        """
        Nor is a taken-out worker replaced for its memory while it drains.
        """
        pool = self.readyPool(2, maxMemory=2**30)
        leaving = self.workerIn(pool, 2)
        self.patch(_watchdog, "residentBytes", lambda pid: 2**31 if pid == leaving.pid else 1)
        leaving.askedToBeReplaced("received SIGTERM", signalled=True)
        pool.scaleDown()
        pool.watchdog.tick()
        self.assertEqual(self.numbers(pool), [1, 2])
        self.assertEqual(len(self.reactor.processes), 2)

    def test_replacedForMemoryOnceGrown(self) -> None:
        """
        A worker that grows past C{--max-memory} is replaced, the reason
        in tenths of a MiB.
        """
        sizes = {"now": 100 * 2**20}
        self.patch(_workerprocess, "residentBytes", lambda pid: sizes["now"])
        self.patch(_watchdog, "residentBytes", lambda pid: sizes["now"])
        pool = self.readyPool(1, maxMemory=200 * 2**20)
        pool.watchdog.tick()
        self.assertEqual(len(self.reactor.processes), 1)
        sizes["now"] = 250 * 2**20 + 2**19
        with capturedLogs() as events:
            pool.watchdog.tick()
        self.assertEqual(len(self.reactor.processes), 2)
        self.assertIn(
            "resident memory 250.5 MiB over --max-memory 200 MiB", " ".join(texts(events))
        )

    def test_notReplacedForMemoryItStartedWith(self) -> None:
        """
        A worker already over C{--max-memory} as it got ready is not
        replaced for it (its replacement would start as large, and be
        replaced in turn, without end): said once per generation, as an
        error.
        """
        self.patch(_workerprocess, "residentBytes", lambda pid: 60 * 2**20)
        self.patch(_watchdog, "residentBytes", lambda pid: 61 * 2**20)
        pool = self.readyPool(2, maxMemory=50 * 2**20)
        with capturedLogs() as events:
            for _ in range(3):
                pool.watchdog.tick()
        self.assertEqual(len(self.reactor.processes), 2)
        [line] = [e for e in events if "as it started" in formatEvent(e)]
        self.assertEqual(line["log_level"], LogLevel.error)
        self.assertIn("took 60.0 MiB as it started, over --max-memory 50 MiB", formatEvent(line))

    def test_signalledWorkerGoneAlready(self) -> None:
        """
        A signalled worker with no connection to finish leaves before its
        replacement is due; scaling down then cancels that replacement
        instead of draining a healthy worker.
        """
        pool = self.readyPool(3)
        leaving = self.workerIn(pool, 1)
        leaving.askedToBeReplaced("received SIGTERM", signalled=True)
        self.process(leaving).end(0)
        pool.scaleDown()
        self.assertEqual(pool.size, 2)
        self.reactor.advance(1.0)
        self.assertEqual(self.numbers(pool), [2, 3])
        for number in (2, 3):
            self.assertIs(self.workerIn(pool, number).state, WorkerState.READY)

    def test_exitSeenThoughAChildHoldsThePipes(self) -> None:
        """
        A worker that exits while a child of its own (C{subprocess.Popen})
        holds its output pipes is seen gone a moment after its exit: its
        pipes are closed, the crash is logged, and it is restarted.
        """
        pool = self.readyPool(2)
        worker = self.workerIn(pool, 2)
        process = self.process(worker)
        with capturedLogs() as events:
            process.exitHoldingPipes(3)
            self.assertIn(worker, pool.workers)  # its last lines may follow
            self.reactor.advance(WorkerProcess.pipesGrace)
        self.assertEqual(process.closedChildFDs[-2:], [1, 2])
        self.assertNotIn(worker, pool.workers)
        self.assertIn("exit code 3", " ".join(texts(events)))
        self.reactor.advance(5)
        self.assertEqual(len(self.reactor.processes), 3)

    def test_startingReplacementDrainedFirst(self) -> None:
        """
        Once a signalled worker has left and its replacement is still
        starting, scaling down stops that replacement, which holds no
        connection yet, rather than draining a worker that serves.
        """
        pool = self.readyPool(3)
        leaving = self.workerIn(pool, 1)
        leaving.askedToBeReplaced("received SIGTERM", signalled=True)
        self.reactor.advance(_pool.SIGNAL_GRACE)
        [replacement] = [w for w in pool.workers if w.state is WorkerState.STARTING]
        self.process(leaving).end(0)
        pool.scaleDown()
        self.assertEqual(pool.size, 2)
        self.assertIs(replacement.state, WorkerState.DRAINING)
        for number in (2, 3):
            self.assertIs(self.workerIn(pool, number).state, WorkerState.READY)

    def test_scaleToStopsWhenRefused(self) -> None:
        """
        C{scaleTo} gives up once a step is refused, instead of trying for
        ever.
        """
        pool = self.readyPool(3)
        steps: list[int] = []

        def refuse() -> bool:
            steps.append(pool.size)
            return False

        pool.scaleDown = refuse  # type: ignore[method-assign]
        pool.scaleTo(1)
        self.assertEqual(steps, [3])
        self.assertEqual(pool.size, 3)

    def test_recycledWorkerIsTheVictim(self) -> None:
        """
        A replacement is never the victim: the worker it replaces is
        drained, and the replacement with it, leaving no worker behind that
        serves outside the pool's count.
        """
        pool = self.readyPool(2)
        first, old = self.workerIn(pool, 1), self.workerIn(pool, 2)
        old.askedToBeReplaced("accepted 100 connections")
        [new] = [w for w in pool.workers if w.replaces is old]
        pool.scaleDown()
        self.assertEqual(pool.size, 1)
        self.assertIs(old.state, WorkerState.DRAINING)
        self.assertIs(new.state, WorkerState.DRAINING)
        self.assertIs(first.state, WorkerState.READY)
        self.assertEqual(pool.serving(), [first])

    def test_recycledWorkerWithPendingReplacement(self) -> None:
        """
        When the replacement of the victim is waiting for its restart, that
        restart is cancelled with it.
        """
        pool = self.readyPool(2)
        old = self.workerIn(pool, 2)
        old.askedToBeReplaced("accepted 100 connections")
        [new] = [w for w in pool.workers if w.replaces is old]
        self.process(new).end(1)
        pool.scaleDown()
        self.assertIs(old.state, WorkerState.DRAINING)
        total = pool.settings.gracefulTimeout + pool.killTime
        self.assertEqual(self.delays(), [total - WorkerProcess.stackDumpGrace, total])
        self.process(old).end(0)
        self.reactor.advance(pool.maxRestartDelay)
        self.assertEqual(self.numbers(pool), [1])


class ScaleLimitTests(SupervisionTestCase):
    def test_scaleUpStopsAtMaxWorkers(self) -> None:
        """
        TTIN at L{MAX_WORKERS} is refused with a warning: no process starts
        and the size stays.
        """
        pool = self.readyPool(1)
        pool.size = MAX_WORKERS
        with capturedLogs() as events:
            pool.scaleUp()
        self.assertEqual((pool.size, len(self.reactor.processes)), (MAX_WORKERS, 1))
        self.assertIn(
            f"scaling ignored: the pool runs at most {MAX_WORKERS} workers", texts(events)
        )


class ReplacementTests(SupervisionTestCase):
    def test_replacementLeftBeforeReady(self) -> None:
        """
        If a replacement leaves, not crashing, before it is ready, the old
        worker serves on as a member and can be replaced again.
        """
        pool = self.readyPool(2)
        old = self.workerIn(pool, 2)
        old.askedToBeReplaced("accepted 100 connections")
        [new] = [w for w in pool.workers if w.replaces is old]
        new.drain("scale", 1.0, 1.0)
        self.process(new).end(0)
        self.assertIsNone(old.stopReason)
        self.assertIn(old, pool.serving())
        old.askedToBeReplaced("accepted 100 connections")
        self.assertEqual(next(w for w in pool.workers if w.replaces is old).number, 2)

    def test_recycledWorkerDiesWhileReplacementWaits(self) -> None:
        """
        A worker whose replacement waits for its restart and that dies in
        the meantime is not restarted a second time: the replacement takes
        its place, replacing nobody.
        """
        pool = self.readyPool(2)
        old = self.workerIn(pool, 2)
        old.askedToBeReplaced("accepted 100 connections")
        [new] = [w for w in pool.workers if w.replaces is old]
        self.process(new).end(1)
        self.process(old).end(1)
        self.assertEqual(len(self.delays()), 1)
        self.reactor.advance(pool.maxRestartDelay)
        self.assertEqual(self.numbers(pool), [1, 2])
        self.assertIsNone(self.workerIn(pool, 2).replaces)

    def test_requestWhileStartingKept(self) -> None:
        """
        A worker that asks to be replaced while a sibling is still starting
        is replaced once the pool runs.
        """
        pool = self.startPool(2, maxConnections=10)
        first, second = pool.workers
        first.ready()
        first.askedToBeReplaced("accepted 10 connections")
        self.assertEqual(len(self.reactor.processes), 2)
        second.ready()
        self.assertIs(pool.state, PoolState.RUNNING)
        [new] = [w for w in pool.workers if w.replaces is first]
        self.assertEqual(new.number, 1)
        self.assertEqual(first.stopReason, "recycle")

    def test_scaleUpSkipsPendingNumber(self) -> None:
        """
        A worker added while another waits for its restart does not take
        that one's number.
        """
        pool = self.readyPool(2)
        self.crashPending(pool, 2)
        pool.scaleUp()
        self.reactor.advance(pool.maxRestartDelay)
        self.assertEqual(self.numbers(pool), [1, 2, 3])


class SignalledWorkerTests(SupervisionTestCase):
    """
    A worker that receives SIGTERM on its own is replaced whatever the pool
    is doing: still starting, or reloading.
    """

    def readyAll(self, pool: WorkerPool) -> None:
        for worker in pool.workers:
            if worker.state is WorkerState.STARTING:
                worker.ready()

    def test_goneWhileStarting(self) -> None:
        """
        A ready worker signalled and gone while a sibling still starts is
        started again at once: the pool cannot run without it.
        """
        pool = self.startPool(2)
        first = pool.workers[0]
        first.ready()
        first.askedToBeReplaced("it received SIGTERM", signalled=True)
        self.process(first).end(0)
        self.reactor.advance(_pool.SIGNAL_GRACE)
        self.readyAll(pool)
        self.reactor.advance(pool.startTimeout)
        self.assertEqual(self.fatal, [])
        self.assertIs(pool.state, PoolState.RUNNING)
        self.assertEqual(self.numbers(pool), [1, 2])

    def test_drainsPastStart(self) -> None:
        """
        One that drains while the pool starts is replaced at once, and does
        not count as ready: the pool runs once its replacement accepts
        (it would have said "all 2 workers ready" with one accepting).
        """
        pool = self.startPool(2)
        first, second = pool.workers
        first.ready()
        first.askedToBeReplaced("it received SIGTERM", signalled=True)
        second.ready()
        self.assertIs(pool.state, PoolState.STARTING)
        self.reactor.advance(_pool.SIGNAL_GRACE)
        self.assertEqual(self.numbers(pool), [1, 1, 2])
        self.readyAll(pool)
        self.assertIs(pool.state, PoolState.RUNNING)
        self.assertEqual(len(pool.serving()), 2)
        self.process(first).end(0)
        self.assertEqual(self.numbers(pool), [1, 2])
        self.assertEqual(len(pool.serving()), 2)

    def test_leavesBeforeStart(self) -> None:
        """
        One that finishes draining before the pool runs is started again
        when it has gone.
        """
        pool = self.startPool(2)
        first = pool.workers[0]
        first.ready()
        first.askedToBeReplaced("it received SIGTERM", signalled=True)
        self.reactor.advance(_pool.SIGNAL_GRACE)
        self.process(first).end(0)
        self.readyAll(pool)
        self.reactor.advance(pool.startTimeout)
        self.assertEqual(self.fatal, [])
        self.assertIs(pool.state, PoolState.RUNNING)
        self.assertEqual(self.numbers(pool), [1, 2])

    def test_newGenerationDuringReload(self) -> None:
        """
        A worker of the generation a reload starts, signalled and gone, is
        started again, and the reload completes.
        """
        pool = self.readyPool(2)
        pool.reload()
        new = pool.ofGeneration(pool.pendingGeneration)[0]
        new.ready()
        new.askedToBeReplaced("it received SIGTERM", signalled=True)
        self.process(new).end(0)
        self.reactor.advance(_pool.SIGNAL_GRACE)
        self.readyAll(pool)
        self.assertIs(pool.state, PoolState.RUNNING)
        self.assertEqual(pool.generation, 2)
        self.assertEqual(sorted(w.number for w in pool.serving()), [1, 2])

    def test_scaleUpAfterSignalledLeft(self) -> None:
        """
        A worker added while a signalled worker's restart is due takes a
        number of its own.
        """
        pool = self.readyPool(3)
        leaving = self.workerIn(pool, 3)
        leaving.askedToBeReplaced("it received SIGTERM", signalled=True)
        self.process(leaving).end(0)
        pool.scaleUp()
        self.reactor.advance(_pool.SIGNAL_GRACE)
        self.assertEqual(self.numbers(pool), [1, 2, 3, 4])

    def test_scaleUpWhileHung(self) -> None:
        """
        So does a worker added while another is hung: the hung one is
        started again under its own number once killed.
        """
        pool = self.readyPool(3, watchdogTimeout=5.0)
        hung = self.workerIn(pool, 3)
        for worker in pool.workers:
            if worker is not hung:
                worker.lastHeartbeat = 1e9
        self.reactor.pump([1.0] * 6)
        self.assertEqual(hung.stopReason, "watchdog")
        pool.scaleUp()
        self.process(hung).end(signal=signal.SIGKILL)
        self.assertEqual(self.numbers(pool), [1, 2, 3, 4])


class SpawnFailureTests(SupervisionTestCase):
    def test_startFailsInOneLine(self) -> None:
        """
        A first worker that cannot be started (out of descriptors, an
        interpreter the --uid user may not run) ends the start-up with one
        line once the reactor runs, and the workers already started stop.
        """
        pool = self.makePool(3)
        spawnProcess = self.reactor.spawnProcess
        calls: list[None] = []

        def denied(*args: Any, **kwargs: Any) -> Any:
            calls.append(None)
            if len(calls) == 2:
                raise PermissionError(errno.EACCES, "Permission denied", "/opt/venv/bin/python")
            return spawnProcess(*args, **kwargs)

        self.reactor.spawnProcess = denied  # type: ignore[method-assign]
        pool.startService()
        self.assertEqual(self.fatal, [])
        self.reactor.run()
        self.assertEqual(
            self.fatal,
            ["cannot start worker 2: [Errno 13] Permission denied: '/opt/venv/bin/python'"],
        )
        self.assertIs(pool.state, PoolState.STOPPING)
        self.assertEqual(len(pool.workers), 1)

    def test_reloadAbandoned(self) -> None:
        """
        A reload whose workers cannot all be started is abandoned at once,
        with one line saying why; the old generation serves on, and the
        next reload is not refused.
        """
        pool = self.readyPool(2)
        spawned = len(self.reactor.processes)
        self.failSpawns(1, after=1)
        with capturedLogs() as events:
            pool.reload()
        self.assertIs(pool.state, PoolState.RUNNING)
        self.assertIsNone(pool.pendingGeneration)
        [started] = self.reactor.processes[spawned:]
        self.assertEqual(started.signals, [signal.SIGKILL])
        errors = [formatEvent(e) for e in events if e["log_level"] is LogLevel.error]
        self.assertEqual(
            errors,
            [
                "reload failed, keeping the old workers: "
                "cannot start worker 2: [Errno 24] Too many open files"
            ],
        )
        self.assertEqual(self.delays(), [])
        # Kept for systemd's STATUS= until a reload succeeds.
        self.assertEqual(
            pool.reloadFailure, "cannot start worker 2: [Errno 24] Too many open files"
        )
        pool.reload()
        self.assertIs(pool.state, PoolState.RELOADING)
        for worker in pool.ofGeneration(pool.pendingGeneration):
            worker.ready()
        self.assertIs(pool.state, PoolState.RUNNING)
        self.assertIsNone(pool.reloadFailure)

    def test_sizeObserved(self) -> None:
        """
        Observers hear each change of the pool's size, by scaling.
        """
        pool = self.readyPool(2)
        sizes: list[int] = []
        pool.sizeObservers.append(sizes.append)
        pool.scaleUp()
        pool.scaleDown()
        self.assertEqual(sizes, [3, 2])

    def test_restartRetried(self) -> None:
        """
        A restart that cannot start a process is tried again later, with
        the crash-loop backoff: the worker is not lost.
        """
        pool = self.readyPool(1)
        self.process(pool.workers[0]).end(1)
        self.failSpawns(1)
        with capturedLogs() as events:
            self.reactor.advance(pool.minRestartDelay)
        self.assertEqual(pool.workers, [])
        self.assertIn(
            "cannot restart worker 1: [Errno 24] Too many open files; trying again in 2s",
            texts(events),
        )
        self.reactor.advance(2.0)
        self.assertEqual(self.numbers(pool), [1])

    def test_watchdogRespawnRetried(self) -> None:
        """
        So is the restart of a worker killed by the watchdog.
        """
        pool = self.readyPool(1, watchdogTimeout=3.0)
        self.reactor.pump([1.0] * 4 + [WorkerProcess.stackDumpGrace])
        self.failSpawns(1)
        self.process(pool.workers[0]).end(signal=signal.SIGKILL)
        self.assertEqual(pool.workers, [])
        self.reactor.advance(pool.minRestartDelay)
        self.assertEqual(self.numbers(pool), [1])

    def test_scaleUpKeepsSize(self) -> None:
        """
        Scaling up counts the new worker only once it is started, and frees
        the load-board slot taken for it.
        """
        pool = self.readyPool(2, balance=True)
        self.failSpawns(1)
        pool.scaleUp()
        self.assertEqual(pool.size, 2)
        assert pool.board is not None
        self.assertEqual(pool.board.slotsInUse, 2)
        pool.scaleUp()
        self.assertEqual(pool.size, 3)
        self.assertEqual(self.numbers(pool), [1, 2, 3])

    def test_scaleToStopsOnFailure(self) -> None:
        """
        C{scaleTo} stops at the first worker it cannot start.
        """
        pool = self.readyPool(1)
        self.failSpawns(100)
        pool.scaleTo(5)
        self.assertEqual(pool.size, 1)

    def test_replaceKeepsTheOld(self) -> None:
        """
        A worker whose replacement cannot be started serves on, and may be
        replaced later.
        """
        pool = self.readyPool(1)
        [old] = pool.workers
        self.failSpawns(1)
        old.askedToBeReplaced("accepted 100 connections")
        self.assertIsNone(old.stopReason)
        old.askedToBeReplaced("accepted 100 connections")
        self.assertEqual(len(self.reactor.processes), 2)


class BoardFullTests(SupervisionTestCase):
    def test_reloadWithoutSlotsAbandoned(self) -> None:
        """
        A reload that finds every load board slot taken (by workers still
        draining from earlier reloads) is abandoned with the reason, as
        for any worker that cannot be started; the pool serves on.
        """
        pool = self.readyPool(2, balance=True)
        assert pool.board is not None
        for n in range(MAX_SLOTS):
            pool.launcher.boardSlots[object()] = n  # type: ignore[index]
        with capturedLogs() as events:
            pool.reload()
        self.assertIn("load board slots are taken", " ".join(texts(events)))
        self.assertIs(pool.state, PoolState.RUNNING)
        self.assertEqual(pool.generation, 1)


class CrashLoopTests(SupervisionTestCase):
    def test_neverReadyCountsAsYoung(self) -> None:
        """
        A worker that dies before it was ever ready is young, however long
        its start took: the delay still doubles.
        """
        pool = self.readyPool(1)
        self.process(pool.workers[0]).end(1)
        self.assertEqual(self.delays(), [1.0])
        self.reactor.advance(1.0)
        self.reactor.advance(pool.threshold * 5)
        self.process(pool.workers[0]).end(1)
        self.assertEqual(self.delays(), [2.0])


class WatchdogTimerTests(SupervisionTestCase):
    def test_killCancelledOnExit(self) -> None:
        """
        A hung worker that exits before its stack dump grace is over
        leaves no kill pending.
        """
        pool = self.readyPool(1, watchdogTimeout=3.0)
        [worker] = pool.workers
        self.reactor.pump([1.0] * 4)
        self.assertEqual(self.process(worker).signals, [signal.SIGUSR1])
        self.process(worker).end(signal=signal.SIGABRT)
        self.assertNotIn(WorkerProcess.stackDumpGrace, self.delays())

    def test_nothingPendingAfterStop(self) -> None:
        """
        Once a pool with hung workers has stopped, no timer is left.
        """
        pool = self.readyPool(2, watchdogTimeout=3.0)
        self.reactor.pump([1.0] * 4)
        d = pool.stopService()
        for worker in list(pool.workers):
            self.process(worker).end(0)
        self.successResultOf(d)
        self.assertEqual(self.reactor.getDelayedCalls(), [])


class SignalledCrossingTests(SupervisionTestCase):
    """
    A worker's own SIGTERM crossing what the pool already does with it
    (recycling, the watchdog, a scale-down, a failed spawn): the pool ends
    with the size asked for, and every leaving worker has a deadline.
    """

    def test_signalledReplacementCannotStart(self) -> None:
        """
        A worker sent SIGTERM drains itself whatever the parent does; if its
        replacement cannot be started (EMFILE), it must still be replaced
        once it has gone, not "serve on".
        """
        pool = self.readyPool(2)
        leaving = self.workerIn(pool, 2)
        leaving.askedToBeReplaced("it received SIGTERM", signalled=True)
        self.failSpawns(1)
        self.reactor.advance(_pool.SIGNAL_GRACE)
        # The worker finishes its connections and exits, as it was told to.
        self.process(leaving).end(0)
        self.reactor.advance(pool.maxRestartDelay * 2)
        self.assertEqual(self.numbers(pool), [1, 2])

    def test_recycledWorkerSignalledAndGone(self) -> None:
        """
        A worker being recycled (replacement starting) that then receives
        SIGTERM and leaves before the signal's grace is over is replaced
        once: by the replacement already starting.
        """
        pool, old, new = self.recycling()
        # Still accepting, so its SIGTERM handler asks for a replacement too.
        old.askedToBeReplaced("it received SIGTERM", signalled=True)
        self.process(old).end(0)
        self.reactor.advance(_pool.SIGNAL_GRACE)
        new.ready()
        self.assertEqual(self.numbers(pool), [1, 2])
        self.assertEqual(len(pool.serving()), pool.size)

    def test_drainedWorkerSignalledAndGone(self) -> None:
        """
        Same when SIGTERM reaches a worker whose replacement just became
        ready (the parent's Drain and the worker's ReplaceMe cross).
        """
        pool = self.readyPool(2)
        old = self.workerIn(pool, 2)
        old.askedToBeReplaced("accepted 100 connections")
        [new] = [w for w in pool.workers if w.replaces is old]
        new.ready()
        self.assertIs(old.state, WorkerState.DRAINING)
        old.askedToBeReplaced("it received SIGTERM", signalled=True)
        self.process(old).end(0)
        self.reactor.advance(_pool.SIGNAL_GRACE)
        self.assertEqual(self.numbers(pool), [1, 2])

    def test_hungWorkerSignalledAndKilled(self) -> None:
        """
        A worker the watchdog declared hung that still gets its SIGTERM
        handled (it asks to be replaced) before the watchdog's SIGKILL is
        started again once, not twice.
        """
        pool = self.readyPool(2, watchdogTimeout=3.0)
        hung = self.workerIn(pool, 2)
        self.workerIn(pool, 1).lastHeartbeat = 1e9
        self.reactor.pump([1.0] * 4)
        self.assertEqual(hung.stopReason, "watchdog")
        hung.askedToBeReplaced("it received SIGTERM", signalled=True)
        self.process(hung).end(signal=signal.SIGKILL)
        self.reactor.advance(_pool.SIGNAL_GRACE)
        self.assertEqual(self.numbers(pool), [1, 2])

    def test_scaleVictimSignalledAndGone(self) -> None:
        """
        A worker drained by TTOU whose own SIGTERM crossed the Drain is not
        started again: the pool stays at the size asked for.
        """
        pool = self.readyPool(3)
        victim = self.workerIn(pool, 3)
        pool.scaleDown()
        self.assertEqual(victim.stopReason, "scale")
        victim.askedToBeReplaced("it received SIGTERM", signalled=True)
        self.process(victim).end(0)
        self.reactor.advance(_pool.SIGNAL_GRACE)
        self.assertEqual(pool.size, 2)
        self.assertEqual(self.numbers(pool), [1, 2])

    def assertKilledAfterDeadline(self, pool: WorkerPool, leaving: WorkerProcess) -> None:
        """
        C{leaving} beats on (its reactor runs) but never exits (its
        workerStopping hook never ends): it is killed once the time for
        draining and killTime are over.
        """
        for _ in range(int(pool.settings.gracefulTimeout + pool.killTime) + 2):
            for worker in pool.workers:
                worker.heartbeat()
            self.reactor.advance(1.0)
        self.assertIn(signal.SIGKILL, self.process(leaving).signals)

    def test_signalledVictimKilledAfterGracefulTimeout(self) -> None:
        """
        A signalled worker taken out by TTOU (not replaced) is killed, as
        every drained worker is, if it is still there --graceful-timeout
        plus killTime later (a workerStopping hook that never finishes).
        """
        pool = self.readyPool(2)
        leaving = self.workerIn(pool, 2)
        leaving.askedToBeReplaced("it received SIGTERM", signalled=True)
        pool.scaleDown()
        self.assertKilledAfterDeadline(pool, leaving)

    def test_signalledReplacedKilledAfterGracefulTimeout(self) -> None:
        """
        For comparison, the ordinary path: once its replacement is ready a
        signalled worker gets the same deadline.
        """
        pool = self.readyPool(2)
        leaving = self.workerIn(pool, 2)
        leaving.askedToBeReplaced("it received SIGTERM", signalled=True)
        self.reactor.advance(_pool.SIGNAL_GRACE)
        [new] = [w for w in pool.workers if w.replaces is leaving]
        new.ready()
        self.assertKilledAfterDeadline(pool, leaving)

    def test_signalledWorkerDyingIsACrash(self) -> None:
        """
        A signalled worker that dies before its replacement is started (a
        segfault as it drains) crashed: it is counted so, and replaced once.
        """
        pool = self.readyPool(2)
        leaving = self.workerIn(pool, 2)
        leaving.askedToBeReplaced("it received SIGTERM", signalled=True)
        self.process(leaving).end(signal=signal.SIGSEGV)
        self.reactor.advance(_pool.SIGNAL_GRACE + pool.maxRestartDelay * 2)
        self.assertEqual((pool.restarts["crash"], pool.restarts["recycle"]), (1, 0))
        self.assertEqual(self.numbers(pool), [1, 2])

    def test_signalledWhileStartingInAStartingPool(self) -> None:
        """
        A worker sent SIGTERM while the pool starts leaves as asked (its
        start cut short) after the grace: it is started again, counted as a
        recycling, and the pool starts all the same, not failing for it.
        """
        pool = self.startPool(2)
        leaving = self.workerIn(pool, 2)
        leaving.askedToBeReplaced("it received SIGTERM", signalled=True)
        self.reactor.advance(_pool.SIGNAL_GRACE * 3)
        self.process(leaving).end(0)
        self.reactor.advance(_pool.SIGNAL_GRACE)
        self.assertEqual(self.fatal, [])
        self.assertEqual((pool.restarts["crash"], pool.restarts["recycle"]), (0, 1))
        self.assertEqual(self.numbers(pool), [1, 2])
        for worker in list(pool.workers):
            worker.ready()
        self.assertIs(pool.state, PoolState.RUNNING)

    def test_signalledWhileStartingIsARecycle(self) -> None:
        """
        A restarted worker sent SIGTERM before it is ready is started again
        once it has gone, at once: no crash, so no back-off.
        """
        pool = self.readyPool(2)
        self.process(self.workerIn(pool, 2)).end(signal=signal.SIGKILL)
        self.reactor.advance(pool.maxRestartDelay)
        restarted = self.workerIn(pool, 2)
        self.assertIs(restarted.state, WorkerState.STARTING)
        restarted.askedToBeReplaced("it received SIGTERM", signalled=True)
        self.reactor.advance(_pool.SIGNAL_GRACE * 3)
        self.assertEqual(self.numbers(pool), [1, 2])
        self.process(restarted).end(0)
        self.reactor.advance(_pool.SIGNAL_GRACE)
        again = self.workerIn(pool, 2)
        self.assertIsNot(again, restarted)
        self.assertEqual((pool.restarts["crash"], pool.restarts["recycle"]), (1, 1))
        again.ready()
        self.assertEqual(pool.serving(), [self.workerIn(pool, 1), again])

    def test_replacementSignalledWhileStarting(self) -> None:
        """
        The replacement of a worker being recycled, sent SIGTERM before it
        is ready, hands its task on: another replacement starts for the
        worker still serving, which drains once that one is ready.  The
        pool keeps its size (it grew by one for good before).
        """
        pool, serving, first = self.recycling()
        first.askedToBeReplaced("it received SIGTERM", signalled=True)
        self.reactor.advance(_pool.SIGNAL_GRACE * 3)
        self.process(first).end(0)
        self.reactor.advance(_pool.SIGNAL_GRACE)
        [second] = [w for w in pool.workers if w.replaces is serving]
        self.assertIs(serving.state, WorkerState.READY)
        second.ready()
        self.assertIs(serving.state, WorkerState.DRAINING)
        self.process(serving).end(0)
        self.assertEqual(self.numbers(pool), [1, 2])
        self.assertEqual(pool.serving(), [self.workerIn(pool, 1), second])

    def test_scaleUpWhileASuccessorIsDue(self) -> None:
        """
        A worker added while a replacement gone on its own SIGTERM has yet
        to hand its task on takes another number.
        """
        pool, serving, first = self.recycling()
        first.askedToBeReplaced("it received SIGTERM", signalled=True)
        self.process(first).end(0)
        pool.scaleUp()
        self.reactor.advance(_pool.SIGNAL_GRACE * 2)
        for worker in list(pool.workers):
            if worker.state is WorkerState.STARTING:
                worker.ready()
        self.process(serving).end(0)
        self.assertEqual(sorted(w.number for w in pool.serving()), [1, 2, 3])

    def test_signalledWorkerExitingIsARecycle(self) -> None:
        """
        One that finished draining and exited 0 left as asked.
        """
        pool = self.readyPool(2)
        leaving = self.workerIn(pool, 2)
        leaving.askedToBeReplaced("it received SIGTERM", signalled=True)
        self.process(leaving).end(0)
        self.reactor.advance(_pool.SIGNAL_GRACE)
        self.assertEqual((pool.restarts["crash"], pool.restarts["recycle"]), (0, 1))
        self.assertEqual(self.numbers(pool), [1, 2])
