"""
Faults a worker meets on a network, provoked against the real server: it
runs out of descriptors, clients reset in the middle of a transfer, or open
and close connections as fast as they can.  Each time the same worker
process keeps serving, and what it acknowledged is echoed intact.
(docs/faults.rst lists these beside the faults tested elsewhere.)
"""

from __future__ import annotations

import os
import resource
import socket
import struct

from twisted.trial.unittest import SynchronousTestCase

from tests.server import MacceptServer, echoRoundTrip, metric, waitFor

LOOPBACK = "tcp:0:interface=127.0.0.1"


def openDescriptors(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def reset(sock: socket.socket) -> None:
    """
    Close with a TCP reset rather than a FIN.
    """
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


class FaultTests(SynchronousTestCase):
    def start(self, *args: str) -> tuple[MacceptServer, int]:
        server = MacceptServer(["--listen", LOOPBACK, "--workers", "1", *args])
        self.addCleanup(server.cleanup)
        server.waitReady()
        [worker] = server.workers()
        return server, worker

    def assertServes(self, server: MacceptServer, worker: int) -> None:
        self.assertEqual(server.workers(), [worker], "the worker was replaced")
        with server.connect() as client:
            self.assertEqual(echoRoundTrip(client, b"still serving"), b"still serving")

    def test_outOfDescriptors(self) -> None:
        """
        A worker out of descriptors (EMFILE) keeps serving the connections
        it holds, closes the ones it cannot hold at once (counted, and one
        log line for them all, not one each), and accepts again once
        descriptors are free.
        """
        server, worker = self.start("--metrics", LOOPBACK)
        spare = 8
        limit = openDescriptors(worker) + spare
        resource.prlimit(worker, resource.RLIMIT_NOFILE, (limit, limit))
        held = []
        for _ in range(spare + 12):
            client = server.connect()
            self.addCleanup(client.close)
            held.append(client)
        served = []
        for client in held:
            client.settimeout(2)
            try:
                client.sendall(b"ping")
                if client.recv(4) == b"ping":
                    served.append(client)
            except OSError:
                pass
        self.assertGreater(len(served), 0)
        self.assertLess(len(served), len(held))
        waitFor(lambda: "out of file descriptors" in server.log(), what="the line")
        unserved = len(held) - len(served)
        waitFor(
            lambda: metric(server, "maccept_connections_shed_total") == unserved,
            what="the shed connections to be counted",
        )
        self.assertEqual(server.log().count("out of file descriptors"), 1)
        self.assertNotIn("EMFILE recovery", server.log())
        for client in served:
            client.sendall(b"again")
            self.assertEqual(client.recv(5), b"again")
        for client in held:
            client.close()
        waitFor(lambda: openDescriptors(worker) < limit - spare // 2, what="descriptors freed")
        self.assertServes(server, worker)

    def test_resetMidTransfer(self) -> None:
        """
        Clients that reset while the worker is still sending them a large
        echo leave it serving; each reset is counted, and logged in one
        line, not one each.
        """
        server, worker = self.start("--metrics", LOOPBACK)
        for _ in range(20):
            client = server.connect()
            client.sendall(os.urandom(1 << 20))
            client.recv(1000)
            reset(client)
        self.assertServes(server, worker)
        resets = "maccept_connections_reset_total"
        waitFor(lambda: metric(server, resets) >= 20, what="the resets to be counted")
        self.assertEqual(metric(server, resets), 20)
        self.assertEqual(server.log().count("clients reset "), 1)

    def test_connectCloseFlood(self) -> None:
        """
        A thousand connections opened and closed at once (half of them by
        reset) leave the worker serving, with none of them left open.
        """
        server, worker = self.start()
        for n in range(1000):
            client = socket.create_connection(("127.0.0.1", server.port), timeout=10)
            if n % 2:
                reset(client)
            else:
                client.close()
        self.assertServes(server, worker)
        waitFor(lambda: openDescriptors(worker) < 40, what="the flood's descriptors to be released")
