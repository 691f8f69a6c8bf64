"""
The PROXY protocol on C{--listen haproxy:...}: the protocol sees the
original client from its first callback, a malformed header costs only
that connection (logged and counted), and half-close still works behind it.
"""

from __future__ import annotations

import contextlib
import ipaddress
import socket
import struct
from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import capturedLogs
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from maccept._proxy import HEADER_TIMEOUT, ProxyWrappingFactory
from tests.server import MacceptServer, echoRoundTrip, metric, runMaccept, waitFor
from tests.test_pool import texts

V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"


def v1Header(source: str, sourcePort: int, port: int) -> bytes:
    return f"PROXY TCP4 {source} 127.0.0.1 {sourcePort} {port}\r\n".encode()


def v2Header(source: str, sourcePort: int, port: int) -> bytes:
    client = ipaddress.ip_address(source)
    server = ipaddress.ip_address("127.0.0.1" if client.version == 4 else "::1")
    addresses = client.packed + server.packed + struct.pack("!HH", sourcePort, port)
    # Version 2, PROXY command; TCP over IPv4 or over IPv6.
    family = 0x11 if client.version == 4 else 0x21
    return V2_SIGNATURE + bytes([0x21, family]) + struct.pack("!H", len(addresses)) + addresses


def readLine(client: socket.socket) -> bytes:
    line = b""
    while not line.endswith(b"\n"):
        chunk = client.recv(1)
        if not chunk:
            break
        line += chunk
    return line


