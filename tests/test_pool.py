"""
The parent's pool: spawning, worker states, restart policy, start-up
failure, draining, replacement and reload, driven by a fake reactor and
clock; no process is started.
"""

from __future__ import annotations

import os
import random
import signal
import socket
import sys
from collections.abc import Sequence
from typing import Any, cast

from twisted.internet import defer
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.testing import StringTransport
from twisted.logger import (
    ILogObserver,
    LogEvent,
    Logger,
    LogLevel,
    capturedLogs,
    formatEvent,
)
from twisted.python.failure import Failure
from twisted.python.log import addObserver, removeObserver
from twisted.trial.unittest import SynchronousTestCase

from maccept import _workerprocess
from maccept._logforward import encodeEvent
from maccept._pool import PoolSettings, WorkerPool
from maccept._spawning import SAFE_PATH, absolutePythonPath, workerEnvironment
from maccept._states import PoolState, WorkerState
from maccept._wire import CONTROL_FD, Drain, ListenerHandle, WorkerSpec
from maccept._workerprocess import ParentControl, WorkerProcess, describeExit
from tests.fakes import (
    FakeControl,
    FakeProcess,
    ProcessMemoryReactor,
    fakeListeningSocket,
    pendingDelays,
)

EXECUTABLE = "/opt/maccept/bin/python3"

#: A step small enough to land just before a deadline, exact in binary.
EPSILON = 1 / 64


def texts(events: Sequence[LogEvent]) -> list[str]:
    """
    The text of each captured event.
    """
    return [formatEvent(event) for event in events]


class PoolTestCase(SynchronousTestCase):
    """
    Builds a pool on a L{ProcessMemoryReactor} and records its fatal calls.
    """

    def makePool(
        self,
        size: int = 2,
        listeners: list[Any] | None = None,
        **settings: Any,
    ) -> WorkerPool:
        self.reactor = ProcessMemoryReactor()
        self.fatal: list[str] = []
        settings.setdefault("balance", False)
        pool = WorkerPool(
            self.reactor,
            [fakeListeningSocket()] if listeners is None else listeners,
            PoolSettings(size=size, **settings),
            onFatal=self.fatal.append,
            executable=EXECUTABLE,
            rng=random.Random(7),
        )
        if pool.board is not None:
            self.addCleanup(pool.board.close)
        return pool

    def startPool(self, size: int = 2, **kwargs: Any) -> WorkerPool:
        pool = self.makePool(size, **kwargs)
        pool.startService()
        return pool

    def readyPool(self, size: int = 2, **kwargs: Any) -> WorkerPool:
        pool = self.startPool(size, **kwargs)
        for worker in list(pool.workers):
            worker.ready()
        self.assertIs(pool.state, PoolState.RUNNING)
        return pool

    def process(self, worker: WorkerProcess) -> FakeProcess:
        transport = worker.transport
        assert isinstance(transport, FakeProcess)
        return transport

    def workerIn(self, pool: WorkerPool, number: int) -> WorkerProcess:
        [worker] = [w for w in pool.workers if w.number == number]
        return worker

    def specOf(self, process: FakeProcess) -> WorkerSpec:
        return WorkerSpec.fromArgument(process.args[-1])

    def delays(self) -> list[float]:
        return pendingDelays(self.reactor)


