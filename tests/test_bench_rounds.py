"""
With C{--rounds N} the benchmark runs its whole sweep N times and reports
each cell's median run, with the spread of its rates.
"""

from __future__ import annotations

import builtins
import io
import json
import shutil
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from twisted.trial.unittest import SkipTest, SynchronousTestCase

sys.path.append(str(Path(__file__).resolve().parent.parent / "benchmarks"))

import _report
import run as harness


def record(rps: float, round: int, workload: str = "rr-1k", **extra: Any) -> dict[str, Any]:
    return {
        "server": "maccept",
        "workers": 2,
        "workload": workload,
        "rps": rps,
        "round": round,
        **extra,
    }


def results(runs: list[dict[str, Any]]) -> _report.Results:
    return _report.Results({"runs": runs, "settings": {"workers": [2]}})


class MedianTests(SynchronousTestCase):
    def test_medianRun(self) -> None:
        """
        A cell's run is the median of its rounds by rate; of an even count,
        the lower middle.
        """
        r = results([record(100.0, 0), record(90.0, 1), record(120.0, 2)])
        self.assertEqual(r.find("maccept", 2, "rr-1k"), record(100.0, 0))
        r = results([record(100.0, 0), record(90.0, 1)])
        self.assertEqual(r.find("maccept", 2, "rr-1k"), record(90.0, 1))
        self.assertIsNone(r.find("maccept", 4, "rr-1k"))

    def test_burstMedian(self) -> None:
        """
        A burst's median is by max/min, a worker that got nothing being the
        worst.
        """
        runs = [
            record(0.0, 0, "burst", max_min_ratio=None),
            record(0.0, 1, "burst", max_min_ratio=1.3),
            record(0.0, 2, "burst", max_min_ratio=1.1),
        ]
        found = results(runs).find("maccept", 2, "burst")
        assert found is not None
        self.assertEqual(found["max_min_ratio"], 1.3)

    def test_spread(self) -> None:
        """
        The spread is half the range of the rates, against the median; one
        round has none, and the table shows it beside the rate.
        """
        r = results([record(100_000.0, 0), record(90_000.0, 1), record(120_000.0, 2)])
        self.assertAlmostEqual(r.spread("maccept", 2, "rr-1k") or 0, 0.15)
        cell = _report._cell(r.find("maccept", 2, "rr-1k"), False, r.spread("maccept", 2, "rr-1k"))
        self.assertEqual(cell, "100.0k ±15%")
        self.assertIsNone(results([record(1.0, 0)]).spread("maccept", 2, "rr-1k"))


class FailedRunTests(SynchronousTestCase):
    """
    A failed run's numbers (wrong or missing echoes, a server that exited)
    are not shown as the server's.
    """

    def test_medianLeavesOutFailedRuns(self) -> None:
        """
        A cell's median and spread come from the runs that did not fail;
        when every run failed, the cell is its failed median, marked.
        """
        runs = [record(100.0, 0), record(500.0, 1, mismatches=1), record(120.0, 2)]
        r = results(runs)
        self.assertEqual(r.find("maccept", 2, "rr-1k"), record(100.0, 0))
        self.assertAlmostEqual(r.spread("maccept", 2, "rr-1k") or 0, 0.1)
        self.assertFalse(r.failed("maccept", 2, "rr-1k"))
        r = results([record(500.0, 0, failed="server exited with status 1 during the run")])
        self.assertTrue(r.failed("maccept", 2, "rr-1k"))
        self.assertEqual(_report._cell(r.find("maccept", 2, "rr-1k"), False), "500 !")

    def test_tablesMarkFailedCells(self) -> None:
        """
        The throughput table marks a failed cell, says what the mark means,
        and shows no ratio resting on it; so do the per-cell tables.
        """
        runs = [
            {**record(1000.0, 0), "workers": 1},
            record(1500.0, 0, stalled=3),
            {**record(900.0, 0), "server": "recipe"},
            {**record(1200.0, 0), "server": "recipe", "workers": 1},
        ]
        for run in runs:
            run.update(mib_s=1.0, p50_us=500, p99_us=1000, p999_us=2000)
        r = _report.Results({"runs": runs, "settings": {"workers": [1, 2]}})
        text = "\n".join(_report._throughputSection(r, "rr-1k"))
        self.assertIn("| maccept | 1.0k | 1.5k ! | ! |", text)
        self.assertIn("| maccept / recipe | 0.83 | ! |", text)
        self.assertIn("| recipe | 1.2k | 900 | 0.38 |", text)
        self.assertIn("| maccept | 0.50 / 1.00 / 2.00 | 0.50 / 1.00 / 2.00 ! |", text)
        self.assertIn("! the run failed", text)
        del runs[1]
        text = "\n".join(_report._throughputSection(_report.Results(r.raw), "rr-1k"))
        self.assertNotIn("!", text)

    def test_plotMarksFailedRuns(self) -> None:
        """
        The plot crosses out a point whose run failed.
        """
        try:
            import matplotlib.pyplot as plt
        except ImportError:
            raise SkipTest("matplotlib is not installed") from None
        runs = [{**record(1000.0, 0), "workers": 1}, record(1500.0, 0, mismatches=2)]
        stored = Path(__file__).resolve().parent.parent / "benchmarks/results/dev-2core-accept"
        stored = json.loads((stored / "results.json").read_text())
        figures: list[Any] = []
        self.patch(plt, "close", figures.append)
        out = Path(tempfile.mkdtemp(prefix="maccept-plot-"))
        self.addCleanup(shutil.rmtree, out, True)
        _report.plot({**stored, "runs": runs}, out / "plot.png")
        [figure] = figures
        self.addCleanup(plt.close, figure)
        [axes] = figure.axes
        crossed = [line for line in axes.get_lines() if line.get_label() == "run failed"]
        self.assertEqual([line.get_xydata().tolist() for line in crossed], [[[2.0, 1500.0]]])