class ProxyProtocolTests(SynchronousTestCase):
    def start(self, *args: str) -> MacceptServer:
        server = MacceptServer(
            [
                "--workers",
                "1",
                "--listen",
                "haproxy:tcp:0:interface=127.0.0.1",
                "--metrics",
                "tcp:0:interface=127.0.0.1",
                *args,
            ]
        )
        self.addCleanup(server.cleanup)
        return server.waitReady()

    def test_originalClientV1AndV2(self) -> None:
        """
        Behind a v1 or a v2 header, C{getPeer()} in C{connectionMade} is the
        client the proxy names, and the bytes after the header reach the
        protocol.
        """
        server = self.start("--protocol", "tests.sample_protocols:peerReporter")
        for header, source in [
            (v1Header("203.0.113.7", 5555, server.port), b"203.0.113.7 5555\n"),
            (v2Header("198.51.100.9", 4444, server.port), b"198.51.100.9 4444\n"),
            # IPv6 written short from either version, as a socket gives it.
            (v2Header("2001:db8::7", 3333, server.port), b"2001:db8::7 3333\n"),
            (v2Header("::ffff:192.0.2.1", 3334, server.port), b"::ffff:192.0.2.1 3334\n"),
            (f"PROXY TCP6 2001:db8::8 ::1 2222 {server.port}\r\n".encode(), b"2001:db8::8 2222\n"),
        ]:
            with server.connect() as client:
                client.settimeout(10)
                client.sendall(header + b"after the header")
                self.assertEqual(readLine(client), source)
                received = b""
                while len(received) < 16:
                    received += client.recv(100)
                self.assertEqual(received, b"after the header")

    def test_malformedHeaderDropped(self) -> None:
        """
        A connection with a malformed header is dropped before the protocol
        sees it; the drop is logged and counted, and the same worker serves
        the next connection.
        """
        server = self.start()
        [worker] = server.workers()
        for garbage in [b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", b"PROXY TCP4 not an address\r\n"]:
            with server.connect() as client:
                client.settimeout(10)
                client.sendall(garbage)
                with contextlib.suppress(ConnectionResetError):
                    self.assertEqual(client.recv(100), b"")
        # Logged at most every 10 s, with how many: anyone can send garbage.
        waitFor(lambda: "malformed PROXY protocol header" in server.log(), what="the log line")
        with server.connect() as client:
            client.sendall(v1Header("192.0.2.1", 1000, server.port))
            self.assertEqual(echoRoundTrip(client, b"fine"), b"fine")
        self.assertEqual(server.workers(), [worker])
        waitFor(
            lambda: metric(server, "maccept_proxy_headers_rejected_total") == 2, what="the counter"
        )
        self.assertEqual(server.log().count("connection(s) for their PROXY protocol header"), 1)

    def test_halfCloseBehindProxy(self) -> None:
        """
        Echo behind the PROXY protocol sends back everything, 4 MiB, after
        the client half-closes.
        """
        server = self.start()
        payload = bytes(range(256)) * 16384
        with server.connect() as client:
            client.sendall(v2Header("192.0.2.2", 2000, server.port))
            self.assertEqual(echoRoundTrip(client, payload), payload)

    def test_proxyNeedsAStream(self) -> None:
        """
        C{haproxy:} over UDP is refused with one line.
        """
        result = runMaccept(["--listen", "haproxy:udp:7007"])
        self.assertEqual(result.returncode, 2)
        self.assertEqual(
            result.stderr.strip(),
            "maccept: error: --listen haproxy:udp:7007: the PROXY protocol (haproxy:) "
            "needs a stream listener, not udp",
        )


class Recorder(Protocol):
    """
    Records what reaches the protocol behind the PROXY wrapper.
    """

    def __init__(self) -> None:
        self.peers: list[object] = []
        self.received = b""
        self.lost: list[Failure] = []

    def connectionMade(self) -> None:
        self.peers.append(self.transport.getPeer())  # type: ignore[union-attr]

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.lost.append(reason)


class ForwardsEverything(ProtocolWrapper):
    """
    Like Twisted's TLS protocol: a wrapper whose unknown attributes,
    C{__conform__} included, come from its transport.
    """


class RefusingFactory(Factory):
    def buildProtocol(self, addr: Any) -> None:
        return None


class WrapperTests(SynchronousTestCase):
    """
    The PROXY wrapper on its own, with a clock and a string transport.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.rejections = 0
        self.recorders: list[Recorder] = []

        def recorder() -> Recorder:
            self.recorders.append(Recorder())
            return self.recorders[-1]

        self.factory = ProxyWrappingFactory(
            Factory.forProtocol(recorder), self.rejected, clock=self.clock
        )

    def rejected(self) -> None:
        self.rejections += 1

    def connect(self) -> tuple[Any, StringTransport]:
        wrapper = self.factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
        transport = StringTransport(peerAddress=IPv4Address("TCP", "10.9.8.7", 1234))
        wrapper.makeConnection(transport)
        return wrapper, transport

    def test_refusalPassedOn(self) -> None:
        """
        A wrapped factory that refuses a connection (returns C{None}) has
        it refused, not wrapped around nothing.
        """
        self.factory.wrappedFactory = RefusingFactory()
        self.assertIsNone(self.factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 1)))

    def test_headerInPieces(self) -> None:
        """
        A v1 or v2 header that arrives a byte at a time is read whole: the
        protocol sees the client it names, and the bytes after it.
        """
        for header in [v1Header("203.0.113.7", 5555, 80), v2Header("198.51.100.9", 4444, 80)]:
            wrapper, transport = self.connect()
            for n in range(len(header)):
                wrapper.dataReceived(header[n : n + 1])
            wrapper.dataReceived(b"after")
            recorder = self.recorders[-1]
            self.assertEqual(recorder.received, b"after")
            self.assertFalse(transport.disconnecting)
        self.assertEqual(
            [(peer.host, peer.port) for r in self.recorders for peer in r.peers],  # type: ignore[attr-defined]
            [("203.0.113.7", 5555), ("198.51.100.9", 4444)],
        )
        self.assertEqual(self.rejections, 0)

    def test_unknown(self) -> None:
        """
        The bare C{PROXY UNKNOWN} line (allowed by the specification, sent
        by HAProxy) connects the protocol, whose peer is then the proxy.
        """
        wrapper, _ = self.connect()
        wrapper.dataReceived(b"PROXY UNKNOWN\r\nhello")
        [recorder] = self.recorders
        self.assertEqual(
            (recorder.received, recorder.peers), (b"hello", [IPv4Address("TCP", "10.9.8.7", 1234)])
        )

    def test_localWhateverItsFamily(self) -> None:
        """
        A v2 LOCAL header (a proxy's health check) connects the protocol,
        whose peer is then the proxy, whatever family it names, a
        datagram's too: the specification says to ignore it.
        """
        for family in (0x00, 0x11, 0x12):
            header = v2Header("10.0.0.1", 1, 2)
            wrapper, _ = self.connect()
            wrapper.dataReceived(header[:12] + bytes([0x20, family]) + header[14:] + b"hi")
        self.assertEqual(
            [(r.received, r.peers) for r in self.recorders],
            [(b"hi", [IPv4Address("TCP", "10.9.8.7", 1234)])] * 3,
        )
        self.assertEqual(self.rejections, 0)

    def test_badValuesRejected(self) -> None:
        """
        A v1 header whose addresses or ports are not addresses and ports (of
        the version it names), with a field more, or longer than 107 bytes,
        is malformed, as is a v1 IPv6 address with a scope (C{%eth0}: no
        proxy sends one, and the socket address cannot hold it) and a v2
        header with a datagram's addresses: dropped, counted, and the
        protocol never connected.
        """
        udp = v2Header("10.9.8.7", 1234, 80)
        udp = udp[:13] + b"\x12" + udp[14:]
        self.factory.drops.interval = 0  # a line for each, to check each reason
        for header in [
            b"PROXY TCP4 1.2.3.4 127.0.0.1 abc 80\r\n",
            b"PROXY TCP4 \xff\xfe 127.0.0.1 1 80\r\n",
            b"PROXY TCP4 notanip alsonot 1 80\r\n",
            b"PROXY TCP4 1.2.3.4 127.0.0.1 99999 80\r\n",
            b"PROXY TCP4 1.2.3.4 127.0.0.1 -5 80\r\n",
            b"PROXY TCP4 1.2.3.4 127.0.0.1 +5 80\r\n",
            b"PROXY TCP4 1.2.3.4 127.0.0.1 1_0 80\r\n",
            b"PROXY TCP4 ::1 ::2 1 2\r\n",
            b"PROXY TCP6 1.2.3.4 5.6.7.8 1 2\r\n",
            b"PROXY TCP6 fe80::1%eth0 ::1 1111 2222\r\n",
            b"PROXY TCP6 ::1 ::1%1 1111 2222\r\n",
            b"PROXY TCP4 1.2.3.4 127.0.0.1 1 80 " + b"x" * 100 + b"\r\n",
            b"PROXY TCP4 1.2.3.4 127.0.0.1 1 80 3\r\n",
            udp,
            b"GET / HTTP/1.0\r\n",
        ]:
            with capturedLogs() as events:
                wrapper, transport = self.connect()
                wrapper.dataReceived(header)
            self.assertTrue(transport.disconnecting, header)
            self.assertIn("malformed PROXY protocol header", " ".join(texts(events)))
        self.assertEqual(self.rejections, 15)
        self.assertEqual([r.peers for r in self.recorders], [[]] * len(self.recorders))

    def test_headerDeadline(self) -> None:
        """
        A client that sends part of a header, or nothing, is dropped and
        counted after L{HEADER_TIMEOUT}; one whose header came is not.
        """
        slow, slowTransport = self.connect()
        slow.dataReceived(b"PROXY TCP4 1.2")
        _, silentTransport = self.connect()
        fine, fineTransport = self.connect()
        fine.dataReceived(v1Header("192.0.2.1", 1, 80))
        with capturedLogs() as events:
            self.clock.advance(HEADER_TIMEOUT)
        self.assertEqual((slowTransport.disconnecting, silentTransport.disconnecting), (True, True))
        self.assertFalse(fineTransport.disconnecting)
        self.assertEqual(self.rejections, 2)
        self.assertIn("no complete PROXY protocol header within 10 s", " ".join(texts(events)))
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_deadlineAfterAbort(self) -> None:
        """
        A connection already being closed (by the idle reaper, say) when
        its header deadline comes is not dropped and counted a second time.
        """
        _, transport = self.connect()
        transport.abortConnection()
        self.clock.advance(HEADER_TIMEOUT)
        self.assertEqual(self.rejections, 0)

    def test_closedBeforeHeader(self) -> None:
        """
        A connection closed before its header (a health check's connect and
        close) is neither half-closed into a protocol that never connected,
        nor counted, and leaves no timer.
        """
        wrapper, _ = self.connect()
        self.assertIsNone(IHalfCloseableProtocol(wrapper, None))
        wrapper.connectionLost(Failure(ConnectionDone()))
        [recorder] = self.recorders
        self.assertEqual((self.rejections, recorder.peers, recorder.lost), (0, [], []))
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_wrappedWrapperNotAskedForever(self) -> None:
        """
        Behind a wrapper that asks its transport (TLS does), the half-close
        question is answered, not passed round and round.
        """
        self.factory.wrappedFactory = WrappingFactory(Factory.forProtocol(Recorder))
        self.factory.wrappedFactory.protocol = ForwardsEverything
        wrapper, _ = self.connect()
        wrapper.dataReceived(v1Header("192.0.2.1", 1, 80))
        self.assertIsNone(IHalfCloseableProtocol(wrapper, None))