class SpawnTests(PoolTestCase):
    def test_spawnsSizeWorkers(self) -> None:
        """
        Starting the pool spawns C{size} processes at once, numbered 1 to
        C{size}, each connected to its own L{WorkerProcess} in the
        C{starting} state with its stdin closed.
        """
        pool = self.startPool(3)
        self.assertEqual(len(self.reactor.processes), 3)
        self.assertEqual([w.number for w in pool.workers], [1, 2, 3])
        self.assertEqual([w.pid for w in pool.workers], [1000, 1001, 1002])
        for worker, process in zip(pool.workers, self.reactor.processes, strict=True):
            self.assertIs(process.proto, worker)
            self.assertIs(worker.state, WorkerState.STARTING)
            self.assertTrue(process.stdinClosed)
        self.assertIs(pool.state, PoolState.STARTING)

    def test_pythonPathMadeAbsolute(self) -> None:
        """
        A worker's C{PYTHONPATH} means what the parent's meant where it
        started: relative entries, and an empty one (the current directory
        to Python, as in C{/x:}), are made absolute; none stays none.
        """
        here = os.getcwd()
        self.assertEqual(
            absolutePythonPath(f"/x{os.pathsep}.{os.pathsep}"),
            os.pathsep.join(["/x", here, here]),
        )
        self.assertEqual((absolutePythonPath(""), absolutePythonPath(None)), ("", ""))

    def test_commandLine(self) -> None:
        """
        A worker runs C{EXECUTABLE -P -m maccept._worker SPEC} (no C{-P}
        before Python 3.11) with the parent's environment (the first entry
        of its path first on PYTHONPATH), no terminal and no change of user
        or directory.
        """
        self.startPool(1)
        [process] = self.reactor.processes
        self.assertEqual(process.executable, EXECUTABLE)
        self.assertEqual(process.args[:-1], [EXECUTABLE, *SAFE_PATH, "-m", "maccept._worker"])
        self.assertEqual(SAFE_PATH, ("-P",) if sys.version_info >= (3, 11) else ())
        self.assertEqual(process.env, workerEnvironment())
        self.assertFalse(process.usePTY)
        self.assertEqual((process.uid, process.gid, process.path), (None, None, None))

    def test_specInArgv(self) -> None:
        """
        The only argument is the worker's L{WorkerSpec}: its number, the
        protocol, this process as its parent, one handle per listener at
        descriptors 4, 5, ... in the listeners' order, and its settings.
        """
        listeners = [
            fakeListeningSocket("tcp:8080", fd=60, family="AF_INET"),
            fakeListeningSocket("unix:/run/m.sock", fd=61, family="AF_UNIX"),
        ]
        self.startPool(2, listeners=listeners, protocol="myapp.web:factory", gracefulTimeout=7.5)
        handles = (
            ListenerHandle(fd=4, family="AF_INET", description="tcp:8080"),
            ListenerHandle(fd=5, family="AF_UNIX", description="unix:/run/m.sock"),
        )
        self.assertEqual(
            [self.specOf(process) for process in self.reactor.processes],
            [
                WorkerSpec(
                    number=n,
                    protocol="myapp.web:factory",
                    parentPid=os.getpid(),
                    listeners=handles,
                    board=None,
                    gracefulTimeout=7.5,
                    heartbeatInterval=1.0,
                    recycleAfter=None,
                )
                for n in (1, 2)
            ],
        )

    def test_heartbeatInterval(self) -> None:
        """
        Workers beat four times per watchdog timeout, at most once a second;
        with no watchdog, once a second.
        """
        for watchdog, interval in [(30.0, 1.0), (2.0, 0.5), (0.0, 1.0)]:
            self.startPool(1, watchdogTimeout=watchdog)
            [process] = self.reactor.processes
            self.assertEqual(self.specOf(process).heartbeatInterval, interval)

    def test_recycleAfterWithJitter(self) -> None:
        """
        With C{maxConnections}, each worker is told to ask for replacement
        after that many connections plus a jitter of its own.
        """
        self.startPool(8, maxConnections=100, maxConnectionsJitter=10)
        limits = [self.specOf(process).recycleAfter for process in self.reactor.processes]
        for limit in limits:
            assert limit is not None
            self.assertTrue(100 <= limit <= 110, limits)
        self.assertGreater(len(set(limits)), 1)

    def test_cpuPerWorker(self) -> None:
        """
        With C{cpus}, worker N is told the N-th, in turn; without, none.
        """
        self.startPool(3, cpus=(6, 7))
        self.assertEqual([self.specOf(p).cpu for p in self.reactor.processes], [6, 7, 6])
        self.reactor.processes.clear()
        self.startPool(1)
        self.assertEqual([self.specOf(p).cpu for p in self.reactor.processes], [None])

    def test_childFDs(self) -> None:
        """
        A worker of an unbalanced pool gets stdio, its control socket at
        descriptor 3 and one descriptor per listener from 4 on: nothing
        else of the parent's.
        """
        listeners = [fakeListeningSocket(fd=60), fakeListeningSocket(fd=61)]
        self.startPool(1, listeners=listeners)
        [process] = self.reactor.processes
        childFDs = process.childFDs
        assert childFDs is not None
        self.assertEqual(sorted(childFDs), [0, 1, 2, CONTROL_FD, 4, 5])
        self.assertEqual((childFDs[0], childFDs[1], childFDs[2]), ("w", "r", "r"))
        self.assertEqual((childFDs[4], childFDs[5]), (60, 61))
        self.assertIsInstance(childFDs[CONTROL_FD], int)
        self.assertNotIn(childFDs[CONTROL_FD], (60, 61))

    def test_noListenersOnlyStdioAndControl(self) -> None:
        """
        With no listener, a worker gets stdio and its control socket only.
        """
        self.startPool(1, listeners=[])
        [process] = self.reactor.processes
        assert process.childFDs is not None
        self.assertEqual(sorted(process.childFDs), [0, 1, 2, CONTROL_FD])
        self.assertEqual(self.specOf(process).listeners, ())

    def test_loadBoardAfterListeners(self) -> None:
        """
        A balanced pool hands every worker the load board as one more
        descriptor after the listeners, named in its spec with a slot of
        its own; the board is the same descriptor for every worker.
        """
        self.startPool(2, listeners=[fakeListeningSocket(fd=60)], balance=True)
        boards = []
        for process in self.reactor.processes:
            spec = self.specOf(process)
            assert spec.board is not None and process.childFDs is not None
            self.assertEqual(spec.board.fd, 5)
            self.assertEqual(sorted(process.childFDs), [0, 1, 2, CONTROL_FD, 4, 5])
            boards.append((process.childFDs[5], spec.board.slot))
        self.addCleanup(os.close, boards[0][0])
        self.assertEqual(boards[0][0], boards[1][0])
        self.assertEqual(sorted(slot for _, slot in boards), [0, 1])
        [described, _] = self.reactor.descriptorsAtSpawn
        self.assertEqual(described[5], "file")

    def test_controlIsUnixStreamSocket(self) -> None:
        """
        The descriptor mapped to the worker's control fd is, when the worker
        is spawned, a UNIX stream socket; the parent's end of the same pair
        is adopted as a stream connection.
        """
        self.startPool(1)
        [described] = self.reactor.descriptorsAtSpawn
        self.assertEqual(described[CONTROL_FD], (socket.AF_UNIX, socket.SOCK_STREAM))
        [(_, family, _)] = self.reactor.adoptedStreamConnections
        self.assertEqual(family, socket.AF_UNIX)

    def test_parentClosesItsCopies(self) -> None:
        """
        Once the worker is spawned and the parent's end adopted, the parent
        closes both descriptors of the control pair (the reactor holds its
        own duplicate of the parent's end).
        """
        self.startPool(1)
        [process] = self.reactor.processes
        [(parentEnd, _, _)] = self.reactor.adoptedStreamConnections
        assert process.childFDs is not None
        for fd in (parentEnd, process.childFDs[CONTROL_FD]):
            self.assertRaises(OSError, os.fstat, fd)

    def test_controlChannelPerWorker(self) -> None:
        """
        Each worker's control connection is served by a L{ParentControl}
        for that worker, which becomes the worker's C{control} on connection.
        """
        pool = self.startPool(2)
        self.assertEqual(len(self.reactor.adoptedStreamConnections), 2)
        for worker, (_, _, factory) in zip(
            pool.workers, self.reactor.adoptedStreamConnections, strict=True
        ):
            control = factory.buildProtocol(None)
            self.assertIsInstance(control, ParentControl)
            self.assertIs(control.worker, worker)
            self.assertIsNone(worker.control)
            control.makeConnection(StringTransport())
            self.assertIs(worker.control, control)

    def test_startLogsPid(self) -> None:
        """
        The start of each worker is logged with its number and pid.
        """
        with capturedLogs() as events:
            self.startPool(2)
        self.assertIn("started worker 1 (pid 1000, generation 1)", texts(events))
        self.assertIn("started worker 2 (pid 1001, generation 1)", texts(events))

    def test_allReadyLoggedOnce(self) -> None:
        """
        When the last worker becomes ready, the pool runs and logs that all
        are ready and where, once.
        """
        pool = self.startPool(2)
        with capturedLogs() as events:
            pool.workers[0].ready()
            self.assertIs(pool.state, PoolState.STARTING)
            self.assertNotIn("all 2 workers ready on 127.0.0.1:7007", texts(events))
            pool.workers[1].ready()
        self.assertIs(pool.state, PoolState.RUNNING)
        self.assertEqual(texts(events).count("all 2 workers ready on 127.0.0.1:7007"), 1)


