"""
The benchmark harness tells which CPUs of its split share a core, from the
kernel's topology files (here a fake /sys tree).
"""

from __future__ import annotations

import sys
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from tests.fakes import fakeSysCpus

sys.path.append(str(Path(__file__).resolve().parent.parent / "benchmarks"))

import _system


class TopologyTests(SynchronousTestCase):
    def test_siblingGroups(self) -> None:
        """
        Each core's threads once; a core with one thread is no group.
        """
        root = fakeSysCpus(self, {0: "0,2", 1: "1,3", 2: "0,2", 3: "1,3", 4: "4"})
        self.assertEqual(_system.smtSiblings(root), [{0, 2}, {1, 3}])

    def test_sharedCores(self) -> None:
        """
        A server CPU whose sibling runs the client, and two server CPUs on
        one core, are named; a split along cores says nothing.
        """
        siblings = [{0, 4}, {1, 5}, {2, 3}]
        self.assertEqual(
            _system.sharedCores({0, 1, 2, 3}, {4, 5}, siblings),
            [
                "server CPUs 0 share a core with client CPUs 4",
                "server CPUs 1 share a core with client CPUs 5",
                "server CPUs 2-3 are threads of one core",
            ],
        )
        self.assertEqual(
            _system.sharedCores({0, 2}, {1, 3}, [{0, 1}, {2, 3}]),
            [
                "server CPUs 0 share a core with client CPUs 1",
                "server CPUs 2 share a core with client CPUs 3",
            ],
        )
        self.assertEqual(_system.sharedCores({0, 1}, {4, 5}, [{0, 8}, {1, 9}]), [])
