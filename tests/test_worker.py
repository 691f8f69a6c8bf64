"""
A worker's life: start (adopt and report), serve, drain and exit, driven by
a fake reactor and a fake control channel.
"""

from __future__ import annotations

import io
import os
import socket
import sys
from typing import Any, cast

from twisted.internet import defer
from twisted.internet.error import ConnectionDone
from twisted.internet.protocol import Factory
from twisted.internet.testing import StringTransport
from twisted.logger import ILogObserver, LogEvent, Logger, LogLevel, formatEvent
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from maccept._builtins import Echo
from maccept._logforward import ForwardingObserver
from maccept._wire import (
    STATS,
    Farewell,
    Heartbeat,
    ListenerHandle,
    ReplaceMe,
    WorkerFailed,
    WorkerReady,
    WorkerSpec,
)
from maccept._worker import EXIT_START_FAILED, Worker, WorkerControl
from maccept.interfaces import IWorkerLifecycle
from tests.fakes import FakeControl, WorkerMemoryReactor, pendingDelays, realDescriptor

EPSILON = 1 / 64


def brokenFactory() -> Factory:
    """
    A C{--protocol} target whose start-up code fails in the worker.
    """
    raise RuntimeError("no database")


@implementer(IWorkerLifecycle)
class HookedFactory(Factory):
    """
    A factory with start-up code: C{workerStarting} returns C{starting}.
    """

    protocol = Echo
    starting: Any = None

    def workerStarting(self, reactor: Any) -> Any:
        return self.starting

    def workerDraining(self) -> None:
        pass

    def workerStopping(self) -> None:
        pass


HOOKED = HookedFactory()


class UndeclaredHooks(Factory):
    """
    Hooks written, but IWorkerLifecycle not declared.
    """

    protocol = Echo
    ran = False

    def workerStarting(self, reactor: Any) -> None:
        UndeclaredHooks.ran = True


UNDECLARED = UndeclaredHooks()


class StopRecordingFactory(Factory):
    """
    Records C{startFactory} and C{stopFactory}, as a factory that opens
    and closes resources would.
    """

    protocol = Echo
    noisy = False

    def __init__(self) -> None:
        self.calls: list[str] = []

    def startFactory(self) -> None:
        self.calls.append("start")

    def stopFactory(self) -> None:
        self.calls.append("stop")


STOP_RECORDING = StopRecordingFactory()


class WorkerTestCase(SynchronousTestCase):
    def makeWorker(
        self,
        protocol: str = "echo",
        families: tuple[str, ...] = ("AF_INET",),
        control: FakeControl | None = None,
        recycleAfter: int | None = None,
        maxConcurrent: int | None = None,
    ) -> Worker:
        """
        A worker on a running fake reactor, with real descriptors for its
        listeners and a fake control channel.
        """
        self.reactor = WorkerMemoryReactor()
        self.reactor.running = True
        handles = tuple(
            ListenerHandle(fd=realDescriptor(self), family=family, description=f"listener {n}")
            for n, family in enumerate(families)
        )
        spec = WorkerSpec(
            number=2,
            protocol=protocol,
            parentPid=os.getppid(),
            listeners=handles,
            recycleAfter=recycleAfter,
            maxConcurrent=maxConcurrent,
        )
        worker = Worker(self.reactor, spec)
        self.events: list[LogEvent] = []
        worker.log = Logger(observer=cast(ILogObserver, self.events.append))
        self.control = control or FakeControl()
        worker.control = self.control  # type: ignore[assignment]
        return worker

    def startedWorker(self, families: tuple[str, ...] = ("AF_INET", "AF_UNIX")) -> Worker:
        worker = self.makeWorker(families=families)
        worker.start()
        self.assertEqual(self.control.commands()[:1], [WorkerReady])
        return worker

    def assertExited(self, worker: Worker, code: int) -> None:
        """
        C{worker} stopped its reactor, to exit with C{code}.
        """
        self.assertTrue(self.reactor.hasStopped)
        self.assertFalse(self.reactor.running)
        self.assertEqual(worker.exitCode, code)