class WorkerStateTests(PoolTestCase):
    def test_lifecycle(self) -> None:
        """
        A worker is C{starting} when spawned, C{ready} once it says so,
        C{draining} when the pool stops and C{stopped} when it exits, and
        then leaves the pool.
        """
        pool = self.startPool(1)
        [worker] = pool.workers
        self.assertIs(worker.state, WorkerState.STARTING)
        worker.ready()
        self.assertIs(worker.state, WorkerState.READY)
        pool.stopService()
        self.assertIs(worker.state, WorkerState.DRAINING)
        self.process(worker).end()
        self.assertIs(worker.state, WorkerState.STOPPED)
        self.assertEqual(pool.workers, [])

    def test_exitWhileStarting(self) -> None:
        """
        A worker that exits before it was ready is C{stopped}.
        """
        pool = self.startPool(1)
        [worker] = pool.workers
        self.process(worker).end(3)
        self.assertIs(worker.state, WorkerState.STOPPED)

    def test_readyWhileDrainingIgnored(self) -> None:
        """
        A worker told to drain before it was ready stays C{draining} when
        its ready report arrives, and does not make the pool run.
        """
        pool = self.startPool(1)
        [worker] = pool.workers
        pool.stopService()
        worker.ready()
        self.assertIs(worker.state, WorkerState.DRAINING)
        self.assertIs(pool.state, PoolState.STOPPING)

    def test_readyAfterExitIgnored(self) -> None:
        """
        A late ready report from a worker that has exited changes nothing.
        """
        pool = self.readyPool(2)
        worker = self.workerIn(pool, 1)
        self.reactor.advance(5)
        self.process(worker).end(1)
        worker.ready()
        self.assertIs(worker.state, WorkerState.STOPPED)
        self.assertNotIn(worker, pool.workers)


class RestartTests(PoolTestCase):
    def dieAndRespawn(self, pool: WorkerPool, number: int, exitCode: int = 1) -> float:
        """
        End worker C{number}; return the delay before its replacement is
        spawned, checking that nothing is spawned a moment earlier.
        """
        spawned = len(self.reactor.processes)
        self.process(self.workerIn(pool, number)).end(exitCode)
        [delay] = self.delays()
        if delay:
            self.reactor.advance(delay - EPSILON)
            self.assertEqual(len(self.reactor.processes), spawned)
            self.reactor.advance(EPSILON)
        else:
            self.reactor.advance(0)
        self.assertEqual(len(self.reactor.processes), spawned + 1)
        return delay

    def test_oldWorkerRespawnedAtOnce(self) -> None:
        """
        A worker that dies after living at least C{threshold} seconds is
        replaced at once, with the same number; the others are left alone.
        """
        pool = self.readyPool(2)
        first, second = pool.workers
        self.reactor.advance(pool.threshold)
        self.assertEqual(self.dieAndRespawn(pool, 1), 0.0)
        replacement = self.workerIn(pool, 1)
        self.assertIsNot(replacement, first)
        self.assertIs(self.workerIn(pool, 2), second)
        self.assertEqual(replacement.pid, 1002)
        self.assertIs(replacement.state, WorkerState.STARTING)
        self.assertEqual(self.specOf(self.reactor.processes[-1]).number, 1)
        self.assertEqual(self.fatal, [])

    def test_youngDeathsBackOff(self) -> None:
        """
        Each young death doubles the delay before the next replacement,
        from C{minRestartDelay} up to C{maxRestartDelay}.
        """
        pool = self.readyPool(1)
        pool.maxRestartDelay = 20.0
        self.reactor.advance(0.5)
        delays = [self.dieAndRespawn(pool, 1) for _ in range(7)]
        self.assertEqual(delays, [1.0, 2.0, 4.0, 8.0, 16.0, 20.0, 20.0])
        self.assertEqual(
            [self.specOf(process).number for process in self.reactor.processes], [1] * 8
        )

    def test_delayResetsAfterLongLife(self) -> None:
        """
        A worker that lives C{threshold} seconds resets the delay: it is
        replaced at once, and the next young death waits the minimum.
        """
        pool = self.readyPool(1)
        self.assertEqual([self.dieAndRespawn(pool, 1) for _ in range(3)], [1.0, 2.0, 4.0])
        self.workerIn(pool, 1).ready()
        self.reactor.advance(pool.threshold)
        self.assertEqual(self.dieAndRespawn(pool, 1), 0.0)
        self.assertEqual(self.dieAndRespawn(pool, 1), 1.0)

    def test_delayResetsAfterCalm(self) -> None:
        """
        A young death long after the last one (twice C{maxRestartDelay},
        the pool healthy meanwhile) waits the minimum again, not the delay
        an old crash loop had reached.
        """
        pool = self.readyPool(1)
        self.assertEqual([self.dieAndRespawn(pool, 1) for _ in range(4)], [1.0, 2.0, 4.0, 8.0])
        self.workerIn(pool, 1).ready()
        for _ in range(int(2 * pool.maxRestartDelay)):
            self.reactor.advance(1)
        pool.scaleUp()  # a new worker, which dies before it is ready
        self.assertEqual(self.dieAndRespawn(pool, 2), 1.0)
        self.assertEqual(self.dieAndRespawn(pool, 2), 2.0)  # a loop again

    def test_backoffIsPoolWide(self) -> None:
        """
        Young deaths of different workers share one backoff, so a crash
        loop costs the same few spawns whatever the pool's size.
        """
        pool = self.readyPool(3)
        for number in (1, 2, 3):
            self.process(self.workerIn(pool, number)).end(1)
        self.assertEqual(self.delays(), [1.0, 2.0, 4.0])
        self.reactor.advance(4.0)
        self.assertEqual(
            [self.specOf(process).number for process in self.reactor.processes[3:]], [1, 2, 3]
        )

    def test_deathLoggedAsWarning(self) -> None:
        """
        A worker that dies while the pool runs is logged as a warning that
        says how it ended and repeats its last lines on stderr.
        """
        pool = self.readyPool(1)
        process = self.process(pool.workers[0])
        process.output(2, b"Traceback (most recent call last):\n  ...\nMemoryError\n")
        with capturedLogs() as events:
            process.end(signal=signal.SIGKILL)
        [died] = [e for e in events if " died: " in formatEvent(e)]
        self.assertEqual(
            formatEvent(died),
            "worker 1 (pid 1000) died: signal 9 (SIGKILL); last words: "
            "Traceback (most recent call last): |   ... | MemoryError",
        )
        self.assertEqual(died["log_level"], LogLevel.warn)


