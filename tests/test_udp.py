"""
UDP: C{--listen udp:PORT[:interface=ADDR]} serves RFC 862 echo on a
datagram socket the parent binds and every worker adopts.
"""

from __future__ import annotations

import socket

from twisted.trial.unittest import SynchronousTestCase

from maccept._descriptions import ListenError, checkDescription, parseUDP
from tests.server import MacceptServer, echoRoundTrip, runMaccept, waitFor


def freeUDPPort(host: str, family: socket.AddressFamily) -> int:
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


class ParseTests(SynchronousTestCase):
    def test_valid(self) -> None:
        self.assertEqual(parseUDP("udp:7"), (7, ""))
        self.assertEqual(parseUDP("udp:0:interface=127.0.0.1"), (0, "127.0.0.1"))
        self.assertEqual(parseUDP("udp:9:interface=\\:\\:1"), (9, "::1"))
        # Unescaped, as the README writes ADDR: the address runs to the end.
        self.assertEqual(parseUDP("udp:9:interface=::1"), (9, "::1"))
        checkDescription("udp:7007:interface=127.0.0.1")

    def test_invalid(self) -> None:
        for description, problem in [
            ("udp:echo", "expected a number, got 'echo'"),
            ("udp:70000", "port 70000 is out of range (0-65535)"),
            ("udp:7:backlog=5", "unknown option 'backlog=5' (udp takes interface=ADDR)"),
            # After the interface, not read as part of the address:
            (
                "udp:7:interface=127.0.0.1:backlog=5",
                "unknown option 'backlog=5' (udp takes interface=ADDR)",
            ),
            ("udp:7:interface=::1:bogus=1", "unknown option 'bogus=1' (udp takes interface=ADDR)"),
            ("udp:7:interface=example.invalid", "interface 'example.invalid' is not an IP address"),
        ]:
            e = self.assertRaises(ListenError, checkDescription, description)
            self.assertEqual(str(e), problem)


class UDPServingTests(SynchronousTestCase):
    def serve(self, host: str, family: socket.AddressFamily, interface: str) -> None:
        port = freeUDPPort(host, family)
        server = MacceptServer(
            [
                "--workers",
                "2",
                "--listen",
                "tcp:0:interface=127.0.0.1",
                "--listen",
                f"udp:{port}:interface={interface}",
            ]
        )
        self.addCleanup(server.cleanup)
        server.waitReady()
        with socket.socket(family, socket.SOCK_DGRAM) as client:
            client.settimeout(10)
            largest = 65507 if family == socket.AF_INET else 65527
            payloads = [f"datagram {n} ".encode() * (n + 1) for n in range(50)]
            for payload in [*payloads, b"x" * largest]:
                client.sendto(payload, (host, port))
                data, source = client.recvfrom(65536)
                self.assertEqual((data, source[1]), (payload, port))
        with server.connect() as stream:
            self.assertEqual(echoRoundTrip(stream, b"tcp too"), b"tcp too")
        self.assertEqual(server.stop(), 0)

    def test_echoIPv4(self) -> None:
        """
        Every datagram, up to the largest, comes back unchanged from the
        address it was sent to, beside a TCP listener of the same pool.
        """
        self.serve("127.0.0.1", socket.AF_INET, "127.0.0.1")

    def test_echoIPv6(self) -> None:
        """
        The same on C{::1}.
        """
        if not socket.has_ipv6:
            self.skipTest("no IPv6")
        try:
            freeUDPPort("::1", socket.AF_INET6)
        except OSError:
            self.skipTest("no ::1 on this machine")
        self.serve("::1", socket.AF_INET6, "\\:\\:1")

    def test_noLoopBetweenListeners(self) -> None:
        """
        A datagram from the port of another UDP listener of the pool (a
        forged source would set the two echoing each other for ever) is
        dropped and logged; others are echoed.
        """
        first = freeUDPPort("127.0.0.1", socket.AF_INET)
        second = freeUDPPort("127.0.0.1", socket.AF_INET)
        server = MacceptServer(
            [
                *("--workers", "1", "--listen", f"udp:{first}:interface=127.0.0.1"),
                *("--listen", f"udp:{second}:interface=127.0.0.1"),
            ]
        )
        self.addCleanup(server.cleanup)
        server.waitReady()
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as forged:
            forged.bind(("127.0.0.2", second))  # the second's port, another address
            forged.sendto(b"loop?", ("127.0.0.1", first))
        waitFor(lambda: "would answer the echo back" in server.log(), what="the drop logged")
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
            client.settimeout(10)
            client.sendto(b"fine", ("127.0.0.1", first))
            self.assertEqual(client.recvfrom(100)[0], b"fine")

    def test_badPort(self) -> None:
        """
        A bad port is one line at start-up.
        """
        result = runMaccept(["--listen", "udp:echo"])
        self.assertEqual(result.returncode, 2)
        self.assertEqual(
            result.stderr.strip(),
            "maccept: error: --listen udp:echo: expected a number, got 'echo'",
        )
        self.assertNotIn("Traceback", result.stdout + result.stderr)
