"""
The soak test (opt-in: C{MACCEPT_SOAK=1}, C{MACCEPT_SOAK_SECONDS}, default
600): workers are recycled every few hundred connections under continuous
churn, and the parent must not leak: its descriptor count and resident
memory at the end are what they were once warmed up.
"""

from __future__ import annotations

import os
import time
import unittest

from twisted.trial.unittest import SynchronousTestCase

from maccept._procfs import residentBytes
from tests.load import Churn, stopAll
from tests.server import MacceptServer

SOAK = os.environ.get("MACCEPT_SOAK") == "1"
SECONDS = float(os.environ.get("MACCEPT_SOAK_SECONDS", "600"))


def descriptors(pid: int) -> int:
    """
    The parent's open descriptors, the fewest of a few looks (a worker
    being replaced holds a few more for a moment).
    """
    counts = []
    for _ in range(10):
        counts.append(len(os.listdir(f"/proc/{pid}/fd")))
        time.sleep(0.2)
    return min(counts)


@unittest.skipUnless(SOAK, "the soak test runs only with MACCEPT_SOAK=1")
class SoakTests(SynchronousTestCase):
    def test_recyclingDoesNotLeak(self) -> None:
        server = MacceptServer(
            [
                "--listen",
                "tcp:0:interface=127.0.0.1",
                "--workers",
                "2",
                "--max-connections",
                "300",
                "--max-connections-jitter",
                "100",
            ]
        )
        self.addCleanup(server.cleanup)
        server.waitReady()
        loads = [Churn("127.0.0.1", server.port, limit=SECONDS + 60) for _ in range(4)]
        for load in loads:
            load.start()
        self.addCleanup(stopAll, loads)
        warmUp = min(30.0, SECONDS / 5)
        time.sleep(warmUp)
        startFds, startRss = descriptors(server.pid), residentBytes(server.pid) or 0
        time.sleep(SECONDS - warmUp)
        for load in loads:
            load.stop()
        endFds, endRss = descriptors(server.pid), residentBytes(server.pid) or 0
        recycled = server.log().count("left (recycle)")
        self.assertGreater(recycled, 2, "no worker was recycled")
        self.assertEqual(sum(len(load.errors) for load in loads), 0)
        self.assertLessEqual(endFds, startFds)
        # Allow for allocator noise, not for growth with every worker.
        self.assertLess(endRss, startRss + 4 * 2**20, (startRss, endRss, recycled))