class StartFailureTests(PoolTestCase):
    def test_failureBeforeReadyIsFatal(self) -> None:
        """
        A worker that reports why it cannot start and exits before the pool
        was ever ready makes the pool call C{onFatal} with one line naming
        the worker and the reason, logged as critical; it is not replaced.
        """
        pool = self.startPool(2)
        events: list[LogEvent] = []
        pool.log = Logger(observer=cast(ILogObserver, events.append))
        worker = self.workerIn(pool, 1)
        worker.failed("RuntimeError: no database")
        self.process(worker).end(3)
        self.assertEqual(self.fatal, ["worker 1 failed to start: RuntimeError: no database"])
        critical = [e for e in events if e["log_level"] is LogLevel.critical]
        self.assertEqual(texts(critical), ["worker 1 failed to start: RuntimeError: no database"])
        self.reactor.advance(100)
        self.assertEqual(len(self.reactor.processes), 2)

    def test_fatalLineReadsWithLegacyObserver(self) -> None:
        """
        The fatal line reads as itself to every observer, also when a legacy
        observer (trial's, C{log.startLogging}'s) saw the event first: such
        an observer replaces an event's C{message} key with C{()}.
        """
        legacy: list[LogEvent] = []
        addObserver(legacy.append)
        self.addCleanup(removeObserver, legacy.append)
        pool = self.startPool(1)
        with capturedLogs() as events:
            self.process(pool.workers[0]).end(signal=signal.SIGKILL)
        critical = [e for e in events if e["log_level"] is LogLevel.critical]
        self.assertEqual(texts(critical), ["worker 1 failed to start: signal 9 (SIGKILL)"])

    def test_fatalOnce(self) -> None:
        """
        When every worker fails to start, C{onFatal} is still called once.
        """
        pool = self.startPool(2)
        for worker in list(pool.workers):
            worker.failed("RuntimeError: no database")
            self.process(worker).end(3)
        self.assertEqual(len(self.fatal), 1)
        self.reactor.advance(pool.startTimeout)
        self.assertEqual(len(self.fatal), 1)

    def test_deathWithoutReasonBeforeReady(self) -> None:
        """
        A worker that dies before any report names how it ended instead.
        """
        pool = self.startPool(1)
        self.process(pool.workers[0]).end(signal=signal.SIGSEGV)
        self.assertEqual(self.fatal, ["worker 1 failed to start: signal 11 (SIGSEGV)"])

    def test_noReadyWorkerWithinStartTimeout(self) -> None:
        """
        If no worker is ready C{startTimeout} seconds after the start, the
        pool calls C{onFatal} once.
        """
        pool = self.startPool(2)
        self.reactor.advance(pool.startTimeout - EPSILON)
        self.assertEqual(self.fatal, [])
        self.reactor.advance(EPSILON)
        self.assertEqual(self.fatal, ["no worker became ready within 10s (--start-timeout)"])
        self.reactor.advance(pool.startTimeout)
        self.assertEqual(len(self.fatal), 1)

    def test_startTimeoutFromSettings(self) -> None:
        """
        C{--start-timeout} sets how long the start may take.
        """
        self.startPool(2, startTimeout=45.0)
        self.reactor.advance(44)
        self.assertEqual(self.fatal, [])
        self.reactor.advance(1)
        self.assertEqual(self.fatal, ["no worker became ready within 45s (--start-timeout)"])

    def test_stopAnnounced(self) -> None:
        """
        Once a stop is announced (C{--stop-delay}) the pool counts as
        stopping for everything but accepting: a reload or a scale is
        refused, and its state shows as stopping.
        """
        pool = self.readyPool(2)
        heard: list[bool] = []
        pool.stopObservers.append(lambda: heard.append(True))
        pool.announceStop()
        self.assertEqual((heard, pool.stopping, pool.shownState), ([True], True, "stopping"))
        pool.reload()
        self.assertIs(pool.state, PoolState.RUNNING)
        self.assertEqual(pool.scalingRefused(), "the pool is stopping")
        pool.scaleUp()
        self.assertEqual(pool.size, 2)

    def test_readyPoolHasNoDeadline(self) -> None:
        """
        Once every worker is ready the start deadline is gone.
        """
        pool = self.readyPool(2)
        self.assertEqual(self.delays(), [])
        self.reactor.advance(pool.startTimeout * 2)
        self.assertEqual(self.fatal, [])

    def test_deathAfterReadyNotFatal(self) -> None:
        """
        A worker that fails after the pool was ready is replaced, not fatal.
        """
        pool = self.readyPool(2)
        worker = self.workerIn(pool, 2)
        worker.failed("RuntimeError: no database")
        self.process(worker).end(3)
        self.assertEqual(self.fatal, [])
        self.assertEqual(self.delays(), [pool.minRestartDelay])


