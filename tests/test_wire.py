"""
The wire between parent and worker: the spec on the command line, and the
AMP commands between a real L{WorkerControl} and a real L{ParentControl}
connected in memory.
"""

from __future__ import annotations

import os
import signal
import socket

from hypothesis import given
from hypothesis import strategies as st
from twisted.logger import Logger, LogLevel, capturedLogs, formatEvent
from twisted.test.iosim import connectedServerAndClient
from twisted.trial.unittest import SynchronousTestCase

from maccept._logforward import ForwardingObserver
from maccept._pool import PoolSettings, WorkerPool
from maccept._states import PoolState, WorkerState
from maccept._wire import BoardHandle, ListenerHandle, WorkerSpec
from maccept._worker import EXIT_START_FAILED, Worker, WorkerControl
from maccept._workerprocess import ParentControl, WorkerProcess
from tests.fakes import (
    FakeProcess,
    ProcessMemoryReactor,
    WorkerMemoryReactor,
    pendingDelays,
    realDescriptor,
)

FAMILIES = ["AF_INET", "AF_INET6", "AF_UNIX"]

handles = st.builds(
    ListenerHandle,
    fd=st.integers(min_value=0, max_value=2**31 - 1),
    family=st.sampled_from(FAMILIES),
    description=st.text(),
)
seconds = st.floats(min_value=0, max_value=1e9, allow_nan=False, allow_infinity=False)
specs = st.builds(
    WorkerSpec,
    number=st.integers(min_value=1, max_value=10_000),
    protocol=st.text(),
    parentPid=st.integers(min_value=1, max_value=2**31 - 1),
    listeners=st.lists(handles, max_size=5).map(tuple),
    board=st.none() | st.builds(BoardHandle, fd=st.integers(0, 1024), slot=st.integers(0, 1023)),
    gracefulTimeout=seconds,
    heartbeatInterval=seconds,
    recycleAfter=st.none() | st.integers(min_value=1),
)


def brokenFactory() -> object:
    raise RuntimeError("no database")


class SpecTests(SynchronousTestCase):
    @given(specs)
    def test_roundTrip(self, spec: WorkerSpec) -> None:
        """
        Any spec survives its trip through the command line, and its
        argument is plain ASCII with no NUL, so C{exec} can carry it.
        """
        argument = spec.toArgument()
        self.assertEqual(WorkerSpec.fromArgument(argument), spec)
        self.assertTrue(argument.isascii())
        self.assertNotIn("\x00", argument)

    def test_noListeners(self) -> None:
        """
        A spec has no listeners unless given some.
        """
        spec = WorkerSpec(number=1, protocol="echo", parentPid=1)
        self.assertEqual(WorkerSpec.fromArgument(spec.toArgument()).listeners, ())

    def test_addressFamily(self) -> None:
        """
        A handle's family name maps to the socket module's constant.
        """
        for name, family in [
            ("AF_INET", socket.AF_INET),
            ("AF_INET6", socket.AF_INET6),
            ("AF_UNIX", socket.AF_UNIX),
        ]:
            handle = ListenerHandle(fd=4, family=name, description="x")
            self.assertEqual(handle.addressFamily, family)

    def test_unknownFamily(self) -> None:
        """
        A family a worker cannot adopt is an error, not a guess.
        """
        handle = ListenerHandle(fd=4, family="AF_PACKET", description="x")
        self.assertRaises(KeyError, lambda: handle.addressFamily)