class StartTests(WorkerTestCase):
    def test_adoptsEveryListener(self) -> None:
        """
        C{start} adopts each listener's descriptor with its own address
        family and one protocol factory built from the spec, accepts on
        every port, then reports ready with the worker's pid.
        """
        worker = self.makeWorker(families=("AF_INET", "AF_INET6", "AF_UNIX"))
        fds = [handle.fd for handle in worker.spec.listeners]
        worker.start()
        adopted = self.reactor.adoptedPorts
        self.assertEqual(
            [(fd, family) for fd, family, _ in adopted],
            list(zip(fds, [socket.AF_INET, socket.AF_INET6, socket.AF_UNIX], strict=True)),
        )
        factories = {id(factory) for _, _, factory in adopted}
        self.assertEqual(len(factories), 1)
        self.assertIsInstance(adopted[0][2].buildProtocol(None), Echo)
        self.assertEqual(worker.ports, self.reactor.ports)
        self.assertEqual([port.reading for port in self.reactor.ports], [True] * 3)
        self.assertEqual(self.control.calls, [(WorkerReady, {"pid": os.getpid()})])
        self.assertTrue(self.reactor.running)

    def test_closesInheritedDescriptors(self) -> None:
        """
        Once a listener is adopted (the reactor holds its own duplicate),
        the inherited descriptor is closed.
        """
        worker = self.makeWorker(families=("AF_INET", "AF_UNIX"))
        fds = [handle.fd for handle in worker.spec.listeners]
        worker.start()
        for fd in fds:
            self.assertRaises(OSError, os.fstat, fd)

    def test_countsConnections(self) -> None:
        """
        Connections accepted on any adopted port are counted as open.
        """
        worker = self.startedWorker()
        first = self.reactor.ports[0].accept()
        second = self.reactor.ports[1].accept()
        self.assertEqual(worker.tracker.open, {first, second})
        first.lose()
        self.assertEqual(worker.tracker.open, {second})

    def test_startHookBeforeAccepting(self) -> None:
        """
        A factory's C{workerStarting} hook runs after adoption and before
        any accept: the ports read, and the worker reports ready, only once
        the hook's Deferred fires.
        """
        starting: defer.Deferred[None] = defer.Deferred()
        self.patch(HOOKED, "starting", starting)
        worker = self.makeWorker(protocol="tests.test_worker:HOOKED")
        worker.start()
        self.assertEqual(len(self.reactor.ports), 1)
        self.assertFalse(self.reactor.ports[0].reading)
        self.assertEqual(self.control.calls, [])
        starting.callback(None)
        self.assertTrue(self.reactor.ports[0].reading)
        self.assertEqual(self.control.commands(), [WorkerReady])

    def test_undeclaredHookNamed(self) -> None:
        """
        A factory with a hook's method that does not provide
        IWorkerLifecycle is served without it, and the log says why the
        hook did not run.
        """
        worker = self.makeWorker(protocol="tests.test_worker:UNDECLARED")
        worker.start()
        self.assertFalse(UndeclaredHooks.ran)
        self.assertTrue(self.reactor.ports[0].reading)
        [warning] = [formatEvent(e) for e in self.events if e["log_level"] is LogLevel.warn]
        self.assertEqual(
            warning,
            "the factory has a workerStarting method but does not provide IWorkerLifecycle"
            " (@implementer(IWorkerLifecycle) on its class): not run",
        )

    def test_failingStartHook(self) -> None:
        """
        A start hook that fails makes the worker fail to start, saying why.
        """
        self.patch(HOOKED, "starting", defer.fail(ValueError("bad config")))
        worker = self.makeWorker(protocol="tests.test_worker:HOOKED")
        worker.start()
        self.assertEqual(
            self.control.calls[0], (WorkerFailed, {"reason": "ValueError: bad config"})
        )
        self.assertFalse(self.reactor.ports[0].reading)
        self.assertExited(worker, EXIT_START_FAILED)

    def test_factoryRaises(self) -> None:
        """
        A protocol whose factory callable raises makes C{start} report
        C{WorkerFailed} with the exception's type and message, log the
        failure, adopt nothing and exit with status 3.
        """
        worker = self.makeWorker(protocol="tests.test_worker:brokenFactory")
        worker.start()
        self.assertEqual(
            self.control.calls[0], (WorkerFailed, {"reason": "RuntimeError: no database"})
        )
        self.assertNotIn(WorkerReady, self.control.commands())
        self.assertEqual(self.reactor.adoptedPorts, [])
        self.assertEqual(EXIT_START_FAILED, 3)
        self.assertExited(worker, 3)
        [failure] = [e["log_failure"] for e in self.events if "log_failure" in e]
        self.assertTrue(failure.check(RuntimeError))

    def test_unresolvableProtocol(self) -> None:
        """
        A protocol that no longer resolves in the worker is reported the
        same way, naming the problem.
        """
        worker = self.makeWorker(protocol="no.such.module:factory")
        worker.start()
        command, arguments = self.control.calls[0]
        self.assertIs(command, WorkerFailed)
        self.assertTrue(
            arguments["reason"].startswith("--protocol: cannot import module 'no.such.module'"),
            arguments["reason"],
        )
        self.assertExited(worker, EXIT_START_FAILED)
        # maccept's own check: one line, no traceback.
        self.assertEqual([e for e in self.events if "log_failure" in e], [])
        [line] = [formatEvent(e) for e in self.events if "could not start" in formatEvent(e)]
        self.assertIn("--protocol: cannot import module 'no.such.module'", line)

    def test_exitsOnlyOnceTheParentHeard(self) -> None:
        """
        The failing worker exits only when the parent has answered (or the
        channel has failed), so the reason is not lost with the process.
        """
        worker = self.makeWorker(
            protocol="tests.test_worker:brokenFactory", control=FakeControl(autoAnswer=False)
        )
        worker.start()
        self.assertEqual(self.control.commands(), [WorkerFailed])
        self.assertTrue(self.reactor.running)
        self.control.answers.pop(0).errback(Failure(ConnectionDone()))
        self.control.answerAll()
        self.assertExited(worker, EXIT_START_FAILED)


