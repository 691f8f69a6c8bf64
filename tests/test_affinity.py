"""
C{--cpu-affinity}: parsing the CPU list, which CPU each worker gets, and
real workers pinned there, across a reload.
"""

from __future__ import annotations

import os
import re
import signal

from twisted.trial.unittest import SynchronousTestCase

from maccept._affinity import availableCPUs, cpuForWorker, describeCPUs, parseCPUs
from tests.fakes import fakeSysCpus
from tests.server import MacceptServer, echoRoundTrip, waitFor


class ParseTests(SynchronousTestCase):
    def test_auto(self) -> None:
        """
        C{auto} is every CPU this process may run on, in order where each
        CPU is a core of its own (or the kernel does not say).
        """
        root = fakeSysCpus(self, {1: "1", 2: "2", 3: "3"})
        self.assertEqual(parseCPUs("auto", [3, 1, 2], root), (1, 2, 3))
        self.assertEqual(parseCPUs("auto", [3, 1, 2], root / "missing"), (1, 2, 3))

    def test_autoOneThreadPerCoreFirst(self) -> None:
        """
        With two threads per core, C{auto} gives every core's first thread
        before any second one, however the kernel numbers the threads; a
        thread whose sibling may not be used counts as a core alone.
        """
        adjacent = fakeSysCpus(self, {0: "0-1", 1: "0-1", 2: "2-3", 3: "2-3"})
        self.assertEqual(parseCPUs("auto", range(4), adjacent), (0, 2, 1, 3))
        split = fakeSysCpus(self, {0: "0,2", 1: "1,3", 2: "0,2", 3: "1,3"})
        self.assertEqual(parseCPUs("auto", range(4), split), (0, 1, 2, 3))
        self.assertEqual(parseCPUs("auto", [1, 2, 3], adjacent), (1, 2, 3))

    def test_explicitListKeepsItsOrder(self) -> None:
        """
        A list given by hand is taken as written, siblings or not.
        """
        adjacent = fakeSysCpus(self, {0: "0-1", 1: "0-1", 2: "2-3", 3: "2-3"})
        self.assertEqual(parseCPUs("0-3", range(4), adjacent), (0, 1, 2, 3))

    def test_list(self) -> None:
        """
        Single CPUs and ranges, as taskset takes them, in the order given,
        each once.
        """
        self.assertEqual(parseCPUs("4-6,0,5", range(8)), (4, 5, 6, 0))
        self.assertEqual(parseCPUs("2", range(8)), (2,))

    def test_rejected(self) -> None:
        """
        Text that is not a CPU list, a backwards range, and a CPU this
        process may not run on are refused with a line that says which.
        """
        for value, problem in [
            ("", "expected 'auto' or a CPU list"),
            ("a-b", "expected 'auto' or a CPU list"),
            ("1,,2", "expected 'auto' or a CPU list"),
            ("3-1", "'3-1' is not a CPU range"),
            ("-1", "expected 'auto' or a CPU list"),
            ("0-2,9", "CPU 9 is not one this process may run on (those are 0-3,6)"),
            ("0-99999999", "CPU 4 is not one this process may run on (those are 0-3,6)"),
        ]:
            e = self.assertRaises(ValueError, parseCPUs, value, [0, 1, 2, 3, 6])
            self.assertIn(problem, str(e), value)

    def test_describe(self) -> None:
        self.assertEqual(describeCPUs([5, 0, 1, 2, 7, 8]), "0-2,5,7-8")
        self.assertEqual(describeCPUs([4]), "4")

    def test_workersTakeTheListInTurn(self) -> None:
        """
        Worker N (from 1) runs on the N-th CPU of the list, wrapping round;
        without a list, anywhere.
        """
        cpus = (4, 5, 6)
        self.assertEqual([cpuForWorker(n, cpus) for n in range(1, 8)], [4, 5, 6, 4, 5, 6, 4])
        self.assertIsNone(cpuForWorker(1, ()))


def allowedCPUs(pid: int) -> set[int]:
    return os.sched_getaffinity(pid)


class PinnedWorkersTests(SynchronousTestCase):
    def test_workersPinnedAcrossReload(self) -> None:
        """
        With C{--cpu-affinity auto}, each worker runs on one CPU, the
        available ones in turn; the parent is not pinned; the workers a
        reload starts keep their slot's CPU, and they serve.
        """
        cpus = availableCPUs()
        server = MacceptServer(
            [
                *("--listen", "tcp:0:interface=127.0.0.1"),
                *("--workers", "3", "--cpu-affinity", "auto"),
            ]
        )
        self.addCleanup(server.stop)
        server.waitReady()

        def pinning() -> list[set[int]]:
            numbers = workerNumbers(server)
            workers = sorted(server.workers(), key=numbers.__getitem__)
            return [allowedCPUs(pid) for pid in workers]

        expected = [{cpus[n % len(cpus)]} for n in range(3)]
        self.assertEqual(pinning(), expected)
        self.assertEqual(allowedCPUs(server.pid), set(cpus))

        first = set(server.workers())
        os.kill(server.pid, signal.SIGHUP)
        waitFor(
            lambda: len(server.workers()) == 3 and not set(server.workers()) & first,
            what="workers replaced by the reload",
        )
        self.assertEqual(pinning(), expected)
        with server.connect() as client:
            self.assertEqual(echoRoundTrip(client, b"pinned"), b"pinned")


def workerNumbers(server: MacceptServer) -> dict[int, int]:
    """
    Each worker's number by pid, from the parent's log.
    """
    started = re.findall(r"started worker (\d+) \(pid (\d+),", server.log())
    return {int(pid): int(number) for number, pid in started}
