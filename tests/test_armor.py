"""
Armor against clients that hold a worker's resources: a silent client is
closed after C{--idle-timeout}; at C{--max-concurrent} open connections a
worker leaves new ones waiting in the backlog, and none is dropped.
"""

from __future__ import annotations

import socket
import time

from twisted.trial.unittest import SynchronousTestCase

from tests.server import MacceptServer, metric, serverSideInodes, socketInodes, waitFor

LOOPBACK = "tcp:0:interface=127.0.0.1"


def peerClosed(client: socket.socket) -> bool:
    """
    Whether the server closed C{client}'s connection (EOF or reset).
    """
    client.settimeout(0.05)
    try:
        return client.recv(1) == b""
    except TimeoutError:
        return False
    except ConnectionResetError:
        return True


class ArmorTests(SynchronousTestCase):
    def start(self, *args: str) -> MacceptServer:
        server = MacceptServer(["--listen", LOOPBACK, "--workers", "1", *args])
        self.addCleanup(server.cleanup)
        return server.waitReady()

    def test_silentClientClosed(self) -> None:
        """
        A client that sends nothing is disconnected after --idle-timeout,
        the drop is logged, and a client that keeps talking is not.
        """
        server = self.start("--idle-timeout", "1")
        silent = server.connect()
        talking = server.connect()
        self.addCleanup(silent.close)
        self.addCleanup(talking.close)

        def silentGone() -> bool:
            talking.settimeout(10)
            talking.sendall(b"ping")
            self.assertEqual(talking.recv(4), b"ping")
            return peerClosed(silent)

        waitFor(silentGone, what="the silent client to be closed")
        waitFor(lambda: "silent for 1.0s" in server.log(), what="the log line")
        talking.settimeout(10)
        talking.sendall(b"still here")
        self.assertEqual(talking.recv(10), b"still here")

    def test_slowReaderKept(self) -> None:
        """
        A client that reads the end of a long answer slowly moves bytes all
        the time, though the worker has handed the kernel all of it and
        writes nothing more: it is not idle, while one that reads nothing
        is.
        """
        server = self.start("--idle-timeout", "2")
        message = bytes(range(256)) * 4096  # 1 MiB, echoed at once
        stuck, slow = server.connect(), server.connect()
        self.addCleanup(stuck.close)
        self.addCleanup(slow.close)
        for client in (stuck, slow):
            client.settimeout(10)
            client.sendall(message)
        received = bytearray()
        while len(received) < len(message):  # 6 s or so: three timeouts
            time.sleep(0.1)
            received += slow.recv(16384)
        self.assertEqual(bytes(received), message)
        waitFor(lambda: "silent for 2.0s" in server.log(), what="the stuck client closed")
        with self.assertRaises(ConnectionResetError):
            while stuck.recv(65536):
                pass

    def test_maxConcurrentHoldsTheRestInTheBacklog(self) -> None:
        """
        With --max-concurrent 2 the worker holds two connections; a third
        waits in the backlog and is served, its bytes intact, once one of
        the two closes.
        """
        server = self.start("--max-concurrent", "2", "--metrics", LOOPBACK)
        [worker] = server.workers()
        first, second = server.connect(), server.connect()
        self.addCleanup(first.close)
        self.addCleanup(second.close)
        for client in (first, second):
            client.sendall(b"in")
            self.assertEqual(client.recv(2), b"in")
        third = server.connect()
        self.addCleanup(third.close)
        third.sendall(b"waiting")

        def held() -> int:
            return len(set(serverSideInodes(server.port).values()) & socketInodes(worker))

        # The third connection is established by the kernel but not accepted.
        waitFor(
            lambda: metric(server, "maccept_listen_backlog") == 1,
            what="one connection in the backlog",
        )
        self.assertEqual(held(), 2)
        first.close()
        third.settimeout(10)
        self.assertEqual(third.recv(7), b"waiting")
        self.assertEqual(held(), 2)
        self.assertEqual(metric(server, "maccept_listen_backlog"), 0)
        # The worker stopped reading the listener at the limit, and says so.
        waitFor(
            lambda: metric(server, "maccept_accept_pauses_total", reason="max_concurrent") >= 1,
            what="the pause counted",
        )