class ServingTests(WorkerTestCase):
    def test_heartbeat(self) -> None:
        """
        A serving worker beats every C{heartbeatInterval} seconds with its
        connection counts.
        """
        worker = self.startedWorker()
        self.reactor.ports[0].accept()
        self.reactor.ports[0].accept().lose()
        self.reactor.advance(worker.spec.heartbeatInterval)
        [beat] = [arguments for command, arguments in self.control.calls if command is Heartbeat]
        self.assertEqual((beat["accepted"], beat["open"]), (2, 1))
        self.reactor.advance(worker.spec.heartbeatInterval)
        self.assertEqual(self.control.commands().count(Heartbeat), 2)

    def test_heartbeatCarriesEveryCounter(self) -> None:
        """
        A heartbeat sends every counter the parent knows (L{STATS}), the
        wake-ups that found nothing to accept among them.
        """
        worker = self.startedWorker()
        worker.tracker.wokeForNothing()
        worker.tracker.wokeForNothing()
        worker.tracker.acceptedBatch()
        self.reactor.advance(worker.spec.heartbeatInterval)
        [beat] = [arguments for command, arguments in self.control.calls if command is Heartbeat]
        self.assertEqual(set(beat), {name.decode() for name, _ in STATS})
        self.assertEqual((beat["emptyWakeups"], beat["acceptBatches"]), (2, 1))

    def test_recycleAfter(self) -> None:
        """
        A worker that has accepted C{recycleAfter} connections asks, once,
        to be replaced, and goes on serving.
        """
        worker = self.makeWorker(recycleAfter=2)
        worker.start()
        port = self.reactor.ports[0]
        port.accept()
        self.assertNotIn(ReplaceMe, self.control.commands())
        port.accept()
        port.accept()
        replaceMe = [arguments for command, arguments in self.control.calls if command is ReplaceMe]
        self.assertEqual(replaceMe, [{"reason": "accepted 2 connections"}])
        self.assertTrue(port.reading)
        self.assertTrue(self.reactor.running)