class StopTests(PoolTestCase):
    def test_drainsConnectedWorkers(self) -> None:
        """
        Stopping sends C{Drain} with the graceful timeout over each
        connected worker's control channel, and signals nobody.
        """
        pool = self.readyPool(2, gracefulTimeout=12.0)
        controls: list[FakeControl] = []
        for worker in pool.workers:
            control = FakeControl()
            worker.control = control  # type: ignore[assignment]
            controls.append(control)
        pool.stopService()
        self.assertIs(pool.state, PoolState.STOPPING)
        for worker, control in zip(pool.workers, controls, strict=True):
            self.assertEqual(control.calls, [(Drain, {"timeout": 12.0})])
            self.assertEqual(self.process(worker).signals, [])
            self.assertIs(worker.state, WorkerState.DRAINING)

    def test_terminatesUnconnectedWorkers(self) -> None:
        """
        A worker with no control channel, or one whose channel has closed,
        is sent SIGTERM instead.
        """
        pool = self.startPool(2)
        closed = FakeControl(transport=None)
        self.workerIn(pool, 2).control = closed  # type: ignore[assignment]
        pool.stopService()
        for worker in pool.workers:
            self.assertEqual(self.process(worker).signals, [signal.SIGTERM])
        self.assertEqual(closed.calls, [])

    def test_firesWhenAllExited(self) -> None:
        """
        The Deferred of C{stopService} fires only once every worker exited.
        """
        pool = self.readyPool(2)
        first, second = pool.workers
        d = pool.stopService()
        self.assertNoResult(d)
        self.process(first).end()
        self.assertNoResult(d)
        self.process(second).end(signal=signal.SIGTERM)
        self.assertIsNone(self.successResultOf(d))
        self.assertIs(pool.state, PoolState.STOPPED)

    def test_killAfterGracePeriod(self) -> None:
        """
        A worker still alive C{gracefulTimeout + killTime} seconds after the
        stop is killed, its stacks dumped (SIGUSR1) a second before.
        """
        pool = self.readyPool(1)
        [worker] = pool.workers
        d = pool.stopService()
        total = pool.settings.gracefulTimeout + pool.killTime
        self.reactor.advance(total - WorkerProcess.stackDumpGrace - EPSILON)
        self.assertEqual(self.process(worker).signals, [signal.SIGTERM])
        self.reactor.advance(EPSILON)
        self.assertEqual(self.process(worker).signals, [signal.SIGTERM, signal.SIGUSR1])
        self.reactor.advance(WorkerProcess.stackDumpGrace - EPSILON)
        with capturedLogs() as events:
            self.reactor.advance(EPSILON)
        self.assertEqual(
            self.process(worker).signals, [signal.SIGTERM, signal.SIGUSR1, signal.SIGKILL]
        )
        # The kill says why, so that a SIGKILL in the log is no mystery.
        [line] = [t for t in texts(events) if "killing it" in t]
        self.assertIn("worker 1 still running 35s after it was told to drain", line)
        self.assertIn("--graceful-timeout 30s and 5s more", line)
        self.assertIn("a start or stop hook that never finished", line)
        self.assertIn("its stacks are above", line)
        self.assertNoResult(d)
        self.process(worker).end(signal=signal.SIGKILL)
        self.successResultOf(d)

    def test_killOfAStoppedWorkerSaysSo(self) -> None:
        """
        A worker stopped (SIGSTOP) dumps no stacks: the kill's line says it
        is stopped, not that its stacks are above.
        """
        self.patch(_workerprocess, "isStopped", lambda pid: True)
        pool = self.readyPool(1)
        pool.stopService()
        with capturedLogs() as events:
            self.reactor.advance(pool.settings.gracefulTimeout + pool.killTime)
        [line] = [t for t in texts(events) if "killing it" in t]
        self.assertIn("it is stopped (SIGSTOP, or a debugger), so it dumped no stacks", line)
        self.assertNotIn("its stacks are above", line)

    def test_exitCancelsKill(self) -> None:
        """
        A worker that exits in time leaves no timer pending.
        """
        pool = self.readyPool(1)
        [worker] = pool.workers
        pool.stopService()
        self.process(worker).end()
        self.assertEqual(self.reactor.getDelayedCalls(), [])
        self.reactor.advance(pool.settings.gracefulTimeout + pool.killTime)
        self.assertEqual(self.process(worker).signals, [signal.SIGTERM])

    def test_noKillOnceExited(self) -> None:
        """
        A worker that has exited while a child of its own holds its pipes
        is not said to be "still running" and killed in the moment before
        its pipes are closed.
        """
        pool = self.readyPool(1)
        [worker] = pool.workers
        pool.stopService()
        total = pool.settings.gracefulTimeout + pool.killTime
        self.reactor.advance(total - 0.5)
        self.process(worker).exitHoldingPipes(0)
        with capturedLogs() as events:
            self.reactor.advance(0.6)  # the kill was due; the pipes close later
        # Its stacks were asked for before it exited; no kill after.
        self.assertEqual(self.process(worker).signals, [signal.SIGTERM, signal.SIGUSR1])
        self.assertEqual([t for t in texts(events) if "still running" in t], [])

    def test_drainTwiceSignalsOnce(self) -> None:
        """
        Asking a draining worker to drain again sends nothing more and sets
        no second kill timer (nor stack dump before it).
        """
        pool = self.readyPool(1)
        [worker] = pool.workers
        worker.drain("stop", 1.0, 1.0)
        worker.drain("stop", 1.0, 1.0)
        self.assertEqual(self.process(worker).signals, [signal.SIGTERM])
        self.assertEqual(self.delays(), [2.0 - WorkerProcess.stackDumpGrace, 2.0])

    def test_noRespawnAfterStop(self) -> None:
        """
        A worker that exits, whatever the status, after the pool stopped is
        not replaced, and its exit is logged as information, not a death.
        """
        pool = self.readyPool(2)
        self.reactor.advance(5)
        pool.stopService()
        with capturedLogs() as events:
            for worker in list(pool.workers):
                self.process(worker).end(1)
        self.reactor.advance(pool.maxRestartDelay * 2)
        self.assertEqual(len(self.reactor.processes), 2)
        self.assertEqual(self.fatal, [])
        self.assertIn("worker 1 (pid 1000) exited, exit code 1", texts(events))
        self.assertFalse([text for text in texts(events) if "died" in text])

    def test_pendingRestartCancelled(self) -> None:
        """
        A replacement waiting out its restart delay is cancelled by the
        stop, which then has no worker to wait for.
        """
        pool = self.readyPool(1)
        self.process(pool.workers[0]).end(1)
        self.assertEqual(self.delays(), [pool.minRestartDelay])
        d = pool.stopService()
        self.successResultOf(d)
        self.assertEqual(self.reactor.getDelayedCalls(), [])
        self.reactor.advance(pool.maxRestartDelay)
        self.assertEqual(len(self.reactor.processes), 1)

    def test_stopBeforeReadyCancelsStartDeadline(self) -> None:
        """
        Stopping a pool that is still starting cancels its start deadline:
        a slow stop is not reported as a failed start.
        """
        pool = self.startPool(1)
        pool.stopService()
        self.reactor.advance(pool.startTimeout)
        self.assertEqual(self.fatal, [])

    def test_killAll(self) -> None:
        """
        C{killAll} kills every worker at once, draining or not.
        """
        pool = self.readyPool(2)
        pool.stopService()
        pool.killAll()
        for worker in pool.workers:
            self.assertEqual(self.process(worker).signals, [signal.SIGTERM, signal.SIGKILL])


