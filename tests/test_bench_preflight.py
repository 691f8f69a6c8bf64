"""
Before measuring, the benchmark starts each server once, so that one that
cannot start stops the run at once instead of failing in every cell while
the others use up a lent machine's time.
"""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace
from typing import cast

from twisted.trial.unittest import SynchronousTestCase

sys.path.append(str(Path(__file__).resolve().parent.parent / "benchmarks"))

import run as harness
import servers


class FakeServer:
    """
    Stands for a L{servers.RunningServer} (cast to one where it is served):
    says when it is started and stopped, and fails to start if its kind is
    in C{broken}.  Starts no process.
    """

    def __init__(self, kind: str, broken: set[str], log: list[str]) -> None:
        self.kind = kind
        self.broken = broken
        self.log = log

    def start(self) -> None:
        self.log.append(f"start {self.kind}")
        if self.kind in self.broken:
            raise servers.ServerError("exited:\nModuleNotFoundError: No module named 'OpenSSL'")

    def stop(self) -> None:
        self.log.append(f"stop {self.kind}")


def bench(kinds: tuple[str, ...], broken: set[str], log: list[str]) -> harness.Bench:
    b = harness.Bench.__new__(harness.Bench)
    b.settings = SimpleNamespace(servers=kinds)  # type: ignore[assignment]
    b.serve = lambda kind, workers, label="", metrics=False: cast(  # type: ignore[method-assign]
        servers.RunningServer, FakeServer(kind, broken, log)
    )
    return b


class PreflightTests(SynchronousTestCase):
    def test_everyServerStartedAndStopped(self) -> None:
        """
        Each server is started once and stopped before the sweep.
        """
        log: list[str] = []
        bench(("maccept", "recipe"), set(), log).preflight()
        self.assertEqual(log, ["start maccept", "stop maccept", "start recipe", "stop recipe"])

    def test_serverThatCannotStartStopsTheRun(self) -> None:
        """
        A server that does not start ends the run with its name and its
        log's tail, after being stopped; later servers are not tried.
        """
        log: list[str] = []
        b = bench(("recipe", "maccept", "asyncio"), {"maccept"}, log)
        with self.assertRaises(SystemExit) as raised:
            b.preflight()
        message = str(raised.exception.code)
        self.assertIn("benchmark: maccept did not start, so nothing was measured", message)
        self.assertIn("No module named 'OpenSSL'", message)
        self.assertEqual(log, ["start recipe", "stop recipe", "start maccept", "stop maccept"])


class SurpriseTests(SynchronousTestCase):
    def test_surpriseInACellIsAFailure(self) -> None:
        """
        An unexpected error in one cell is recorded as that cell's failure,
        named by its type, and the sweep goes on.
        """
        log: list[str] = []

        class Vanishing(FakeServer):
            def start(self) -> None:
                raise IndexError("list index out of range")

        b = bench(("maccept",), set(), log)
        b.serve = lambda kind, workers, label="", metrics=False: cast(  # type: ignore[method-assign]
            servers.RunningServer, Vanishing(kind, set(), log)
        )
        b.settings = SimpleNamespace(servers=("maccept",), rounds=1)  # type: ignore[assignment]
        b.results = {"failures": []}
        b.save = lambda: None  # type: ignore[method-assign]
        b.measureServer("maccept", 2)
        [failure] = b.results["failures"]
        self.assertEqual(failure["error"], "IndexError: list index out of range")
        self.assertEqual(log, ["stop maccept"])
