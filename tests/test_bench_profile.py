"""
With --profile the benchmark samples one maccept worker with py-spy and
spreads the CPU per request over the parts of the server (here with a
stand-in for py-spy, so that what it reads and reports can be checked).
"""

from __future__ import annotations

import os
import shutil
import stat
import sys
import tempfile
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

sys.path.append(str(Path(__file__).resolve().parent.parent / "benchmarks"))

import _profile
import _report

RAW = """\
<module> (maccept/_worker.py:518);ReactorBase.run (twisted/internet/base.py:686);\
WorkerReactor.doPoll (maccept/_reactor.py:32) 50
<module> (maccept/_worker.py:518);ReactorBase.run (twisted/internet/base.py:686);\
governedDoRead (maccept/_accepting.py:106);doRead (maccept/_acceptloop.py:94) 10
<module> (maccept/_worker.py:518);governedDoRead (maccept/_accepting.py:106);\
AcceptGovernor.acceptBudget (maccept/_accepting.py:120) 5
<module> (maccept/_worker.py:518);EPollReactor._add (twisted/internet/epollreactor.py:105) 5
<module> (maccept/_worker.py:518);_sendTCP (maccept/_connections.py:285) 20
<module> (maccept/_worker.py:518);socket._real_close (socket.py:497) 5
<module> (maccept/_worker.py:518);Echo.dataReceived (/home/me/app/myproto.py:9) 5
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

    def test_samplesByPart(self) -> None:
        """
        Each stack's samples go to the part of its innermost frame.
        """
        self.assertEqual(
            dict(_profile.samplesByPart(RAW + "\nnot a stack line\n")),
            {
                "poll": 50,
                "accept loop": 10,
                "governor": 5,
                "reactor": 5,
                "connections": 25,
                "other": 5,
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

    def test_shares(self) -> None:
        """
        The share of py-spy's samples in each part, from the raw file it
        wrote where it was told to.
        """
        (self.directory / "canned.raw").write_text(RAW)
        pySpy = standIn(
            self.directory,
            # The output path follows --output, the last option.
            f'for last; do :; done; cp {self.directory / "canned.raw"} "$last"\n',
        )
        recording = _profile.Recording(pySpy, os.getpid(), 0.1, self.directory / "out.pyspy")
        self.assertEqual(
            recording.finish(),
            {
                "samples": 100,
                "shares": {
                    "governor": 0.05,
                    "accept loop": 0.1,
                    "poll": 0.5,
                    "reactor": 0.05,
                    "connections": 0.25,
                    "other": 0.05,
                },
            },
        )

    def test_failureSaysWhy(self) -> None:
        """
        A py-spy that fails leaves the run its last line of error, not an
        exception.
        """
        failing = 'echo "Error: Permission denied (os error 1)" >&2\nexit 1\n'
        pySpy = standIn(self.directory, failing)
        recording = _profile.Recording(pySpy, os.getpid(), 0.1, self.directory / "out.pyspy")
        self.assertEqual(recording.finish(), {"error": "Error: Permission denied (os error 1)"})

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
        shares = {"governor": 0.1, "poll": 0.4, "connections": 0.5}
        results = {
            "settings": {"workers": [2]},
            "runs": [
                {
                    **run,
                    "server": "maccept",
                    "workers": 2,
                    "server_cpu_us_per_request": 50.0,
                    "profile": {"samples": 480, "shares": shares},
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
        self.assertIn("| maccept | 2 | 5.0 | 0.0 | 20.0 | 0.0 | 25.0 | 0.0 | 480 |", text)
        self.assertIn("| maccept-greedy | 2 | py-spy took no samples |", text)