class SweepTests(SynchronousTestCase):
    def test_roundsRepeatTheWholeSweep(self) -> None:
        """
        Each round runs every competitor once, in the same order, before the
        next round starts.
        """
        measured: list[tuple[str, int, int]] = []
        settings = SimpleNamespace(
            rounds=2, workers=(1, 2), servers=("maccept", "recipe"), startup_servers=()
        )
        bench = SimpleNamespace(
            settings=settings,
            measureServer=lambda kind, workers, round: measured.append((kind, workers, round)),
            measureReload=lambda: None,
        )
        harness.runAll(bench)  # type: ignore[arg-type]
        sweep = [("maccept", 1), ("recipe", 1), ("maccept", 2), ("recipe", 2)]
        self.assertEqual(measured, [(*cell, r) for r in (0, 1) for cell in sweep])

    def test_failureNamesItsRound(self) -> None:
        """
        A server that failed in one round of several is reported with that
        round, since its cell's median then comes from fewer runs.
        """
        results = {
            "runs": [],
            "settings": {"rounds": 3},
            "failures": [{"server": "recipe", "workers": 4, "round": 1, "error": "exited\nlog"}],
        }
        self.assertIn("- FAILED recipe 4 w, round 2: exited", _report._healthSection(results))


class BurstCellTests(SynchronousTestCase):
    def test_servedIn(self) -> None:
        """
        A burst's cell gives connect-to-echo p50 / max and the lag after
        the last connect; it says when some or all were never served, and
        marks an old run's /proc timing.
        """
        burst = {"opened": 256, "served": 256, "p50_us": 16600, "max_us": 20200}
        self.assertEqual(_report._servedIn({**burst, "burst_lag_us": 2000}), "16.6 / 20.2 / 2.0")
        self.assertEqual(
            _report._servedIn({**burst, "served": 250}), "16.6 / 20.2 (served 250 of 256)"
        )
        self.assertEqual(_report._servedIn({**burst, "served": 0}), "none of 256 served")
        self.assertEqual(_report._servedIn({"accept_wait_s": 0.62}), "(620) †")


class RenderTests(SynchronousTestCase):
    def test_withoutMatplotlib(self) -> None:
        """
        Without matplotlib (optional) the report is written, and the plot
        is skipped with one line, not a traceback.
        """
        out = Path(tempfile.mkdtemp(prefix="maccept-render-"))
        self.addCleanup(shutil.rmtree, out, True)
        stored = Path(__file__).resolve().parent.parent / "benchmarks/results/dev-2core-accept"
        shutil.copy(stored / "results.json", out / "results.json")
        # Through __import__: matplotlib may be imported already (the plot's test).
        realImport = builtins.__import__

        def noMatplotlib(name: str, *args: Any, **kwargs: Any) -> Any:
            if name.partition(".")[0] == "matplotlib":
                raise ImportError(f"No module named {name!r}")
            return realImport(name, *args, **kwargs)

        self.patch(builtins, "__import__", noMatplotlib)
        stderr = io.StringIO()
        self.patch(sys, "stderr", stderr)
        harness.render(out)
        self.assertIn("# maccept benchmark", (out / "results.md").read_text())
        self.assertFalse((out / "throughput_vs_workers.png").exists())
        self.assertIn("no plot: matplotlib is not installed", stderr.getvalue())
