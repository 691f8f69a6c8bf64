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

from twisted.trial.unittest import SynchronousTestCase

from tests.server import MacceptServer, echoRoundTrip, metric, runMaccept, waitFor

V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"


def v1Header(source: str, sourcePort: int, port: int) -> bytes:
    return f"PROXY TCP4 {source} 127.0.0.1 {sourcePort} {port}\r\n".encode()


def v2Header(source: str, sourcePort: int, port: int) -> bytes:
    addresses = (
        ipaddress.IPv4Address(source).packed
        + ipaddress.IPv4Address("127.0.0.1").packed
        + struct.pack("!HH", sourcePort, port)
    )
    # Version 2, PROXY command; TCP over IPv4.
    return V2_SIGNATURE + bytes([0x21, 0x11]) + struct.pack("!H", len(addresses)) + addresses


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
        waitFor(lambda: server.log().count("malformed PROXY protocol header") == 2, what="logs")
        with server.connect() as client:
            client.sendall(v1Header("192.0.2.1", 1000, server.port))
            self.assertEqual(echoRoundTrip(client, b"fine"), b"fine")
        self.assertEqual(server.workers(), [worker])
        waitFor(
            lambda: metric(server, "maccept_proxy_headers_rejected_total") == 2, what="the counter"
        )

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
