"""
The lean accept loop accepts as C{tcp.Port.doRead} does (protocols,
transports, session numbers, C{numberAccepts}), on real loopback sockets
and a reactor that is never run, and leaves accept errors to Twisted.
"""

from __future__ import annotations

import errno
import socket
from typing import Any

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.protocol import Factory, Protocol
from twisted.trial.unittest import SynchronousTestCase

from maccept._acceptloop import acceptQuickly
from maccept._reactor import WorkerReactor


class Recorder(Protocol):
    def __init__(self) -> None:
        self.made = False

    def connectionMade(self) -> None:
        self.made = True


class RecordingFactory(Factory):
    def __init__(self, refuse: bool = False, fail: bool = False) -> None:
        self.addresses: list[Any] = []
        self.built: list[Recorder] = []
        self.refuse = refuse
        self.fail = fail

    def buildProtocol(self, addr: Any) -> Recorder | None:
        self.addresses.append(addr)
        if self.fail:
            raise RuntimeError("factory broke")
        if self.refuse:
            return None
        protocol = Recorder()
        self.built.append(protocol)
        return protocol


class LeanAcceptTests(SynchronousTestCase):
    def listen(self, factory: Factory, host: str = "127.0.0.1", lean: bool = True) -> Any:
        reactor = WorkerReactor()
        self.addCleanup(reactor._poller.close)
        port = reactor.listenTCP(0, factory, interface=host)
        self.addCleanup(port.socket.close)
        if lean:
            acceptQuickly(port)
        self.reactor = reactor
        return port

    def connect(self, port: Any, count: int, family: int = socket.AF_INET) -> list[socket.socket]:
        host = port.getHost()
        clients = []
        for _ in range(count):
            client = socket.socket(family, socket.SOCK_STREAM)
            self.addCleanup(client.close)
            client.connect((host.host, host.port))
            clients.append(client)
        return clients

    def closeTransports(self, factory: RecordingFactory) -> None:
        for protocol in factory.built:
            transport: Any = protocol.transport
            self.reactor.removeReader(transport)
            transport.socket.close()

    def test_acceptsWaitingConnections(self) -> None:
        """
        Each waiting connection gets a protocol, connected to a transport
        that reads, with the client's address and the next session number.
        """
        factory = RecordingFactory()
        port = self.listen(factory)
        self.addCleanup(self.closeTransports, factory)
        clients = self.connect(port, 3)
        port.doRead()
        self.assertEqual(len(factory.built), 3)
        self.assertTrue(all(protocol.made for protocol in factory.built))
        self.assertEqual(
            [address.port for address in factory.addresses],
            [client.getsockname()[1] for client in clients],
        )
        self.assertIsInstance(factory.addresses[0], IPv4Address)
        transports: list[Any] = [protocol.transport for protocol in factory.built]
        self.assertEqual([transport.sessionno for transport in transports], [0, 1, 2])
        self.assertEqual(port.sessionno, 3)
        self.assertTrue(all(transport in self.reactor.getReaders() for transport in transports))
        self.assertEqual(transports[0].socket.gettimeout(), 0.0)
        clients[0].sendall(b"hello")
        received: list[bytes] = []
        factory.built[0].dataReceived = lambda data: received.append(data)  # type: ignore[method-assign]
        self.assertIsNone(transports[0].doRead())
        self.assertEqual(received, [b"hello"])

    def test_numberAcceptsAdapts(self) -> None:
        """
        At most C{numberAccepts} per call; reaching it raises the limit by
        20, stopping short sets it to what came (at least 1), as Twisted's.
        """
        factory = RecordingFactory()
        port = self.listen(factory)
        self.addCleanup(self.closeTransports, factory)
        self.connect(port, 3)
        port.numberAccepts = 2
        port.doRead()
        self.assertEqual((len(factory.built), port.numberAccepts), (2, 22))
        port.doRead()
        self.assertEqual((len(factory.built), port.numberAccepts), (3, 1))
        port.doRead()
        self.assertEqual((len(factory.built), port.numberAccepts), (3, 1))

    def test_refusedProtocolClosesSocket(self) -> None:
        """
        A factory that returns C{None} has the connection closed.
        """
        port = self.listen(RecordingFactory(refuse=True))
        [client] = self.connect(port, 1)
        port.doRead()
        self.assertEqual(client.recv(1), b"")

    def test_factoryFailureLogged(self) -> None:
        """
        A factory that raises is logged, as by Twisted's loop, and the port
        goes on accepting.
        """
        factory = RecordingFactory(fail=True)
        port = self.listen(factory)
        self.connect(port, 1)
        port.doRead()
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        factory.fail = False
        self.addCleanup(self.closeTransports, factory)
        self.connect(port, 1)
        port.doRead()
        self.assertEqual(len(factory.built), 1)

    def test_ipv6Address(self) -> None:
        """
        An IPv6 client's address is an L{IPv6Address}, as Twisted builds it.
        """
        if not socket.has_ipv6:
            self.skipTest("no IPv6")
        factory = RecordingFactory()
        try:
            port = self.listen(factory, host="::1")
        except Exception as e:  # no ::1 on this machine
            self.skipTest(f"no ::1: {e}")
        self.addCleanup(self.closeTransports, factory)
        self.connect(port, 1, socket.AF_INET6)
        port.doRead()
        self.assertIsInstance(factory.addresses[0], IPv6Address)
        self.assertEqual(factory.addresses[0].host, "::1")

    def test_ipv6ByAddress(self) -> None:
        """
        An IPv6 address is recognised by its shape, not by the family the
        listener was adopted with (a dual-stack socket adopted as INET, as
        C{systemd:domain=INET} on systemd's default C{ListenStream=}):
        its scope ID goes into the host, as Twisted's loop does it.
        """
        factory = RecordingFactory()
        port = self.listen(factory, lean=False)
        self.addCleanup(self.closeTransports, factory)
        port._addressType = IPv6Address
        server, client = socket.socketpair()
        self.addCleanup(client.close)
        peer = ("fe80::1", 4242, 0, 1)

        class DualStack:
            family, type, proto = socket.AF_INET, socket.SOCK_STREAM, 0
            waiting = [(server.detach(), peer)]

            def _accept(self) -> Any:
                if not self.waiting:
                    raise BlockingIOError()
                return self.waiting.pop()

        port.socket = DualStack()
        acceptQuickly(port)
        port.doRead()
        expected = socket.getnameinfo(peer, socket.NI_NUMERICHOST | socket.NI_NUMERICSERV)[0]
        self.assertIn("%", expected)
        self.assertEqual(factory.addresses[0].host, expected)

    def test_acceptErrorGoesToTwisted(self) -> None:
        """
        An accept error other than "nothing waiting" and "out of
        descriptors" (here ECONNABORTED, after one connection) is left to
        Twisted's own loop, with what is left of the limit; the connection
        made before it counts as a batch.
        """
        factory = RecordingFactory()
        port = self.listen(factory, lean=False)
        self.connect(port, 1)
        limits: list[int] = []
        listener = port.socket

        class AbortsTheSecond:
            family, type, proto = listener.family, listener.type, listener.proto
            accepts = 0

            def _accept(self) -> Any:
                self.accepts += 1
                if self.accepts > 1:
                    raise OSError(errno.ECONNABORTED, "Software caused connection abort")
                return listener._accept()

        port.socket = AbortsTheSecond()
        port.doRead = lambda: limits.append(port.numberAccepts)
        batches: list[None] = []
        acceptQuickly(port, onBatch=lambda: batches.append(None))
        port.numberAccepts = 7
        port.doRead()
        self.assertEqual((limits, len(factory.built), len(batches)), ([6], 1, 1))
        self.closeTransports(factory)

    def test_outOfDescriptorsSheds(self) -> None:
        """
        Out of descriptors (EMFILE), the waiting connections are accepted
        with Twisted's reserved descriptor and closed at once (so clients
        hear of it), counted, and no protocol is built; Twisted's loop, with
        its line per connection, is not used.
        """
        factory = RecordingFactory()
        port = self.listen(factory, lean=False)
        clients = self.connect(port, 3)
        listener = port.socket
        full = [True]

        class FullOnce:
            family, type, proto = listener.family, listener.type, listener.proto

            def _accept(self) -> Any:
                if full.pop() if full else False:
                    raise OSError(errno.EMFILE, "Too many open files")
                return listener._accept()

        shed: list[int] = []
        empty: list[None] = []
        port.socket = FullOnce()
        acceptQuickly(port, shed.append, lambda: empty.append(None))
        port.doRead()
        port.socket = listener
        self.assertEqual((shed, factory.addresses, empty), ([3], [], []))
        for client in clients:
            client.settimeout(10)
            self.assertEqual(client.recv(1), b"")

    def test_nothingWaiting(self) -> None:
        """
        An empty queue is not an error: nothing is logged, nothing accepted.
        """
        factory = RecordingFactory()
        port = self.listen(factory)
        port.doRead()
        self.assertEqual((factory.addresses, self.flushLoggedErrors()), ([], []))

    def test_batchesTold(self) -> None:
        """
        A wake-up that accepts is told to C{onBatch} once, however many it
        took; one that finds nothing is not, nor one whose only connection
        the factory refused.
        """
        factory = RecordingFactory()
        port = self.listen(factory, lean=False)
        batches: list[None] = []
        acceptQuickly(port, onBatch=lambda: batches.append(None))
        port.doRead()
        self.assertEqual(batches, [])
        self.connect(port, 3)
        port.numberAccepts = 5
        port.doRead()
        self.assertEqual((len(batches), len(factory.built)), (1, 3))
        self.closeTransports(factory)
        factory.refuse = True
        self.connect(port, 1)
        port.doRead()
        self.assertEqual(len(batches), 1)

    def test_batchWithAFailingBuild(self) -> None:
        """
        A wake-up whose second connection fails to build (logged, as
        Twisted does) still counts its first.
        """

        class FailsTheSecond(RecordingFactory):
            def buildProtocol(self, addr: Any) -> Recorder | None:
                if self.built:
                    raise RuntimeError("no second")
                return super().buildProtocol(addr)

        factory = FailsTheSecond()
        port = self.listen(factory, lean=False)
        batches: list[None] = []
        acceptQuickly(port, onBatch=lambda: batches.append(None))
        self.connect(port, 2)
        port.numberAccepts = 5
        port.doRead()
        self.assertEqual((len(batches), len(factory.built)), (1, 1))
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.closeTransports(factory)

    def test_emptyWakeupsTold(self) -> None:
        """
        A wake-up that finds no connection waiting (another worker took it)
        is told to C{onEmpty}; one that accepts is not (nor one that sheds:
        test_outOfDescriptorsSheds).
        """
        factory = RecordingFactory()
        port = self.listen(factory, lean=False)
        empty: list[None] = []
        shed: list[int] = []
        acceptQuickly(port, shed.append, lambda: empty.append(None))
        port.doRead()
        self.assertEqual(len(empty), 1)
        self.connect(port, 2)
        port.numberAccepts = 5
        port.doRead()
        self.assertEqual((len(empty), len(factory.built)), (1, 2))
        self.closeTransports(factory)
