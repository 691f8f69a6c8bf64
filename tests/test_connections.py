"""
Counting a worker's connections: the tracker, and ports made to report to
it, both a fake port and a real TCP port driven by a memory reactor.
"""

from __future__ import annotations

import os
import select
import socket
import struct
import sys
import tempfile
import time
from collections.abc import Callable

from twisted.internet import tcp, unix
from twisted.internet.error import ConnectionAborted, ConnectionDone, ConnectionLost
from twisted.internet.interfaces import IPushProducer
from twisted.internet.main import CONNECTION_DONE, CONNECTION_LOST
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import LogLevel, capturedLogs, formatEvent
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from maccept._connections import ConnectionTracker, kernelSendQueue, trackConnections
from tests.fakes import FakeAdoptedPort, FakeServerTransport, WorkerMemoryReactor


class TrackerTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.tracker = ConnectionTracker()
        self.idle: list[str] = []

    def test_counts(self) -> None:
        """
        Opened connections are open until closed; C{accepted} counts every
        connection ever opened.
        """
        a, b = FakeServerTransport(), FakeServerTransport()
        self.tracker.opened(a)  # type: ignore[arg-type]
        self.tracker.opened(b)  # type: ignore[arg-type]
        self.tracker.closed(a)  # type: ignore[arg-type]
        self.assertEqual(self.tracker.open, {b})
        self.assertEqual(self.tracker.accepted, 2)

    def test_whenIdleAtOnce(self) -> None:
        """
        With nothing open, C{whenIdle} calls back at once.
        """
        self.tracker.whenIdle(lambda: self.idle.append("idle"))
        self.assertEqual(self.idle, ["idle"])

    def test_whenIdleWaitsForLast(self) -> None:
        """
        With connections open, every waiter is called once, when the last
        one closes, and not again on a later idle moment.
        """
        a, b = FakeServerTransport(), FakeServerTransport()
        self.tracker.opened(a)  # type: ignore[arg-type]
        self.tracker.opened(b)  # type: ignore[arg-type]
        self.tracker.whenIdle(lambda: self.idle.append("first"))
        self.tracker.whenIdle(lambda: self.idle.append("second"))
        self.tracker.closed(a)  # type: ignore[arg-type]
        self.assertEqual(self.idle, [])
        self.tracker.closed(b)  # type: ignore[arg-type]
        self.assertEqual(self.idle, ["first", "second"])
        self.tracker.opened(a)  # type: ignore[arg-type]
        self.tracker.closed(a)  # type: ignore[arg-type]
        self.assertEqual(self.idle, ["first", "second"])

    def test_closeUnknown(self) -> None:
        """
        Closing a connection that is not open changes no count.
        """
        a = FakeServerTransport()
        self.tracker.opened(a)  # type: ignore[arg-type]
        self.tracker.closed(FakeServerTransport())  # type: ignore[arg-type]
        self.assertEqual(self.tracker.open, {a})

    def test_closeIdle(self) -> None:
        """
        C{closeIdle} aborts the connections silent for the timeout or
        longer, leaves the others, and counts what it closed.
        """
        old, fresh = FakeServerTransport(), FakeServerTransport()
        old.lastActive, fresh.lastActive = 100.0, 109.5  # type: ignore[attr-defined]
        self.tracker.opened(old)  # type: ignore[arg-type]
        self.tracker.opened(fresh)  # type: ignore[arg-type]
        self.assertEqual(self.tracker.closeIdle(5.0, now=110.0), 1)
        self.assertEqual((old.aborted, fresh.aborted), (True, False))
        self.assertEqual(self.tracker.idleClosed, 1)

    def test_closeIdleSeesTheKernelSend(self) -> None:
        """
        A connection this process has not written to for the timeout, but
        whose bytes the kernel still sends (its queue changed between two
        looks), is active; once the queue stops changing, the timeout runs
        from the last change.
        """
        reading = FakeServerTransport()
        reading.lastActive = 100.0  # type: ignore[attr-defined]
        self.tracker.opened(reading)  # type: ignore[arg-type]
        queued = iter([30000, 20000, 20000, 20000, 20000])
        self.tracker.kernelQueued = lambda transport: next(queued)
        for now in (101.0, 102.0, 105.0, 105.9):  # a look every quarter timeout
            self.assertEqual(self.tracker.closeIdle(4.0, now=now), 0)
        self.assertEqual(reading.lastActive, 102.0)  # type: ignore[attr-defined]
        self.assertFalse(reading.aborted)
        self.assertEqual(self.tracker.closeIdle(4.0, now=106.0), 1)
        self.assertTrue(reading.aborted)

    def test_closeIdleFirstLookIsNoChange(self) -> None:
        """
        The first look at a quiet connection's queue, or one taken before it
        was last active, shows no change: a client stuck with bytes queued
        gets no time more than the timeout's.
        """
        stuck = FakeServerTransport()
        stuck.lastActive = 100.0  # type: ignore[attr-defined]
        self.tracker.opened(stuck)  # type: ignore[arg-type]
        stuck.kernelSample = (5000, 90.0)  # type: ignore[attr-defined]  # before its last write
        self.tracker.kernelQueued = lambda transport: 20000
        self.assertEqual(self.tracker.closeIdle(4.0, now=101.0), 0)
        self.assertEqual(stuck.lastActive, 100.0)  # type: ignore[attr-defined]
        self.assertEqual(self.tracker.closeIdle(4.0, now=104.0), 1)

    def test_closeIdleAsksTheKernelOnlyOfQuietOnes(self) -> None:
        """
        The kernel's queue is looked at only for connections quiet for a
        quarter of the timeout: the others are active anyway.
        """
        busy = FakeServerTransport()
        busy.lastActive = 109.5  # type: ignore[attr-defined]
        self.tracker.opened(busy)  # type: ignore[arg-type]
        asked: list[object] = []

        def kernelQueued(transport: object) -> int:
            asked.append(transport)
            return 0

        self.tracker.kernelQueued = kernelQueued
        self.assertEqual(self.tracker.closeIdle(4.0, now=110.0), 0)
        self.assertEqual(asked, [])
        self.assertEqual(self.tracker.closeIdle(4.0, now=111.0), 0)
        self.assertEqual(asked, [busy])

    def test_kernelSendQueue(self) -> None:
        """
        L{kernelSendQueue} reads what a connected socket's kernel holds to
        send (for a UNIX socket, what the peer has not read yet, counted
        with the kernel's overhead), and says 0 for a transport with no
        usable socket.
        """
        server, client = socket.socketpair()
        self.addCleanup(server.close)
        self.addCleanup(client.close)
        self.assertEqual(kernelSendQueue(FakeServerTransport()), 0)

        class Holder:
            socket = server

        self.assertEqual(kernelSendQueue(Holder()), 0)
        server.send(b"x" * 100)
        self.assertGreaterEqual(kernelSendQueue(Holder()), 100)
        client.recv(100)
        self.assertEqual(kernelSendQueue(Holder()), 0)

    def test_closeIdleTakesSilentClosing(self) -> None:
        """
        A connection that is closing but cannot finish (its client reads
        nothing of what is left to send) is aborted once silent too.
        """
        stuck = FakeServerTransport()
        stuck.lastActive = 0.0  # type: ignore[attr-defined]
        stuck.disconnecting = True  # type: ignore[attr-defined]
        self.tracker.opened(stuck)  # type: ignore[arg-type]
        self.assertEqual(self.tracker.closeIdle(5.0, now=110.0), 1)
        self.assertTrue(stuck.aborted)

    def test_closeIdleSkipsClosing(self) -> None:
        """
        A connection already being aborted is neither aborted again nor
        counted again.
        """
        closing = FakeServerTransport()
        closing.lastActive = 0.0  # type: ignore[attr-defined]
        closing._aborting = True  # type: ignore[attr-defined]
        self.tracker.opened(closing)  # type: ignore[arg-type]
        self.assertEqual(self.tracker.closeIdle(5.0, now=110.0), 0)
        self.assertFalse(closing.aborted)

    def test_closeAll(self) -> None:
        """
        C{closeAll} aborts every open connection (and only those).
        """
        a, b, gone = FakeServerTransport(), FakeServerTransport(), FakeServerTransport()
        for transport in (a, b, gone):
            self.tracker.opened(transport)  # type: ignore[arg-type]
        self.tracker.closed(gone)  # type: ignore[arg-type]
        self.tracker.closeAll()
        self.assertEqual((a.aborted, b.aborted, gone.aborted), (True, True, False))

    def test_onChange(self) -> None:
        """
        An C{onChange} callback hears the open count after every change.
        """
        counts: list[int] = []
        tracker = ConnectionTracker(onChange=counts.append)
        a, b = FakeServerTransport(), FakeServerTransport()
        tracker.opened(a)  # type: ignore[arg-type]
        tracker.opened(b)  # type: ignore[arg-type]
        tracker.closed(a)  # type: ignore[arg-type]
        tracker.closed(b)  # type: ignore[arg-type]
        self.assertEqual(counts, [1, 2, 1, 0])