class DrainTests(WorkerTestCase):
    def test_releasesPorts(self) -> None:
        """
        Draining stops reading every adopted port and closes the worker's
        own socket, without C{stopListening} (which would unlink a UNIX
        socket's path for every worker).
        """
        worker = self.startedWorker()
        worker.drain(30.0)
        for port in self.reactor.ports:
            self.assertFalse(port.reading)
            self.assertTrue(port.socket.closed)
            self.assertFalse(port.stopListeningCalled)

    def test_idleExitsAtOnce(self) -> None:
        """
        With no connection open, draining exits with status 0 at once.
        """
        worker = self.startedWorker()
        worker.drain(30.0)
        self.assertExited(worker, 0)
        self.assertNotIn(30.0, pendingDelays(self.reactor))

    def test_stopFactoryOnceDrained(self) -> None:
        """
        The factory's C{stopFactory} runs once the worker has drained, once
        for all its ports, as C{stopListening} on the last port would.
        """
        STOP_RECORDING.calls.clear()
        worker = self.makeWorker(
            protocol="tests.test_worker:STOP_RECORDING", families=("AF_INET", "AF_UNIX")
        )
        worker.start()
        connection = self.reactor.ports[0].accept()
        worker.drain(30.0)
        self.assertEqual(STOP_RECORDING.calls, ["start"])  # a connection still open
        connection.lose()
        self.assertExited(worker, 0)
        self.assertEqual(STOP_RECORDING.calls, ["start", "stop"])

    def test_stopFactoryOnceWhenParentGone(self) -> None:
        """
        With the parent gone, the worker leaves at once: its ports are
        released (no accept more, and no second stop at the reactor's
        shutdown) and its factory stopped, once.
        """
        STOP_RECORDING.calls.clear()
        worker = self.makeWorker(protocol="tests.test_worker:STOP_RECORDING")
        worker.start()
        [port] = self.reactor.ports
        worker.parentGone()
        self.assertExited(worker, 0)
        self.assertFalse(port.reading)
        self.assertEqual(STOP_RECORDING.calls, ["start", "stop"])

    def test_pausedWorkerLeavingWithConnections(self) -> None:
        """
        A worker paused at C{--max-concurrent} whose parent goes away does
        not read its released port again as its last connections close.
        """
        worker = self.makeWorker(maxConcurrent=1)
        worker.start()
        [port] = self.reactor.ports
        connection = port.accept()
        assert worker.governor is not None
        worker.governor.pause(retry=False)
        worker.parentGone()
        connection.lose()
        self.assertFalse(port.reading)

    def test_waitsForOpenConnections(self) -> None:
        """
        With connections open, draining waits and exits when the last one
        closes, cancelling its deadline.
        """
        worker = self.startedWorker()
        first = self.reactor.ports[0].accept()
        second = self.reactor.ports[1].accept()
        worker.drain(30.0)
        self.assertTrue(self.reactor.running)
        first.lose()
        self.assertTrue(self.reactor.running)
        second.lose()
        self.assertExited(worker, 0)
        self.assertNotIn(30.0, pendingDelays(self.reactor))
        self.assertFalse(first.aborted or second.aborted)

    def test_timeoutClosesAll(self) -> None:
        """
        Connections still open at the drain timeout are aborted; the worker
        exits once they are gone.
        """
        worker = self.startedWorker()
        connections = [self.reactor.ports[0].accept() for _ in range(3)]
        worker.drain(30.0)
        self.reactor.advance(30.0 - EPSILON)
        self.assertEqual([c.aborted for c in connections], [False] * 3)
        self.reactor.advance(EPSILON)
        self.assertEqual([c.aborted for c in connections], [True] * 3)
        self.assertTrue(self.reactor.running)
        for connection in connections:
            connection.lose()
        self.assertExited(worker, 0)

    def test_sweepTakesTheBacklog(self) -> None:
        """
        Before letting go of a listener, a draining worker accepts what
        waits in its backlog (a large batch), so the last close resets none.
        """
        worker = self.makeWorker()
        worker.start()
        [port] = self.reactor.ports
        port.connected = True
        worker.drain(30.0)
        self.assertEqual(port.sweeps, [10000])

    def test_sweepWithinMaxConcurrent(self) -> None:
        """
        With --max-concurrent the sweep takes only the room left, and none
        when the worker is full.
        """
        for held, expected in [(1, [2]), (3, None)]:
            worker = self.makeWorker(maxConcurrent=3)
            worker.start()
            [port] = self.reactor.ports
            port.connected = True
            for _ in range(held):
                port.accept()
            worker.drain(30.0)
            self.assertEqual(getattr(port, "sweeps", None), expected)

    def test_drainDuringStartHook(self) -> None:
        """
        A drain that comes while the start hook still runs takes nothing
        from the backlog, closes the ports (the factory is not ready to
        serve) and cancels the hook rather than waiting for it: the worker
        neither accepts nor says it is ready, and exits at once.
        """
        cancelled: list[object] = []
        starting: defer.Deferred[None] = defer.Deferred(cancelled.append)
        self.patch(HOOKED, "starting", starting)
        worker = self.makeWorker(protocol="tests.test_worker:HOOKED")
        worker.start()
        [port] = self.reactor.ports
        port.connected = True
        worker.drain(30.0)
        self.assertEqual(cancelled, [starting])
        self.assertFalse(hasattr(port, "sweeps"))
        self.assertFalse(port.reading)
        self.assertTrue(port.socket.closed)
        self.assertNotIn(WorkerReady, self.control.commands())
        self.assertNotIn(WorkerFailed, self.control.commands())
        self.assertExited(worker, 0)

    def test_hookFinishingDespiteCancel(self) -> None:
        """
        A start hook whose cancellation finishes it all the same leaves the
        worker draining, not serving.
        """
        starting: defer.Deferred[None] = defer.Deferred(lambda d: d.callback(None))
        self.patch(HOOKED, "starting", starting)
        worker = self.makeWorker(protocol="tests.test_worker:HOOKED")
        worker.start()
        worker.drain(30.0)
        self.assertFalse(self.reactor.ports[0].reading)
        self.assertNotIn(WorkerReady, self.control.commands())
        self.assertExited(worker, 0)

    def test_hookCancellerRaising(self) -> None:
        """
        A start hook whose canceller raises does not hold the drain: the
        failure is logged and the worker leaves, once, even if the hook
        ends later.
        """

        def canceller(d: defer.Deferred[None]) -> None:
            raise RuntimeError("cannot cancel")

        starting: defer.Deferred[None] = defer.Deferred(canceller)
        self.patch(HOOKED, "starting", starting)
        worker = self.makeWorker(protocol="tests.test_worker:HOOKED")
        worker.start()
        worker.drain(30.0)
        [failure] = [e["log_failure"] for e in self.events if "log_failure" in e]
        self.assertTrue(failure.check(RuntimeError))
        self.assertExited(worker, 0)
        starting.callback(None)  # the hook ends after all
        self.assertEqual(self.control.commands().count(Farewell), 1)
        self.assertNotIn(WorkerReady, self.control.commands())

    def test_terminatedWhileStarting(self) -> None:
        """
        SIGTERM to a worker still starting asks for its replacement, as it
        does once the worker serves, so that the pool takes its exit for a
        recycling and not a crash; its start is cut short.
        """
        starting: defer.Deferred[None] = defer.Deferred()
        self.patch(HOOKED, "starting", starting)
        worker = self.makeWorker(protocol="tests.test_worker:HOOKED")
        worker.start()
        worker.terminate()
        replaceMe = [arguments for command, arguments in self.control.calls if command is ReplaceMe]
        self.assertEqual(replaceMe, [{"reason": "it received SIGTERM", "signalled": True}])
        self.assertNotIn(WorkerReady, self.control.commands())
        self.assertExited(worker, 0)

    def test_drainTwice(self) -> None:
        """
        A second drain request changes nothing: one deadline, one release.
        """
        worker = self.startedWorker()
        self.reactor.ports[0].accept()
        worker.drain(30.0)
        worker.drain(5.0)
        delays = pendingDelays(self.reactor)
        self.assertEqual(delays.count(30.0), 1)
        self.assertNotIn(5.0, delays)


