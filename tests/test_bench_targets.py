"""
The benchmark judges issue 5's targets from a run's results (here made-up
results, so that every verdict can be checked by hand).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

sys.path.append(str(Path(__file__).resolve().parent.parent / "benchmarks"))

import _report
import _targets


def run(server: str, workers: int, workload: str, rps: float, **extra: Any) -> dict[str, Any]:
    record = {"server": server, "workers": workers, "workload": workload, "rps": rps}
    record.update({"p99_us": 1000, "client_busy": 0.5, "server_cpu_us_per_request": 8.0})
    record.update(extra)
    return record


def results(
    runs: list[dict[str, Any]], serverCpus: str = "0-7", overlap: str | None = None
) -> dict[str, Any]:
    return {
        "runs": runs,
        "settings": {"workers": [1, 2, 4, 8]},
        "pinning": {"server_cpus": serverCpus, "overlap": overlap},
    }


def verdicts(results: dict[str, Any]) -> dict[str, tuple[str, str]]:
    return {v.target: (v.verdict, v.note) for v in _targets.judge(results)}


class TargetTests(SynchronousTestCase):
    def fullRun(self) -> list[dict[str, Any]]:
        return [
            run("maccept", 1, "rr-1k", 100_000),
            run("maccept", 2, "rr-1k", 190_000),
            run("maccept", 4, "rr-1k", 350_000),  # 0.875: missed
            run("maccept", 8, "rr-1k", 800_000, client_busy=0.95),
            run("maccept", 1, "churn", 20_000),
            run("maccept", 2, "churn", 40_000),
            run("recipe", 1, "rr-1k", 60_000, p99_us=2000),
            run("recipe", 2, "rr-1k", 110_000, p99_us=900),
            run("asyncio", 8, "rr-1k", 700_000),
        ]

    def test_scaling(self) -> None:
        """
        W workers are judged against 0.9 x W x one worker, and a busy load
        generator is named as the possible limit.
        """
        judged = verdicts(results(self.fullRun()))
        self.assertEqual(judged["rr-1k: 2 workers >= 0.9 x 2 x 1 worker"], ("met", ""))
        self.assertEqual(judged["rr-1k: 4 workers >= 0.9 x 4 x 1 worker"], ("missed", ""))
        verdict, note = judged["rr-1k: 8 workers >= 0.9 x 8 x 1 worker"]
        self.assertEqual(verdict, "met")
        self.assertIn("95% busy", note)
        self.assertEqual(judged["churn: 2 workers >= 0.9 x 2 x 1 worker"], ("met", ""))
        self.assertEqual(
            judged["churn: 4 workers >= 0.9 x 4 x 1 worker"], ("not tested", "not run")
        )

    def test_comparisons(self) -> None:
        """
        One worker against the recipe's, the full pool against asyncio, and
        p99 against the recipe's at each worker count.
        """
        judged = verdicts(results(self.fullRun()))
        self.assertEqual(judged["rr-1k: 1 worker >= the recipe's 1 worker"][0], "met")
        self.assertEqual(
            judged["rr-1k: 8 workers on 8 CPUs ahead of asyncio with 8 processes"][0], "met"
        )
        self.assertEqual(judged["rr-1k: p99 at 1 worker <= the recipe's"][0], "met")
        self.assertEqual(judged["rr-1k: p99 at 2 workers <= the recipe's"][0], "missed")
        self.assertEqual(judged["rr-1k: p99 at 4 workers <= the recipe's"][0], "not tested")

    def test_latencyMedianOverRounds(self) -> None:
        """
        p99 is judged by each side's median p99 over the rounds, not by the
        p99 of the run of median rate (here maccept's worst round).
        """
        runs = [
            run("maccept", 1, "rr-1k", 100_000, p99_us=900),
            run("maccept", 1, "rr-1k", 101_000, p99_us=3000),
            run("maccept", 1, "rr-1k", 102_000, p99_us=1100),
            run("recipe", 1, "rr-1k", 60_000, p99_us=1500),
            run("recipe", 1, "rr-1k", 61_000, p99_us=1200),
            run("recipe", 1, "rr-1k", 62_000, p99_us=2500),
        ]
        [latency] = [
            v for v in _targets.judge(results(runs)) if v.target.startswith("rr-1k: p99 at 1")
        ]
        self.assertEqual((latency.verdict, latency.measured), ("met", "1.10 against 1.50 ms"))

    def test_beyondTheServerCpus(self) -> None:
        """
        Worker counts beyond the server's CPUs are not judged for scaling,
        and the comparison with asyncio is made at the largest that fits.
        """
        runs = [*self.fullRun(), run("asyncio", 4, "rr-1k", 400_000)]
        judged = verdicts(results(runs, serverCpus="0-3"))
        self.assertEqual(
            judged["rr-1k: 8 workers >= 0.9 x 8 x 1 worker"],
            ("not tested", "only 4 server CPUs"),
        )
        self.assertEqual(
            judged["rr-1k: 4 workers on 4 CPUs ahead of asyncio with 4 processes"][0], "missed"
        )

    def test_sharedCpus(self) -> None:
        """
        When server and client share CPUs, scaling is not tested; the
        comparisons at one worker count still are.
        """
        judged = verdicts(results(self.fullRun(), serverCpus="0-1", overlap="0-1"))
        self.assertEqual(
            judged["rr-1k: 2 workers >= 0.9 x 2 x 1 worker"],
            ("not tested", "server and client share CPUs"),
        )
        self.assertEqual(judged["rr-1k: 1 worker >= the recipe's 1 worker"][0], "met")

    def test_section(self) -> None:
        """
        The report carries the verdicts as a table with a tally.
        """
        text = "\n".join(_targets.section(results(self.fullRun())))
        self.assertIn("| rr-1k: 4 workers >= 0.9 x 4 x 1 worker | 0.88 (350.0k against 4 x", text)
        self.assertIn("6 met, 2 missed,", text)
        self.assertIn("## Targets (issue 5)", _report.markdown(self.reportable()))

    def reportable(self) -> dict[str, Any]:
        """
        Results complete enough for the whole report.
        """
        full = results(self.fullRun())
        full["settings"].update(
            workloads=["rr-1k"],
            connections=256,
            threads=2,
            duration=1,
            warmup=0,
            sources=1,
            burst_connections=256,
            backlog=1024,
        )
        full["pinning"].update(client_cpus="8-15", method="taskset", note="disjoint")
        full["environment"] = dict.fromkeys(
            [
                "cpu_model",
                "cpu_count",
                "usable_cpus",
                "machine",
                "kernel",
                "python",
                "python_implementation",
                "twisted",
                "uvloop",
                "maccept",
                "maccept_commit",
                "cc",
            ],
            "?",
        )
        full["environment"]["maccept_tree_dirty"] = False
        full.update(command="run.py", started="now")
        for record in full["runs"]:
            record.update(mib_s=1.0, p50_us=500, p999_us=2000)
        return full


class NoteTests(SynchronousTestCase):
    def test_busyClientAtOneWorker(self) -> None:
        """
        A client busy at one worker inflates every scaling ratio: it is
        named too.
        """
        runs = [
            run("maccept", 1, "rr-1k", 100_000, client_busy=0.97),
            run("maccept", 2, "rr-1k", 190_000),
        ]
        verdict, note = verdicts(results(runs))["rr-1k: 2 workers >= 0.9 x 2 x 1 worker"]
        self.assertEqual(verdict, "met")
        self.assertIn("97% busy", note)

    def test_missingSideNamed(self) -> None:
        """
        A comparison that could not be made names the side that was not
        run.
        """
        runs = [run("recipe", 1, "rr-1k", 60_000)]
        judged = verdicts(results(runs))
        self.assertEqual(
            judged["rr-1k: 1 worker >= the recipe's 1 worker"], ("not tested", "maccept not run")
        )
        self.assertEqual(
            judged["rr-1k: p99 at 1 worker <= the recipe's"], ("not tested", "maccept not run")
        )
        self.assertEqual(
            judged["rr-1k: p99 at 2 workers <= the recipe's"],
            ("not tested", "maccept and recipe not run"),
        )

    def test_lostRoundNamed(self) -> None:
        """
        A cell that ran fewer rounds than asked is named under the verdicts,
        since its median is then the lower of the runs left.
        """
        runs = [
            *[run("maccept", 1, "rr-1k", 100_000, round=r) for r in range(3)],
            run("maccept", 2, "rr-1k", 190_000, round=0),
            run("maccept", 2, "rr-1k", 170_000, round=1),
        ]
        r = results(runs)
        r["settings"]["rounds"] = 3
        text = "\n".join(_targets.section(r))
        self.assertIn("lost a round", text)
        self.assertIn("maccept 2 w rr-1k (2 of 3)", text)
        self.assertNotIn("maccept 1 w", text)
        r["runs"].append(run("maccept", 2, "rr-1k", 180_000, round=2))
        self.assertNotIn("lost a round", "\n".join(_targets.section(r)))


class FailedCellTests(SynchronousTestCase):
    """
    No target passes on a cell whose run failed: its numbers are not the
    server's.
    """

    def test_macceptFailedMisses(self) -> None:
        """
        A target resting on a failed maccept cell is missed, whatever its
        numbers, and shared CPUs do not turn that into not tested.
        """
        runs = [
            run("maccept", 1, "rr-1k", 100_000, mismatches=3),
            run("maccept", 2, "rr-1k", 200_000),
            run("recipe", 1, "rr-1k", 60_000, p99_us=2000),
        ]
        note = "rr-1k run failed: maccept 1 w (Errors, below)"
        for overlap in (None, "0-1"):
            judged = verdicts(results(runs, serverCpus="0-1", overlap=overlap))
            self.assertEqual(judged["rr-1k: 2 workers >= 0.9 x 2 x 1 worker"], ("missed", note))
            self.assertEqual(judged["rr-1k: 1 worker >= the recipe's 1 worker"], ("missed", note))
            self.assertEqual(judged["rr-1k: p99 at 1 worker <= the recipe's"], ("missed", note))

    def test_competitorFailedNotTested(self) -> None:
        """
        A failed competitor's cell leaves the comparison not tested, as the
        harness marked it (a server that exited during the run).
        """
        runs = [
            run("maccept", 1, "rr-1k", 100_000),
            run("recipe", 1, "rr-1k", 60_000, failed="server exited with status 1 during the run"),
        ]
        judged = verdicts(results(runs))
        self.assertEqual(
            judged["rr-1k: 1 worker >= the recipe's 1 worker"],
            ("not tested", "rr-1k run failed: recipe 1 w (Errors, below)"),
        )

    def test_failedRoundLost(self) -> None:
        """
        A round whose run failed counts as lost: the cell's median comes
        from the others.
        """
        runs = [
            run("maccept", 2, "rr-1k", 190_000, round=0),
            run("maccept", 2, "rr-1k", 500_000, round=1, stalled=2),
        ]
        r = results(runs)
        r["settings"]["rounds"] = 2
        self.assertIn("maccept 2 w rr-1k (1 of 2)", "\n".join(_targets.section(r)))
