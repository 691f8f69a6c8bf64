"""
The parent's pool: spawning, supervision, restart policy, start-up failure
and draining, driven by a fake reactor and clock; no process is started.
"""

from __future__ import annotations

import itertools
import os
import signal
import socket
from collections.abc import Sequence

from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.testing import StringTransport
from twisted.logger import LogEvent, Logger, LogLevel, capturedLogs, formatEvent
from twisted.python.failure import Failure
from twisted.python.log import addObserver, removeObserver
from twisted.trial.unittest import SynchronousTestCase

from maccept._pool import (
    TRANSITIONS,
    ParentControl,
    WorkerPool,
    WorkerProcess,
    WorkerState,
    describeExit,
)
from maccept._wire import CONTROL_FD, Drain, ListenerHandle, WorkerSpec
from tests.fakes import FakeControl, FakeProcess, ProcessMemoryReactor, fakeListeningSocket

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
        listeners: list[object] | None = None,
        protocol: str = "echo",
        balance: bool = False,
    ) -> WorkerPool:
        self.reactor = ProcessMemoryReactor()
        self.fatal: list[str] = []
        pool = WorkerPool(
            self.reactor,
            [fakeListeningSocket()] if listeners is None else listeners,  # type: ignore[arg-type]
            protocol,
            size,
            onFatal=self.fatal.append,
            executable=EXECUTABLE,
            balance=balance,
        )
        if pool.board is not None:
            self.addCleanup(pool.board.close)
        return pool

    def startPool(self, size: int = 2, **kwargs: object) -> WorkerPool:
        pool = self.makePool(size, **kwargs)  # type: ignore[arg-type]
        pool.startService()
        return pool

    def readyPool(self, size: int = 2) -> WorkerPool:
        pool = self.startPool(size)
        for worker in pool.workers:
            worker.ready()
        self.assertTrue(pool.everReady)
        return pool

    def process(self, worker: WorkerProcess) -> FakeProcess:
        transport = worker.transport
        assert isinstance(transport, FakeProcess)
        return transport

    def workerIn(self, pool: WorkerPool, number: int) -> WorkerProcess:
        [worker] = [w for w in pool.workers if w.number == number]
        return worker

    def specOf(self, process: FakeProcess) -> WorkerSpec:
        return WorkerSpec.fromArgument(process.args[3])


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

    def test_commandLine(self) -> None:
        """
        A worker runs C{EXECUTABLE -m maccept._worker SPEC} with the parent's
        environment, no terminal and no change of user or directory.
        """
        self.startPool(1)
        [process] = self.reactor.processes
        self.assertEqual(process.executable, EXECUTABLE)
        self.assertEqual(process.args[:3], [EXECUTABLE, "-m", "maccept._worker"])
        self.assertEqual(len(process.args), 4)
        self.assertEqual(process.env, dict(os.environ))
        self.assertFalse(process.usePTY)
        self.assertEqual((process.uid, process.gid, process.path), (None, None, None))

    def test_specInArgv(self) -> None:
        """
        The only argument is the worker's L{WorkerSpec}: its number, the
        protocol, this process as its parent, and one handle per listener at
        descriptors 4, 5, ... in the listeners' order.
        """
        listeners = [
            fakeListeningSocket("tcp:8080", fd=60, family="AF_INET"),
            fakeListeningSocket("unix:/run/m.sock", fd=61, family="AF_UNIX"),
        ]
        self.startPool(2, listeners=listeners, protocol="myapp.web:factory")
        specs = [self.specOf(process) for process in self.reactor.processes]
        handles = (
            ListenerHandle(fd=4, family="AF_INET", description="tcp:8080"),
            ListenerHandle(fd=5, family="AF_UNIX", description="unix:/run/m.sock"),
        )
        self.assertEqual(
            specs,
            [
                WorkerSpec(
                    number=n, protocol="myapp.web:factory", parentPid=os.getpid(), listeners=handles
                )
                for n in (1, 2)
            ],
        )

    def test_childFDs(self) -> None:
        """
        A worker gets stdio, its control socket at descriptor 3 and one
        descriptor per listener from 4 on: nothing else of the parent's.
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
        self.assertIn("started worker 1 (pid 1000)", texts(events))
        self.assertIn("started worker 2 (pid 1001)", texts(events))

    def test_allReadyLoggedOnce(self) -> None:
        """
        When the last worker becomes ready, the pool logs that all are ready
        and where, once.
        """
        pool = self.startPool(2)
        with capturedLogs() as events:
            pool.workers[0].ready()
            self.assertNotIn("all 2 workers ready on 127.0.0.1:7007", texts(events))
            pool.workers[1].ready()
        self.assertEqual(texts(events).count("all 2 workers ready on 127.0.0.1:7007"), 1)


class TransitionTests(PoolTestCase):
    def test_table(self) -> None:
        """
        Every state/event pair leads where the lifecycle says, and an event
        that makes no sense in a state leaves the worker there.
        """
        S = WorkerState
        expected = {
            (S.STARTING, "ready"): S.READY,
            (S.STARTING, "stop"): S.STOPPING,
            (S.STARTING, "exit"): S.STOPPED,
            (S.READY, "ready"): S.READY,
            (S.READY, "stop"): S.STOPPING,
            (S.READY, "exit"): S.STOPPED,
            (S.STOPPING, "ready"): S.STOPPING,
            (S.STOPPING, "stop"): S.STOPPING,
            (S.STOPPING, "exit"): S.STOPPED,
            (S.STOPPED, "ready"): S.STOPPED,
            (S.STOPPED, "stop"): S.STOPPED,
            (S.STOPPED, "exit"): S.STOPPED,
        }
        for state, event in itertools.product(S, ["ready", "stop", "exit"]):
            worker = WorkerProcess(self.makePool(), 1, 0.0)
            worker.state = state
            self.assertIs(worker.handle(event), expected[(state, event)], (state, event))
            self.assertIs(worker.state, expected[(state, event)])
        self.assertEqual(TRANSITIONS, {k: v for k, v in expected.items() if k[0] is not v})

    def test_lifecycle(self) -> None:
        """
        A worker is C{starting} when spawned, C{ready} once it says so,
        C{stopping} when the pool stops and C{stopped} when it exits, and
        then leaves the pool.
        """
        pool = self.startPool(1)
        [worker] = pool.workers
        self.assertIs(worker.state, WorkerState.STARTING)
        worker.ready()
        self.assertIs(worker.state, WorkerState.READY)
        pool.stopService()
        self.assertIs(worker.state, WorkerState.STOPPING)
        self.process(worker).end()
        self.assertIs(worker.state, WorkerState.STOPPED)
        self.assertEqual(pool.workers, [])

    def test_readyWhileStoppingIgnored(self) -> None:
        """
        A worker told to stop before it was ready stays C{stopping} when its
        ready report arrives, and does not make the pool ready.
        """
        pool = self.startPool(1)
        [worker] = pool.workers
        pool.stopService()
        worker.ready()
        self.assertIs(worker.state, WorkerState.STOPPING)
        self.assertFalse(pool.everReady)


class RestartTests(PoolTestCase):
    def dieAndRespawn(self, pool: WorkerPool, number: int, exitCode: int = 1) -> float:
        """
        End worker C{number}; return the delay before its replacement is
        spawned, checking that nothing is spawned a moment earlier.
        """
        spawned = len(self.reactor.processes)
        self.process(self.workerIn(pool, number)).end(exitCode)
        [delay] = self.reactor.pendingDelays()
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
        replaced at once, in the same slot with the same number; the other
        workers are left alone.
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
        A worker that lives C{threshold} seconds resets its slot's delay:
        it is replaced at once, and the next young death waits the minimum.
        """
        pool = self.readyPool(1)
        self.assertEqual([self.dieAndRespawn(pool, 1) for _ in range(3)], [1.0, 2.0, 4.0])
        self.reactor.advance(pool.threshold)
        self.assertEqual(self.dieAndRespawn(pool, 1), 0.0)
        self.assertEqual(self.dieAndRespawn(pool, 1), 1.0)

    def test_slotsBackOffSeparately(self) -> None:
        """
        The young deaths of one slot do not delay another slot's restart.
        """
        pool = self.readyPool(2)
        self.assertEqual([self.dieAndRespawn(pool, 1) for _ in range(3)], [1.0, 2.0, 4.0])
        self.assertEqual([self.dieAndRespawn(pool, 2) for _ in range(2)], [0.0, 1.0])

    def test_deathLoggedAsWarning(self) -> None:
        """
        A worker that dies while the pool runs is logged as a warning that
        says how it ended.
        """
        pool = self.readyPool(1)
        with capturedLogs() as events:
            self.process(pool.workers[0]).end(signal=signal.SIGKILL)
        [died] = [e for e in events if "died," in formatEvent(e)]
        self.assertEqual(formatEvent(died), "worker 1 (pid 1000) died, signal 9 (SIGKILL)")
        self.assertEqual(died["log_level"], LogLevel.warn)