class FakePortTests(SynchronousTestCase):
    def test_constructedTransportsReport(self) -> None:
        """
        A tracked port's transports report to the tracker when built and
        when lost, and still do what their own class does.
        """
        tracker = ConnectionTracker()
        port = FakeAdoptedPort(7, socket.AF_INET, Factory())
        trackConnections(port, tracker)
        transport = port.transport("sock", "protocol")
        self.assertIsInstance(transport, FakeServerTransport)
        self.assertEqual(transport.args, ("sock", "protocol"))
        self.assertEqual(tracker.open, {transport})
        reason = Failure(ConnectionDone())
        transport.connectionLost(reason)
        self.assertEqual(tracker.open, set())
        self.assertIs(transport.lostReason, reason)

    def test_classUntouched(self) -> None:
        """
        Only the given port is changed: its class, and other ports of it,
        build untracked transports.
        """
        tracker = ConnectionTracker()
        tracked = FakeAdoptedPort(7, socket.AF_INET, Factory())
        other = FakeAdoptedPort(8, socket.AF_INET, Factory())
        trackConnections(tracked, tracker)
        self.assertIs(FakeAdoptedPort.transport, FakeServerTransport)
        other.accept()
        self.assertEqual(tracker.accepted, 0)
        self.assertEqual(tracked.transport.__name__, "TrackedFakeServerTransport")

    def test_noDelayOnTCPOnly(self) -> None:
        """
        Connections of a TCP port have Nagle's algorithm turned off; those
        of a UNIX port are left alone (the option means nothing there).
        """
        tracker = ConnectionTracker()
        tcpPort = FakeAdoptedPort(7, socket.AF_INET6, Factory())
        unixPort = FakeAdoptedPort(8, socket.AF_UNIX, Factory())
        trackConnections(tcpPort, tracker)
        trackConnections(unixPort, tracker)
        nodelay = (socket.IPPROTO_TCP, socket.TCP_NODELAY)
        if sys.platform.startswith("linux"):
            # Set once on the listener: Linux copies it into each accepted
            # socket (RealPortTests.test_noDelay sees it there).
            self.assertEqual(tcpPort.socket.options, {nodelay: 1})
            self.assertEqual(tcpPort.accept().socket.options, {})
        else:
            self.assertEqual(tcpPort.accept().socket.options, {nodelay: 1})
        self.assertEqual(unixPort.socket.options, {})
        self.assertEqual(unixPort.accept().socket.options, {})