class ControlChannelTests(SynchronousTestCase):
    """
    A one-worker pool on a fake reactor whose worker's control channel is
    connected, in memory, to a real L{Worker}'s L{WorkerControl}.
    """

    def connect(
        self,
        protocol: str = "echo",
        forwarder: ForwardingObserver | None = None,
        listeners: tuple[ListenerHandle, ...] = (),
        recycleAfter: int | None = None,
    ) -> None:
        self.parentReactor = ProcessMemoryReactor()
        self.fatal: list[str] = []
        self.pool = WorkerPool(
            self.parentReactor, [], PoolSettings(size=1, balance=False), onFatal=self.fatal.append
        )
        self.pool.startService()
        [self.process] = self.parentReactor.processes
        self.workerProcess = self.process.proto
        assert isinstance(self.workerProcess, WorkerProcess)
        [(_, _, parentFactory)] = self.parentReactor.adoptedStreamConnections

        self.workerReactor = WorkerMemoryReactor()
        self.workerReactor.running = True
        spec = WorkerSpec(
            number=1,
            protocol=protocol,
            parentPid=os.getpid(),
            listeners=listeners,
            recycleAfter=recycleAfter,
        )
        self.worker = Worker(self.workerReactor, spec)
        self.forwarder = forwarder or ForwardingObserver()
        # In a worker process the forwarder is the only log observer.
        self.worker.log = Logger(namespace="maccept._worker.Worker", observer=self.forwarder)
        self.workerControl: WorkerControl
        self.parentControl: ParentControl
        self.workerControl, self.parentControl, self.pump = connectedServerAndClient(
            lambda: parentFactory.buildProtocol(None),
            lambda: WorkerControl(self.worker, self.forwarder),
        )

    @property
    def fakeProcess(self) -> FakeProcess:
        assert isinstance(self.process, FakeProcess)
        return self.process

    def test_connected(self) -> None:
        """
        Each end becomes its side's control channel.
        """
        self.connect()
        self.assertIsInstance(self.parentControl, ParentControl)
        self.assertIs(self.workerProcess.control, self.parentControl)
        self.assertIs(self.worker.control, self.workerControl)

    def test_workerReady(self) -> None:
        """
        A worker that starts reports ready, which makes its process ready
        in the parent and the pool ready.
        """
        self.connect()
        self.worker.start()
        self.assertIs(self.workerProcess.state, WorkerState.STARTING)
        self.pump.flush()
        self.assertIs(self.workerProcess.state, WorkerState.READY)
        self.assertIs(self.pool.state, PoolState.RUNNING)

    def test_workerFailed(self) -> None:
        """
        A worker that cannot start tells the parent why (and its traceback
        reaches the parent's log), and sets its exit status once the parent
        has answered.
        """
        self.connect("tests.test_wire:brokenFactory")
        self.worker.start()
        self.assertEqual(self.worker.exitCode, 0)
        with capturedLogs() as events:
            self.pump.flush()
        self.assertEqual(self.workerProcess.failureReason, "RuntimeError: no database")
        self.assertEqual(self.worker.exitCode, EXIT_START_FAILED)
        self.assertFalse(self.workerReactor.running)
        [traceback] = [
            formatEvent(e)
            for e in events
            if e.get("log_system") == "worker 1 pid 1000" and "Traceback" in formatEvent(e)
        ]
        self.assertIn("brokenFactory", traceback)
        self.assertTrue(traceback.endswith("RuntimeError: no database"), traceback)
        self.fakeProcess.end(EXIT_START_FAILED)
        self.assertEqual(self.fatal, ["worker 1 failed to start: RuntimeError: no database"])

    def test_logEvent(self) -> None:
        """
        An event logged in the worker is published in the parent with the
        worker's tag, its level and its text; events logged before the
        channel was up arrive first.
        """
        forwarder = ForwardingObserver()
        forwarder({"log_format": "early", "log_level": LogLevel.info, "log_time": 1.0})
        log = Logger(namespace="app", observer=forwarder)
        with capturedLogs() as events:
            self.connect(forwarder=forwarder)
            log.warn("hello from {who}", who="the worker")
            self.pump.flush()
        forwarded = [e for e in events if e.get("log_system") == "worker 1 pid 1000"]
        self.assertEqual(
            [(e["log_level"], formatEvent(e)) for e in forwarded],
            [(LogLevel.info, "early"), (LogLevel.warn, "hello from the worker")],
        )
        self.assertEqual(forwarded[1]["log_namespace"], "app")

    def test_drain(self) -> None:
        """
        Stopping the pool sends C{Drain} with the pool's graceful timeout:
        the worker stops accepting, gives its open connection that long,
        and exits when it closes.
        """
        self.connect(listeners=(ListenerHandle(realDescriptor(self), "AF_INET", "tcp:0"),))
        self.worker.start()
        self.pump.flush()
        connection = self.workerReactor.ports[0].accept()
        d = self.pool.stopService()
        self.pump.flush()
        self.assertFalse(self.workerReactor.ports[0].reading)
        self.assertIn(self.pool.settings.gracefulTimeout, pendingDelays(self.workerReactor))
        self.assertTrue(self.workerReactor.running)
        connection.lose()
        self.pump.flush()
        self.assertFalse(self.workerReactor.running)
        self.assertEqual(self.fakeProcess.signals, [])
        self.assertNoResult(d)
        self.fakeProcess.end()
        self.successResultOf(d)

    def test_heartbeat(self) -> None:
        """
        The worker's heartbeats reach its process in the parent, which
        notes when it last heard one and the worker's counts.
        """
        self.connect(listeners=(ListenerHandle(realDescriptor(self), "AF_INET", "tcp:0"),))
        self.worker.start()
        self.pump.flush()
        self.workerReactor.ports[0].accept()
        self.parentReactor.advance(5.0)
        self.workerReactor.advance(self.worker.spec.heartbeatInterval)
        self.pump.flush()
        self.assertEqual(self.workerProcess.lastHeartbeat, 5.0)
        self.assertEqual(self.workerProcess.stats["accepted"], 1)
        self.assertEqual(self.workerProcess.stats["open"], 1)

    def test_replaceMe(self) -> None:
        """
        A worker that reached its connection limit asks to be replaced:
        the pool starts a replacement for it and keeps it serving.
        """
        self.connect(
            listeners=(ListenerHandle(realDescriptor(self), "AF_INET", "tcp:0"),), recycleAfter=1
        )
        self.worker.start()
        self.pump.flush()
        self.workerReactor.ports[0].accept()
        self.pump.flush()
        self.assertEqual(len(self.parentReactor.processes), 2)
        self.assertIs(self.parentReactor.processes[1].proto.replaces, self.workerProcess)
        self.assertEqual(self.workerProcess.stopReason, "recycle")
        self.assertIs(self.workerProcess.state, WorkerState.READY)

    def test_parentGone(self) -> None:
        """
        When the channel closes, the worker stops, and the parent no longer
        counts it as connected: a stop then signals instead.
        """
        self.connect()
        assert self.parentControl.transport is not None
        self.parentControl.transport.loseConnection()
        self.pump.flush()
        self.assertFalse(self.workerReactor.running)
        self.pool.stopService()
        self.assertEqual(self.fakeProcess.signals, [signal.SIGTERM])