class ReplacementTests(PoolTestCase):
    def test_replacementStartsFirst(self) -> None:
        """
        A worker to be replaced keeps serving until its replacement, with
        the same number, is ready; only then is it drained.
        """
        pool = self.readyPool(2)
        old = self.workerIn(pool, 1)
        old.askedToBeReplaced("accepted 1000 connections")
        [new] = [w for w in pool.workers if w.replaces is old]
        self.assertEqual((new.number, old.stopReason), (1, "recycle"))
        self.assertIs(old.state, WorkerState.READY)
        self.assertEqual(self.process(old).signals, [])
        new.ready()
        self.assertIs(old.state, WorkerState.DRAINING)
        self.assertEqual(self.process(old).signals, [signal.SIGTERM])
        self.process(old).end()
        self.assertEqual(self.delays(), [])
        self.assertEqual(sorted(w.number for w in pool.workers), [1, 2])
        self.assertEqual(pool.restarts["recycle"], 1)

    def test_replacedOnce(self) -> None:
        """
        A second request to replace the same worker starts nothing more.
        """
        pool = self.readyPool(1)
        [old] = pool.workers
        old.askedToBeReplaced("accepted 1000 connections")
        old.askedToBeReplaced("accepted 1000 connections")
        self.assertEqual(len(self.reactor.processes), 2)

    def test_noReplacementWhileStarting(self) -> None:
        """
        Nothing is replaced before the pool runs.
        """
        pool = self.startPool(1)
        [worker] = pool.workers
        worker.ready()
        pool.state = PoolState.STARTING
        worker.askedToBeReplaced("accepted 1000 connections")
        self.assertEqual(len(self.reactor.processes), 1)