class Recorder(Protocol):
    def __init__(self) -> None:
        self.lost: list[Failure] = []

    def connectionLost(self, reason: Failure) -> None:  # type: ignore[override]
        self.lost.append(reason)


class RealPortTests(SynchronousTestCase):
    """
    A real C{tcp.Port} listening on loopback, with a memory reactor: the
    test plays the reactor's part by calling C{doRead} and advancing time.
    """

    def setUp(self) -> None:
        self.reactor = WorkerMemoryReactor()
        self.protocols: list[Recorder] = []

        def recorder() -> Recorder:
            self.protocols.append(Recorder())
            return self.protocols[-1]

        factory = Factory.forProtocol(recorder)
        factory.noisy = False
        self.port = tcp.Port(0, factory, interface="127.0.0.1", reactor=self.reactor)
        self.port.startListening()
        self.addCleanup(self.stopListening)
        self.tracker = ConnectionTracker()
        trackConnections(self.port, self.tracker)

    def stopListening(self) -> None:
        self.port.stopListening()
        self.reactor.advance(0)

    def connectClient(self) -> socket.socket:
        client = socket.create_connection(("127.0.0.1", self.port.getHost().port))
        self.addCleanup(client.close)
        return client

    def test_acceptedConnectionsReport(self) -> None:
        """
        Connections the port accepts are open in the tracker, through the
        port's own transport class.
        """
        self.connectClient()
        self.connectClient()
        self.port.doRead()
        self.assertEqual(self.tracker.accepted, 2)
        self.assertEqual(len(self.tracker.open), 2)
        for transport in self.tracker.open:
            self.assertIsInstance(transport, tcp.Server)
        self.assertIs(tcp.Port.transport, tcp.Server)

    def test_noDelay(self) -> None:
        """
        Accepted TCP connections have C{TCP_NODELAY} set.
        """
        self.connectClient()
        self.port.doRead()
        [transport] = self.tracker.open
        assert isinstance(transport, tcp.Server)
        option = transport.socket.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
        self.assertNotEqual(option, 0)

    def test_bytesCounted(self) -> None:
        """
        The tracker counts the bytes every connection read and wrote.
        """
        client = self.connectClient()
        self.port.doRead()
        [transport] = self.tracker.open
        assert isinstance(transport, tcp.Server)
        client.sendall(b"hello")
        transport.doRead()
        [protocol] = self.protocols
        assert protocol.transport is not None
        protocol.transport.write(b"world!")
        transport.doWrite()
        self.assertEqual((self.tracker.bytesReceived, self.tracker.bytesSent), (5, 6))
        self.assertLessEqual(transport.lastActive, time.monotonic())  # type: ignore[attr-defined]
        client.settimeout(5)
        self.assertEqual(client.recv(6), b"world!")

    def accepted(self) -> tuple[socket.socket, tcp.Server]:
        client = self.connectClient()
        client.settimeout(5)
        self.port.doRead()
        [transport] = self.tracker.open
        assert isinstance(transport, tcp.Server)
        return client, transport

    def receive(self, client: socket.socket, size: int) -> bytes:
        received = b""
        while len(received) < size:
            chunk = client.recv(size - len(received))
            if not chunk:
                break
            received += chunk
        return received

    def test_clientResetCounted(self) -> None:
        """
        A connection the client resets is counted (and logged, at most
        once a minute), as C{maccept_connections_reset_total}.
        """
        client, transport = self.accepted()
        client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        client.close()
        why = transport.doRead()
        with capturedLogs() as events:
            # As the reactor does with what doRead returned.
            transport.connectionLost(Failure(why))
        self.assertEqual((self.tracker.resets.total, len(self.tracker.open)), (1, 0))
        self.assertEqual(
            [formatEvent(e) for e in events],
            ["clients reset 1 connection(s) since the last such line"],
        )
        # Routine for some clients: not a warning.
        self.assertEqual([e["log_level"] for e in events], [LogLevel.info])

    def test_resetTakenByAWriteThrough(self) -> None:
        """
        The kernel reports a reset once: when a write-through's send takes
        it (and leaves the bytes queued, as Twisted would), the next read
        finds only an end of file, which must still be reported, and
        counted, as the connection lost, not as a clean close.
        """
        client, transport = self.accepted()
        client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        client.close()
        select.select([transport.socket], [], [], 5)
        transport.write(b"too late")
        why = transport.doRead()
        self.assertIs(why, CONNECTION_LOST)
        transport.connectionLost(Failure(why))
        self.assertEqual(self.tracker.resets.total, 1)

    def test_resetWhileClosingCountedOnlyIfDataWasLost(self) -> None:
        """
        A reset that meets the server's own close (Twisted, no longer
        reading, reports it as lost) counts only if the server still had
        bytes to send: a client that closes at once after its last message
        (TLS's close_notify) lost nothing.
        """
        for queued, counted in [(b"", 0), (b"unsent", 1)]:
            _client, transport = self.accepted()
            transport.dataBuffer = queued
            transport.loseConnection()
            transport.connectionLost(Failure(ConnectionLost()))
            self.assertEqual(self.tracker.resets.total, counted)

    def test_closesAndAbortsNotCounted(self) -> None:
        """
        A client's clean close is no reset, and neither is the server's
        own abort (the idle timeout, the end of a drain).
        """
        client, transport = self.accepted()
        client.close()
        transport.connectionLost(Failure(transport.doRead()))
        client, transport = self.accepted()
        transport.abortConnection()
        self.reactor.advance(0)
        self.assertEqual((self.tracker.resets.total, len(self.tracker.open)), (0, 0))

    def test_writeThrough(self) -> None:
        """
        With nothing queued, a write goes to the kernel at once: the client
        receives it with no writable event from the reactor, and nothing
        is left queued.
        """
        client, transport = self.accepted()
        transport.write(b"at once")
        self.assertEqual(self.receive(client, 7), b"at once")
        self.assertEqual((transport.dataBuffer, transport._tempDataLen), (b"", 0))
        self.assertEqual(self.tracker.bytesSent, 7)

    def test_writeThroughKeepsOrder(self) -> None:
        """
        What the kernel does not take is queued, and later writes queue
        behind it: the client receives every byte in order, and the
        producer is paused while the queue is full and resumed after.
        """
        client, transport = self.accepted()
        transport.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        paused: list[bool] = []

        class Producer:
            def pauseProducing(self) -> None:
                paused.append(True)

            def resumeProducing(self) -> None:
                paused.append(False)

            def stopProducing(self) -> None:
                pass

        transport.registerProducer(Producer(), True)
        big = bytes(range(256)) * 4096
        transport.write(big)
        transport.write(b"tail")
        self.assertTrue(transport.dataBuffer or transport._tempDataLen)
        self.assertEqual(set(paused), {True})
        expected = big + b"tail"
        received = b""
        for _ in range(100_000):
            if len(received) >= len(expected):
                break
            transport.doWrite()
            readable, _, _ = select.select([client], [], [], 0.01)
            if readable:
                received += client.recv(65536)
        self.assertEqual(received, expected)
        self.assertEqual(self.tracker.bytesSent, len(expected))
        self.assertIs(paused[-1], False)

    def test_pullProducerKeptAsking(self) -> None:
        """
        A pull producer (C{FileSender}, chargen) is asked for more each time
        its last chunk has gone, although write-through sends that chunk at
        once: its writes are queued, so the transport's C{doWrite} asks.
        """
        client, transport = self.accepted()
        asked: list[int] = []

        class Pull:
            def resumeProducing(self) -> None:
                asked.append(1)
                transport.write(b"p" * 1000)
                if len(asked) == 5:
                    transport.unregisterProducer()

            def stopProducing(self) -> None:
                pass

        transport.registerProducer(Pull(), False)
        received = b""
        for _ in range(500):
            if len(received) >= 5000:
                break
            # As the reactor would: only while the transport waits to write.
            if transport in self.reactor.getWriters():
                transport.doWrite()
            readable, _, _ = select.select([client], [], [], 0.01)
            if readable:
                received += client.recv(65536)
        self.assertEqual((len(asked), received), (5, b"p" * 5000))

    def test_nothingSentAfterAbort(self) -> None:
        """
        A write in the same reactor turn as C{abortConnection} never
        reaches the client.
        """
        client, transport = self.accepted()
        transport.abortConnection()
        transport.write(b"secret")
        self.reactor.advance(0)
        try:
            data = client.recv(100)
        except ConnectionResetError:
            data = b""
        self.assertEqual(data, b"")

    def test_noWriteThroughWhileDisconnecting(self) -> None:
        """
        After C{loseConnection}, a write is queued like any other: the
        close still waits for it and it is sent before the connection
        closes.
        """
        client, transport = self.accepted()
        transport.loseConnection()
        transport.write(b"late")
        self.assertEqual(transport._tempDataLen, 4)
        self.assertIsNotNone(transport.doWrite())
        self.assertEqual(self.receive(client, 4), b"late")

    def test_readOutcomes(self) -> None:
        """
        A read with nothing waiting reports nothing; a clean close is
        C{CONNECTION_DONE}; a reset is C{CONNECTION_LOST}; data goes to the
        protocol and is counted.
        """
        client, transport = self.accepted()
        [protocol] = self.protocols
        received: list[bytes] = []
        protocol.dataReceived = lambda data: received.append(data)  # type: ignore[method-assign]
        self.assertIsNone(transport.doRead())
        client.sendall(b"abc")
        select.select([transport.socket], [], [], 5)
        self.assertIsNone(transport.doRead())
        self.assertEqual((received, self.tracker.bytesReceived), ([b"abc"], 3))
        client.shutdown(socket.SHUT_WR)
        select.select([transport.socket], [], [], 5)
        self.assertIs(transport.doRead(), CONNECTION_DONE)

    def test_largeReads(self) -> None:
        """
        One read takes up to 256 KiB, not Twisted's 64 KiB: a large message
        costs fewer reads.
        """
        client, transport = self.accepted()
        transport.socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        [protocol] = self.protocols
        received: list[bytes] = []
        protocol.dataReceived = lambda data: received.append(data)  # type: ignore[method-assign]
        message = b"x" * (200 * 1024)
        client.sendall(message)
        while sum(map(len, received)) < len(message):
            select.select([transport.socket], [], [], 5)
            transport.doRead()
        self.assertGreater(max(map(len, received)), 64 * 1024)

    def test_producerPausedAtTwistedsMark(self) -> None:
        """
        The larger reads leave backpressure as Twisted has it: a streaming
        producer is paused once about 64 KiB (C{bufferSize}) waits in the
        transport's queue, not 256 KiB.
        """
        client, transport = self.accepted()
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        transport.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        paused: list[bool] = []

        @implementer(IPushProducer)
        class Producer:
            def pauseProducing(self) -> None:
                paused.append(True)

            def resumeProducing(self) -> None:
                pass

            def stopProducing(self) -> None:
                pass

        transport.registerProducer(Producer(), True)
        chunk = b"x" * 4096
        for _ in range(1000):
            transport.write(chunk)
            if paused:
                break
        self.assertEqual(paused, [True])
        queued = len(transport.dataBuffer) + transport._tempDataLen
        self.assertLessEqual(queued, 64 * 1024 + len(chunk))
        transport.unregisterProducer()

    def reset(self, client: socket.socket, transport: tcp.Server) -> None:
        """
        Reset the connection from the client's side, and wait for the
        server's socket to hear it.
        """
        client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        client.close()
        select.select([transport.socket], [], [], 5)

    def test_resetIsConnectionLost(self) -> None:
        """
        A read on a connection the client reset is C{CONNECTION_LOST}.
        """
        client, transport = self.accepted()
        self.reset(client, transport)
        self.assertIs(transport.doRead(), CONNECTION_LOST)

    def test_writeThroughAfterReset(self) -> None:
        """
        A write to a connection the peer reset is queued, not raised: the
        queued write reports the loss, as Twisted's own would.
        """
        client, transport = self.accepted()
        self.reset(client, transport)
        transport.write(b"x" * 10)
        transport.write(b"y" * 10)
        self.assertEqual(self.tracker.bytesSent, 0)
        self.assertIs(transport.doWrite(), CONNECTION_LOST)

    def test_closeAllClosesRealConnections(self) -> None:
        """
        C{closeAll} aborts real connections: once the reactor delivers the
        loss, the tracker is idle, the protocols heard it, and the clients
        see the connection closed.
        """
        clients = [self.connectClient(), self.connectClient()]
        self.port.doRead()
        idle: list[bool] = []
        self.tracker.whenIdle(lambda: idle.append(True))
        self.tracker.closeAll()
        self.reactor.advance(0)
        self.assertEqual(self.tracker.open, set())
        self.assertEqual(idle, [True])
        self.assertEqual(len(self.protocols), 2)
        for protocol in self.protocols:
            [reason] = protocol.lost
            self.assertTrue(reason.check(ConnectionAborted))
        for client in clients:
            client.settimeout(5)
            try:
                data = client.recv(1)
            except ConnectionResetError:
                data = b""
            self.assertEqual(data, b"")


