"""
Pieces of the benchmark's competitors and measurements that can be checked
without a load: the sockets of the C{SO_REUSEPORT} recipe, and the wait
for a burst's connections to be accepted.
"""

from __future__ import annotations

import contextlib
import os
import socket
import sys
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

sys.path.append(str(Path(__file__).resolve().parent.parent / "benchmarks"))

import _procfs
import run as harness
import servers


class ReusePortTests(SynchronousTestCase):
    def test_socketPerWorker(self) -> None:
        """
        Each worker gets a listening socket of its own on the one port, and
        a connection to the port reaches one of them.
        """
        port = servers.freePort()
        sockets = servers._reusePortSockets(port, 3, 16)
        self.addCleanup(lambda: [s.close() for s in sockets])
        self.assertEqual(len({s.fileno() for s in sockets}), 3)
        self.assertEqual({s.getsockname() for s in sockets}, {(servers.HOST, port)})
        with socket.create_connection((servers.HOST, port), timeout=5):
            for s in sockets:
                s.setblocking(True)
                s.settimeout(0.2)
            accepted = []
            for s in sockets:
                with contextlib.suppress(TimeoutError):
                    accepted.append(s.accept()[0])
            self.assertEqual(len(accepted), 1)
            accepted[0].close()


class WaitForAcceptsTests(SynchronousTestCase):
    def test_countsNewSockets(self) -> None:
        """
        The wait ends once the processes hold as many sockets as expected
        that they did not hold before; sockets closed meanwhile do not
        count against it.
        """
        pid = os.getpid()
        leftover = socket.socket()
        before = [_procfs.socketInodes(pid)]
        leftover.close()
        pairs = [socket.socketpair() for _ in range(2)]
        self.addCleanup(lambda: [s.close() for pair in pairs for s in pair])
        self.assertLess(harness.waitForAccepts([pid], before, 4, limit=30.0), 30.0)
        self.assertGreaterEqual(harness.waitForAccepts([pid], before, 5, limit=0.05), 0.05)