class WatchdogTests(PoolTestCase):
    def test_silentWorkerDumpedThenKilled(self) -> None:
        """
        A ready worker silent for longer than the watchdog timeout is sent
        SIGUSR1 (its stacks go to the log), then SIGKILL, and is replaced
        once it is gone.
        """
        pool = self.readyPool(1, watchdogTimeout=3.0)
        [worker] = pool.workers
        self.reactor.pump([1.0] * 3)
        self.assertEqual(self.process(worker).signals, [])
        self.reactor.advance(1.0)
        self.assertEqual(self.process(worker).signals, [signal.SIGUSR1])
        self.reactor.advance(WorkerProcess.stackDumpGrace)
        self.assertEqual(self.process(worker).signals, [signal.SIGUSR1, signal.SIGKILL])
        self.process(worker).end(signal=signal.SIGKILL)
        self.assertEqual(len(self.reactor.processes), 2)
        self.assertEqual(pool.restarts["watchdog"], 1)

    def test_leavingWorkerNotSaidToBeReplaced(self) -> None:
        """
        The line for a hung worker that was leaving already (drained by a
        reload) says it is killed, not replaced, as it is not.
        """
        pool = self.readyPool(1, watchdogTimeout=3.0)
        [old] = pool.workers
        pool.reload()
        [new] = pool.ofGeneration(2)
        with capturedLogs() as events:
            for _ in range(4):
                self.reactor.advance(1.0)
                new.heartbeat()
                if new.state is WorkerState.STARTING:
                    new.ready()
        [line] = [t for t in texts(events) if "dumping its stacks" in t]
        self.assertIn(f"worker 1 (pid {old.pid}) silent for", line)
        self.assertTrue(line.endswith("dumping its stacks, then killing it"), line)

    def test_heartbeatKeepsAlive(self) -> None:
        """
        A worker that beats is left alone.
        """
        pool = self.readyPool(1, watchdogTimeout=3.0)
        [worker] = pool.workers
        for _ in range(10):
            self.reactor.advance(1.0)
            worker.heartbeat(accepted=5, open=2)
        self.assertEqual(self.process(worker).signals, [])

    def test_logEventsAreSignsOfLife(self) -> None:
        """
        A worker whose heartbeats wait behind its log events is not taken
        for hung while those events keep coming.
        """
        pool = self.readyPool(1, watchdogTimeout=3.0)
        [worker] = pool.workers
        control = ParentControl(worker)
        event = encodeEvent({"log_format": "busy", "log_level": LogLevel.info, "log_time": 0.0})
        with capturedLogs():
            for _ in range(10):
                self.reactor.advance(1.0)
                control.logEvent(event)
        self.assertEqual(self.process(worker).signals, [])

    def test_lateReportCounts(self) -> None:
        """
        A report the parent reads after the worker's process ended (it was
        behind on the control channel) still adds what it counted.
        """
        pool = self.readyPool(1)
        [worker] = pool.workers
        worker.heartbeat(accepted=5, bytesReceived=50)
        self.process(worker).end(0)
        self.assertEqual(pool.totals()["accepted"], 5)
        worker.heartbeat(accepted=301, bytesReceived=3010)
        self.assertEqual((pool.totals()["accepted"], pool.totals()["bytesReceived"]), (301, 3010))

    def test_parentStallSparesWorkers(self) -> None:
        """
        A parent that itself did not run for longer than the timeout (it
        was stopped, or blocked writing its log) finds every worker's last
        heartbeat old: it counts their silence from when it came back, by
        which time it has read the heartbeats sent meanwhile.
        """
        pool = self.readyPool(2, watchdogTimeout=5.0)

        def beat() -> None:
            for worker in pool.workers:
                worker.heartbeat()

        for _ in range(3):
            self.reactor.advance(1.0)
            beat()
        with capturedLogs() as events:
            self.reactor.advance(8.0)
        self.assertIn(
            "the parent itself did not run for 8.0s: counting the workers' silence"
            " (--timeout 5) from now",
            texts(events),
        )
        beat()
        for _ in range(10):
            self.reactor.advance(1.0)
            beat()
        for worker in pool.workers:
            self.assertEqual(self.process(worker).signals, [])

    def test_shortTimeoutStall(self) -> None:
        """
        With a short timeout the rounds come as often as the heartbeats (a
        quarter of it), so a stall of half of it is noticed too.
        """
        pool = self.readyPool(2, watchdogTimeout=2.0)
        self.assertEqual(pool.watchdog.interval, 0.5)
        self.reactor.pump([0.5] * 2)
        for worker in pool.workers:
            worker.heartbeat()
        self.reactor.advance(0.5)
        with capturedLogs() as events:
            self.reactor.advance(1.9)
        self.assertIn("the parent itself did not run for 1.9s", " ".join(texts(events)))
        for worker in pool.workers:
            self.assertEqual(self.process(worker).signals, [])

    def test_hungThroughParentStall(self) -> None:
        """
        A worker that stays silent after the parent came back is still
        found hung, a timeout later.
        """
        pool = self.readyPool(1, watchdogTimeout=5.0)
        [worker] = pool.workers
        self.reactor.advance(1.0)
        with capturedLogs():
            self.reactor.advance(8.0)
        self.reactor.pump([1.0] * 5)
        self.assertEqual(self.process(worker).signals, [])
        self.reactor.advance(1.0)
        self.assertEqual(self.process(worker).signals, [signal.SIGUSR1])

    def test_drainedWhileStartingNotJudgedBySilence(self) -> None:
        """
        A worker drained before it was ever ready (scaled away as it
        started) is bounded by its drain's deadline, not taken for hung
        while it imports: no stack dump.
        """
        pool = self.readyPool(1, watchdogTimeout=1.0)
        pool.scaleUp()
        pool.scaleDown()
        starting = self.workerIn(pool, 2)
        self.assertIs(starting.state, WorkerState.DRAINING)
        self.reactor.pump([0.5] * 10)
        self.assertNotIn(signal.SIGUSR1, self.process(starting).signals)

    def test_noWatchdog(self) -> None:
        """
        A watchdog timeout of 0 turns the watchdog off.
        """
        pool = self.readyPool(1, watchdogTimeout=0.0)
        self.reactor.advance(1000)
        self.assertEqual(self.process(pool.workers[0]).signals, [])


class _AnsweringControl:
    """
    A worker's control channel whose answers the test gives.
    """

    transport = object()

    def __init__(self, answers: list[defer.Deferred[dict[str, object]]]) -> None:
        self.answers = answers

    def callRemote(self, command: object, **arguments: object) -> defer.Deferred[dict[str, object]]:
        self.answers.append(defer.Deferred())
        return self.answers[-1]