class ParentGoneTests(WorkerTestCase):
    def test_stopsReactor(self) -> None:
        """
        When the parent is gone the worker stops its reactor, status 0,
        even with connections open.
        """
        worker = self.startedWorker()
        self.reactor.ports[0].accept()
        worker.parentGone()
        self.assertExited(worker, 0)

    def test_notRunning(self) -> None:
        """
        Before the reactor runs there is nothing to stop.
        """
        worker = self.makeWorker()
        self.reactor.running = False
        worker.parentGone()
        self.assertFalse(self.reactor.hasStopped)

    def test_controlClosedMeansParentGone(self) -> None:
        """
        The worker's control connection becomes its C{control} when made;
        when it is lost, logs go to stderr instead of sent, and the worker
        stops.
        """
        stderr = io.StringIO()
        self.patch(sys, "stderr", stderr)
        worker = self.makeWorker()
        forwarder = ForwardingObserver()
        control = WorkerControl(worker, forwarder)
        transport = StringTransport()
        control.makeConnection(transport)
        self.assertIs(worker.control, control)
        forwarder({"log_format": "while connected", "log_level": LogLevel.info})
        self.assertIn(b"while connected", transport.value())
        control.connectionLost(Failure(ConnectionDone()))
        self.assertExited(worker, 0)
        forwarder({"log_format": "after the parent left", "log_level": LogLevel.info})
        self.assertNotIn(b"after the parent left", transport.value())
        self.assertEqual(stderr.getvalue(), "after the parent left\n")
