"""
The benchmark harness tells which CPUs of its split share a core, from the
kernel's topology files (here a fake /sys tree).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

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


class WithoutTheUsualTests(SynchronousTestCase):
    def test_noGit(self) -> None:
        """
        Where git is not installed (a lent machine), the environment is
        still recorded, with the commit unnamed.
        """

        run = subprocess.run

        def noGit(command: list[str], **kwargs: Any) -> Any:
            if command[0] == "git":
                raise FileNotFoundError(2, "No such file or directory: 'git'")
            return run(command, **kwargs)

        # The same module objects as _system.subprocess and _system.os.
        self.patch(subprocess, "run", noGit)
        self.patch(os, "environ", {})
        self.assertIsNone(_system._git("rev-parse", "HEAD"))
        self.assertIn("cpu_model", _system.environment())

    def test_noCpus(self) -> None:
        """
        The affinity of a process already gone (no CPUs) formats as empty.
        """
        self.assertEqual(_system.formatCpus([]), "")
        self.assertEqual(_system.formatCpus({0, 1, 2, 5}), "0-2,5")