class ReloadTests(PoolTestCase):
    def test_newGenerationFirst(self) -> None:
        """
        A reload starts a whole new generation beside the old one and
        drains the old only once every new worker is ready.
        """
        pool = self.readyPool(2)
        old = list(pool.workers)
        pool.reload()
        self.assertIs(pool.state, PoolState.RELOADING)
        new = [w for w in pool.workers if w.generation == 2]
        self.assertEqual([w.number for w in new], [1, 2])
        new[0].ready()
        self.assertEqual([w.state for w in old], [WorkerState.READY] * 2)
        new[1].ready()
        self.assertEqual([w.state for w in old], [WorkerState.DRAINING] * 2)
        self.assertIs(pool.state, PoolState.RUNNING)
        self.assertEqual(pool.generation, 2)

    def test_oldGenerationStopsAccepting(self) -> None:
        """
        Once every old worker has stopped accepting (it answered its drain,
        or it exited), the pool says that the new generation alone accepts:
        the line the testing kit's C{reload()} waits for.
        """
        pool = self.readyPool(2)
        first, second = pool.workers
        answers: list[defer.Deferred[dict[str, object]]] = []
        control: Any = _AnsweringControl(answers)
        first.control = control
        pool.reload()
        with capturedLogs() as events:
            for worker in pool.ofGeneration(2):
                worker.ready()
            self.assertEqual(len(answers), 1)  # the second has no channel: TERM
            answers[0].callback({})
            self.assertTrue(first.acceptsNoMore)
            self.assertFalse(second.acceptsNoMore)
            before = [formatEvent(e) for e in events]
            self.process(second).end(0)
        alone = "reload: generation 2 alone accepts: the old workers stopped accepting"
        self.assertNotIn(alone, before)
        self.assertEqual([formatEvent(e) for e in events].count(alone), 1)

    def test_reloadDuringReloadQueued(self) -> None:
        """
        A reload asked for during a reload (HUP twice) starts once the
        first has ended, so that code edited in between is loaded; two such
        requests make one reload.
        """
        pool = self.readyPool(2)
        # Each says which generation will carry it (maccept-ctl reload --wait).
        self.assertEqual([pool.reload(), pool.reload(), pool.reload()], [2, 3, 3])
        self.assertEqual(pool.pendingGeneration, 2)
        for worker in pool.ofGeneration(2):
            worker.ready()
        self.assertIs(pool.state, PoolState.RUNNING)
        self.assertEqual(pool.lastReloadDone, 2)
        self.reactor.advance(0)
        self.assertIs(pool.state, PoolState.RELOADING)
        self.assertEqual(pool.pendingGeneration, 3)
        for worker in pool.ofGeneration(3):
            worker.ready()
        self.reactor.advance(0)
        self.assertEqual((pool.state, pool.generation), (PoolState.RUNNING, 3))

    def test_queuedReloadForgotten(self) -> None:
        """
        A reload queued during a reload is dropped when an upgrade starts
        (it would start the old code once more during the hand-over).
        """
        pool = self.readyPool(1)
        pool.reload()
        self.assertEqual(pool.reload(), 3)  # queued
        pool.forgetQueuedReload()
        # Said, for maccept-ctl reload --wait: generation 3 will not start.
        self.assertEqual(pool.reloadDropped, 3)
        for worker in pool.ofGeneration(pool.pendingGeneration):
            worker.ready()
        self.reactor.advance(0)
        self.assertIs(pool.state, PoolState.RUNNING)
        self.assertEqual(pool.generation, 2)

    def test_reloadWhileStartingQueued(self) -> None:
        """
        So does one asked for while the pool starts; a stop meanwhile
        cancels it.
        """
        pool = self.startPool(1)
        self.assertEqual(pool.reload(), 2)
        pool.workers[0].ready()
        self.reactor.advance(0)
        self.assertEqual(pool.pendingGeneration, 2)
        pool.reload()
        pool.stopService()
        self.reactor.advance(0)
        self.assertIs(pool.state, PoolState.STOPPING)
        self.assertIsNone(pool.reload())

    def test_failedReloadKeepsOld(self) -> None:
        """
        If a new worker dies before the new generation is ready, the new
        generation is killed and the old one keeps serving.
        """
        pool = self.readyPool(2)
        old = list(pool.workers)
        pool.reload()
        new = [w for w in pool.workers if w.generation == 2]
        new[0].failed("SyntaxError: invalid syntax")
        self.process(new[0]).end(3)
        self.assertEqual(self.process(new[1]).signals, [signal.SIGKILL])
        self.assertEqual([w.state for w in old], [WorkerState.READY] * 2)
        self.assertIs(pool.state, PoolState.RUNNING)
        self.assertEqual(pool.generation, 1)
        self.assertEqual(self.fatal, [])
        # Done, and failed: what maccept-ctl reload --wait reports.
        self.assertEqual(pool.lastReloadDone, 2)
        self.assertIn("SyntaxError", pool.reloadFailure or "")


class DescribeExitTests(SynchronousTestCase):
    def test_clean(self) -> None:
        """
        A clean exit is C{exit code 0}.
        """
        self.assertEqual(describeExit(Failure(ProcessDone(0))), "exit code 0")

    def test_exitCode(self) -> None:
        """
        A failed exit names its code.
        """
        reason = Failure(ProcessTerminated(exitCode=3, status=3 << 8))
        self.assertEqual(describeExit(reason), "exit code 3")

    def test_signal(self) -> None:
        """
        A death by signal names the signal's number and name.
        """
        for number, name in [(9, "SIGKILL"), (15, "SIGTERM"), (11, "SIGSEGV")]:
            reason = Failure(ProcessTerminated(signal=number, status=number))
            self.assertEqual(describeExit(reason), f"signal {number} ({name})")

    def test_unknownSignal(self) -> None:
        """
        A signal number with no name is still reported.
        """
        reason = Failure(ProcessTerminated(signal=200, status=200))
        self.assertEqual(describeExit(reason), "signal 200 (unknown)")


class OutputTests(PoolTestCase):
    def lines(self, events: Sequence[LogEvent]) -> list[tuple[Any, Any, Any]]:
        return [(e["log_level"], e["log_system"], e["line"]) for e in events if "line" in e]

    def test_linesLoggedWithSystemAndLevel(self) -> None:
        """
        Lines a worker writes to stdout are logged as information and lines
        to stderr as warnings, each tagged with the worker's number and pid,
        however the bytes were split.
        """
        pool = self.startPool(2)
        process = self.process(self.workerIn(pool, 2))
        with capturedLogs() as events:
            process.output(1, b"hel")
            process.output(2, b"Traceback (most")
            process.output(1, b"lo\r\nworld\n")
            process.output(2, b" recent call last):\n")
        system = "worker 2 pid 1001"
        self.assertEqual(
            self.lines(events),
            [
                (LogLevel.info, system, "hello"),
                (LogLevel.info, system, "world"),
                (LogLevel.warn, system, "Traceback (most recent call last):"),
            ],
        )

    def test_tailFlushedAtExit(self) -> None:
        """
        An unterminated last line is logged when the worker exits.
        """
        pool = self.startPool(1)
        process = self.process(pool.workers[0])
        with capturedLogs() as events:
            process.output(2, b"Segmentation fault")
            self.assertEqual(self.lines(events), [])
            process.end(signal=signal.SIGSEGV)
        self.assertEqual(
            self.lines(events), [(LogLevel.warn, "worker 1 pid 1000", "Segmentation fault")]
        )