class StartFailureTests(PoolTestCase):
    def test_failureBeforeReadyIsFatal(self) -> None:
        """
        A worker that reports why it cannot start and exits before the pool
        was ever ready makes the pool call C{onFatal} with one line naming
        the worker and the reason; it is not replaced.
        """
        pool = self.startPool(2)
        events: list[LogEvent] = []
        pool.log = Logger(observer=events.append)
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
        for worker in pool.workers:
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
        self.assertEqual(self.fatal, ["no worker became ready within 10s"])
        self.reactor.advance(pool.startTimeout)
        self.assertEqual(len(self.fatal), 1)

    def test_readyPoolHasNoDeadline(self) -> None:
        """
        Once every worker is ready the start deadline is gone.
        """
        pool = self.readyPool(2)
        self.assertEqual(self.reactor.pendingDelays(), [])
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
        self.assertEqual(self.reactor.pendingDelays(), [pool.minRestartDelay])


class StopTests(PoolTestCase):
    def test_drainsConnectedWorkers(self) -> None:
        """
        Stopping sends C{Drain} with the graceful timeout over each
        connected worker's control channel, and signals nobody.
        """
        pool = self.readyPool(2)
        controls = []
        for worker in pool.workers:
            worker.control = FakeControl()  # type: ignore[assignment]
            controls.append(worker.control)
        pool.stopService()
        for worker, control in zip(pool.workers, controls, strict=True):
            self.assertEqual(control.calls, [(Drain, {"timeout": pool.gracefulTimeout})])
            self.assertEqual(self.process(worker).signals, [])
            self.assertIs(worker.state, WorkerState.STOPPING)

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
            self.assertEqual(self.process(worker).signals, ["TERM"])
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

    def test_killAfterGracePeriod(self) -> None:
        """
        A worker still alive C{gracefulTimeout + killTime} seconds after the
        stop is killed.
        """
        pool = self.readyPool(1)
        [worker] = pool.workers
        d = pool.stopService()
        self.reactor.advance(pool.gracefulTimeout + pool.killTime - EPSILON)
        self.assertEqual(self.process(worker).signals, ["TERM"])
        self.reactor.advance(EPSILON)
        self.assertEqual(self.process(worker).signals, ["TERM", "KILL"])
        self.assertNoResult(d)
        self.process(worker).end(signal=signal.SIGKILL)
        self.successResultOf(d)

    def test_exitCancelsKill(self) -> None:
        """
        A worker that exits in time leaves no kill pending.
        """
        pool = self.readyPool(1)
        [worker] = pool.workers
        pool.stopService()
        self.process(worker).end()
        self.assertEqual(self.reactor.pendingDelays(), [])
        self.reactor.advance(pool.gracefulTimeout + pool.killTime)
        self.assertEqual(self.process(worker).signals, ["TERM"])

    def test_stopTwiceSignalsOnce(self) -> None:
        """
        Asking a stopping worker to stop again sends nothing more and sets
        no second kill timer.
        """
        pool = self.readyPool(1)
        [worker] = pool.workers
        worker.stop(1.0, 1.0)
        worker.stop(1.0, 1.0)
        self.assertEqual(self.process(worker).signals, ["TERM"])
        self.assertEqual(self.reactor.pendingDelays(), [2.0])

    def test_noRespawnAfterStop(self) -> None:
        """
        A worker that exits, whatever the status, after the pool stopped is
        not replaced, and its exit is logged as information, not a death.
        """
        pool = self.readyPool(2)
        self.reactor.advance(5)
        pool.stopService()
        with capturedLogs() as events:
            for worker in pool.workers:
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
        self.assertEqual(self.reactor.pendingDelays(), [pool.minRestartDelay])
        d = pool.stopService()
        self.successResultOf(d)
        self.assertEqual(self.reactor.pendingDelays(), [])
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
    def lines(self, events: list[dict[str, object]]) -> list[tuple[object, object, object]]:
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
            self.lines(events),  # type: ignore[arg-type]
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
            self.assertEqual(self.lines(events), [])  # type: ignore[arg-type]
            process.end(signal=signal.SIGSEGV)
        self.assertEqual(
            self.lines(events),  # type: ignore[arg-type]
            [(LogLevel.warn, "worker 1 pid 1000", "Segmentation fault")],
        )
