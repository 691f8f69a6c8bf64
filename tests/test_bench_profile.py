"""
With --profile the benchmark samples maccept's workers with py-spy and
spreads their CPU per request over the parts of the server (here with a
stand-in for py-spy, so that what it reads and reports can be checked).
"""

from __future__ import annotations

import os
import shutil
import stat
import sys
import tempfile
import time
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

sys.path.append(str(Path(__file__).resolve().parent.parent / "benchmarks"))

import _profile
import _report

MASTER = 'process 100:"maccept: master"'
WORKER = f'{MASTER};process 101:"maccept: worker 1";<module> (maccept/_worker.py:518)'
OTHER_WORKER = 'process 100:"maccept: master";process 102:"maccept: worker 2"'
RAW = f"""\
{WORKER};ReactorBase.run (twisted/internet/base.py:686);doPoll (maccept/_reactor.py:32) 50
{WORKER};governedDoRead (maccept/_accepting.py:106);doRead (maccept/_acceptloop.py:94) 10
{WORKER};AcceptGovernor.acceptBudget (maccept/_accepting.py:120) 5
{WORKER};EPollReactor._add (twisted/internet/epollreactor.py:105) 5
{WORKER};_sendTCP (maccept/_connections.py:285) 20
{WORKER};socket._real_close (/usr/lib/python3.12/socket.py:497) 5
{WORKER};Echo.dataReceived (/home/me/app/myproto.py:9) 4
{OTHER_WORKER} 1
{OTHER_WORKER};<module> (maccept/_worker.py:518);_sendTCP (maccept/_connections.py:285) 3
{OTHER_WORKER};<module> (maccept/_worker.py:518);process (/srv/app/jobs.py:12) 2
process 100:"maccept: master";ReactorBase.run (twisted/internet/base.py:686) 7
"""


class PartTests(SynchronousTestCase):
    def test_parts(self) -> None:
        """
        A frame goes to the part its file (and for the poll, its function)
        names; anything else is "other".
        """
        self.assertEqual(
            [
                _profile.partOf(frame)
                for frame in (
                    "AcceptGovernor.acceptBudget (maccept/_accepting.py:120)",
                    "LoadBoard.connectionsAt (/srv/app/lib/maccept/_board.py:99)",
                    "doRead (maccept/_acceptloop.py:94)",
                    "WorkerReactor.doPoll (maccept/_reactor.py:32)",
                    "EPollReactor.doPoll (twisted/internet/epollreactor.py:210)",
                    "WorkerReactor.doIteration (maccept/_reactor.py:60)",
                    "EPollReactor._remove (twisted/internet/epollreactor.py:168)",
                    "_sendTCP (maccept/_connections.py:285)",
                    "socket._real_close (socket.py:497)",
                    "unixPath (maccept/_socketpath.py:3)",
                    "<module> (myapp.py:1)",
                )
            ],
            [
                "governor",
                "governor",
                "accept loop",
                "poll",
                "poll",
                "reactor",
                "reactor",
                "connections",
                "connections",
                "other",
                "other",
            ],
        )

    def test_samplesByProcess(self) -> None:
        """
        Each stack's samples go to the innermost process named in it, and
        to the part of its innermost Python frame (none: other); a function
        named C{process} is a frame like any other.
        """
        processes = _profile.samplesByProcess(RAW + "not a stack line\n")
        self.assertEqual(
            {pid: dict(parts) for pid, parts in processes.items()},
            {
                101: {
                    "poll": 50,
                    "accept loop": 10,
                    "governor": 5,
                    "reactor": 5,
                    "connections": 25,
                    "other": 4,
                },
                102: {"other": 1 + 2, "connections": 3},
                100: {"reactor": 7},
            },
        )

    def test_spread(self) -> None:
        """
        Each worker's CPU time is spread over the parts in the shares of
        its own samples; a worker with no samples is unsampled; the
        parent's samples are not a worker's.
        """
        processes = _profile.samplesByProcess(RAW)
        spread = _profile.spread(processes, {101: 0.99, 102: 0.4, 103: 0.1}, requests=10_000)
        self.assertEqual(spread["samples"], 99 + 6)
        self.assertEqual(spread["unsampled_us_per_request"], 10.0)
        self.assertEqual(
            spread["us_per_request"],
            {
                "governor": 5.0,
                "accept loop": 10.0,
                "poll": 50.0,
                "reactor": 5.0,
                "connections": 25.0 + 20.0,
                "other": 4.0 + 20.0,
            },
        )


def standIn(directory: Path, body: str) -> str:
    """
    An executable that py-spy's command line runs in its place.
    """
    script = directory / "py-spy"
    script.write_text("#!/bin/sh\n" + body)
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return str(script)


class RecordingTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.directory = Path(tempfile.mkdtemp())
        self.addCleanup(shutil.rmtree, self.directory)

    def record(self, pySpy: str, sampling: bool = False) -> dict[int, dict[str, int]] | str:
        """
        Run C{pySpy} as the recording's py-spy and stop it: once it has
        exited, or with C{sampling} once it says it samples (wrote
        C{ready}), so that the interrupt finds it so.
        """
        recording = _profile.Recording(pySpy, os.getpid(), self.directory / "out.pyspy")
        process = recording._process
        if process is not None:
            if sampling:
                ready = self.directory / "ready"
                for _ in range(1000):
                    if ready.exists():
                        break
                    time.sleep(0.01)
                else:
                    self.fail("the stand-in never said it was sampling")
            else:
                process.wait(timeout=10)
        result = recording.stop()
        return result if isinstance(result, str) else {k: dict(v) for k, v in result.items()}

    def test_samples(self) -> None:
        """
        The samples per process and part, from the raw file py-spy wrote
        where it was told to.
        """
        (self.directory / "canned.raw").write_text(RAW)
        pySpy = standIn(
            self.directory,
            # The output path follows --output, the last option.
            f'for last; do :; done; cp {self.directory / "canned.raw"} "$last"\n',
        )
        samples = self.record(pySpy)
        assert not isinstance(samples, str), samples
        self.assertEqual(samples[102], {"other": 3, "connections": 3})

    def test_stopsSampling(self) -> None:
        """
        Sampling goes on until it is stopped, with an interrupt after which
        py-spy writes what it took.
        """
        canned = self.directory / "canned.raw"
        canned.write_text(RAW)
        script = (
            "for last; do :; done\n"
            f"trap 'cp {canned} \"$last\"; exit 0' INT\n"
            f"touch {self.directory / 'ready'}\n"
            "while :; do sleep 0.05; done\n"
        )
        self.assertIn(101, self.record(standIn(self.directory, script), sampling=True))

    def test_failureSaysWhy(self) -> None:
        """
        A py-spy that fails leaves the run its line of error (not a
        backtrace's last line), not an exception.
        """
        failing = (
            'echo "Error: Permission denied (os error 1)" >&2\n'
            'echo "   6: std::sys::thread::unix::Thread::new::thread_start" >&2\nexit 1\n'
        )
        self.assertEqual(
            self.record(standIn(self.directory, failing)), "Error: Permission denied (os error 1)"
        )

    def test_cannotStart(self) -> None:
        """
        A py-spy that cannot even be started is a run without a profile,
        not a failed run.
        """
        notAProgram = self.directory / "py-spy"
        notAProgram.write_text("not a program")
        notAProgram.chmod(0o755)
        self.assertIn("Exec format error", self.record(str(notAProgram)))

    def test_cannotProfile(self) -> None:
        """
        Before the run, py-spy is tried on the harness itself: nothing to
        say if it can read it, else its line of error.
        """
        self.assertIsNone(_profile.cannotProfile(standIn(self.directory, "exit 0\n")))
        denied = standIn(self.directory, 'echo "Error: Permission denied" >&2\nexit 1\n')
        self.assertEqual(_profile.cannotProfile(denied), "Error: Permission denied")

    def test_noPySpy(self) -> None:
        """
        --profile naming no py-spy that exists stops the run with one line.
        """
        with self.assertRaises(SystemExit) as raised:
            _profile.findPySpy(str(self.directory / "missing"))
        self.assertIn("--profile: no py-spy at", str(raised.exception))


class ReportTests(SynchronousTestCase):
    def test_section(self) -> None:
        """
        The churn section spreads each profiled run's CPU per request over
        the parts, and names a profile that failed.
        """
        run = {"workload": "churn", "rps": 1000.0, "requests": 2000}
        run.update({"p50_us": 500, "p99_us": 1000, "p999_us": 2000})
        perPart = {"governor": 5.0, "poll": 20.0, "connections": 25.0}
        results = {
            "settings": {"workers": [2]},
            "runs": [
                {
                    **run,
                    "server": "maccept",
                    "workers": 2,
                    "server_cpu_us_per_request": 50.0,
                    "profile": {
                        "samples": 480,
                        "us_per_request": perPart,
                        "unsampled_us_per_request": 0.0,
                    },
                },
                {
                    **run,
                    "server": "maccept-greedy",
                    "workers": 2,
                    "server_cpu_us_per_request": 40.0,
                    "profile": {"error": "py-spy took no samples"},
                },
            ],
        }
        text = "\n".join(_report._throughputSection(_report.Results(results), "churn"))
        self.assertIn("| maccept | 2 | 5.0 | 0.0 | 20.0 | 0.0 | 25.0 | 0.0 | 0.0 | 480 |", text)
        self.assertIn("| maccept-greedy | 2 | py-spy took no samples |", text)