class UNIXPortTests(SynchronousTestCase):
    """
    A real C{unix.Port}: its own read (C{recvmsg}) and queued writes (which
    carry passed descriptors) are kept, and still counted.
    """

    def connected(
        self, protocol: Callable[[], Protocol]
    ) -> tuple[str, ConnectionTracker, socket.socket]:
        """
        A tracked C{unix.Port} serving C{protocol}, and a client it has
        accepted: the socket's path, the tracker, the client.
        """
        reactor = WorkerMemoryReactor()
        factory = Factory.forProtocol(protocol)
        factory.noisy = False
        path = os.path.join(tempfile.mkdtemp(), "s.sock")
        # Twisted annotates this path as bytes; IReactorUNIX.listenUNIX takes a
        # str and hands it on here.
        port = unix.Port(path, factory, reactor=reactor)  # type: ignore[arg-type]
        port.startListening()
        self.addCleanup(port.stopListening)
        tracker = ConnectionTracker()
        trackConnections(port, tracker)
        client = socket.socket(socket.AF_UNIX)
        self.addCleanup(client.close)
        client.connect(path)
        client.settimeout(5)
        port.doRead()
        return path, tracker, client

    def test_bytesCountedAndDescriptorsPassed(self) -> None:
        protocols: list[Protocol] = []

        def protocol() -> Protocol:
            protocols.append(Protocol())
            return protocols[-1]

        _, tracker, client = self.connected(protocol)
        [transport] = tracker.open
        assert isinstance(transport, unix.Server)
        client.sendall(b"hello")
        select.select([transport.socket], [], [], 5)
        transport.doRead()
        # A descriptor passed after a write travels with that write's bytes,
        # as in Twisted: UNIX writes are queued, not written through.
        passed, kept = socket.socketpair()
        self.addCleanup(passed.close)
        self.addCleanup(kept.close)
        protocols[0].transport.write(b"world!")  # type: ignore[union-attr]
        protocols[0].transport.sendFileDescriptor(passed.fileno())  # type: ignore[union-attr]
        while transport.doWrite() is None and (transport.dataBuffer or transport._sendmsgQueue):
            pass
        data, fds, _, _ = socket.recv_fds(client, 6, 1)
        self.addCleanup(os.close, fds[0])
        while len(data) < 6:
            data += client.recv(6 - len(data))
        self.assertEqual((data, len(fds)), (b"world!", 1))
        self.assertEqual((tracker.bytesReceived, tracker.bytesSent), (5, 6))

    def test_unwantedDescriptorsClosedQuietly(self) -> None:
        """
        Descriptors a client passes to a protocol that takes none are
        closed and counted, with one line per interval (Twisted writes one
        for every message, a flood any local user could make).
        """
        path, tracker, client = self.connected(Protocol)
        [transport] = tracker.open
        assert isinstance(transport, unix.Server)
        passed, kept = socket.socketpair()
        self.addCleanup(kept.close)
        with passed, capturedLogs() as events:
            for _ in range(3):
                socket.send_fds(client, [b"x"], [passed.fileno(), passed.fileno()])
                select.select([transport.socket], [], [], 5)
                transport.doRead()
        # The server's copies are closed: the peer of the passed socket
        # sees its end close once the client's own copy goes too.
        kept.settimeout(5)
        self.assertEqual(kept.recv(1), b"")
        self.assertEqual((tracker.unwantedDescriptors.total, tracker.bytesReceived), (6, 3))
        self.assertEqual(
            [formatEvent(e) for e in events],
            [
                "closed 2 file descriptor(s) that clients passed to a protocol that takes"
                f" none, the last on {path}"
            ],
        )
