"""
The benchmark says when a run went wrong rather than only slow: echoes that
never complete, mismatches in any run (the prime included) and a failed
reload fail it; a signal to the harness stops its servers; the CPU window is
the client's.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socketserver
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

from twisted.trial.unittest import SkipTest, SynchronousTestCase

sys.path.append(str(Path(__file__).resolve().parent.parent / "benchmarks"))

import _loadgen
import _procfs
import _report
import _system
import run as harness
import servers


class _Echo(socketserver.BaseRequestHandler):
    """
    RFC 862 echo; with the server's C{dropFirst}, without each
    connection's first byte, so that no request ever completes; each echo
    C{delay} seconds late.
    """

    def handle(self) -> None:
        drop = cast(Any, self.server).dropFirst
        delay = cast(Any, self.server).delay
        # The client resets connections it closes with echoes unread.
        with contextlib.suppress(ConnectionError):
            while data := self.request.recv(65536):
                if drop:
                    data, drop = data[1:], False
                time.sleep(delay)
                self.request.sendall(data)


def echoServer(testCase: SynchronousTestCase, dropFirst: bool, delay: float = 0.0) -> int:
    """
    Serve echo on a loopback port for the test; return the port.
    """
    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _Echo)
    server.daemon_threads = True
    cast(Any, server).dropFirst = dropFirst
    cast(Any, server).delay = delay
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    testCase.addCleanup(server.server_close)
    testCase.addCleanup(server.shutdown)
    return int(server.server_address[1])


def echoload(port: int, duration: float) -> tuple[int, dict[str, Any]]:
    """
    Run the load generator against C{port}: its exit status and report.
    """
    try:
        _loadgen.build()
    except _loadgen.LoadgenError as e:
        raise SkipTest(f"cannot build echoload: {e}") from None
    load = _loadgen.Load(mode="rr", port=port, connections=4, threads=2, duration=duration)
    done = subprocess.run(load.command(), capture_output=True, text=True, timeout=30, check=False)
    return done.returncode, _loadgen._parse(done.stdout, load)


class StalledTests(SynchronousTestCase):
    def test_lostByte(self) -> None:
        """
        A server that loses a byte leaves every request waiting: the client
        counts them as stalled, says so first, and exits 1.
        """
        status, report = echoload(echoServer(self, dropFirst=True), 1.3)
        self.assertEqual((status, report["stalled"], report["mismatches"]), (1, 4, 0))
        self.assertIn("echo stalled", report["first_error"])
        self.assertIn("stalled 4", harness.failed(report) or "")

    def test_slowServerNotStalled(self) -> None:
        """
        A correct server slower than a second per echo (as one with large
        messages can be) is not taken for one that lost a byte: the bound
        grows with the slowest echo seen.
        """
        status, report = echoload(echoServer(self, dropFirst=False, delay=1.2), 2.5)
        self.assertEqual((status, report["stalled"], report["mismatches"]), (0, 0, 0))
        self.assertGreater(report["requests"], 0)

    def test_echoServer(self) -> None:
        """
        A server that echoes leaves nothing stalled; no percentile lies
        beyond the slowest echo seen.
        """
        status, report = echoload(echoServer(self, dropFirst=False), 0.5)
        self.assertEqual((status, report["stalled"], report["mismatches"]), (0, 0, 0))
        self.assertGreater(report["requests"], 0)
        self.assertLessEqual(report["p50_us"], report["p99_us"])
        self.assertLessEqual(report["p999_us"], report["max_us"])
        self.assertIsNone(harness.failed(report))


def bench() -> harness.Bench:
    b = harness.Bench.__new__(harness.Bench)
    b.settings = cast(
        harness.Settings,
        SimpleNamespace(
            connections=4,
            threads=1,
            prime=1.0,
            warmup=1.0,
            duration=2.0,
            sources=1,
            profile=None,
            rounds=1,
        ),
    )
    b.pinning = cast(_system.Pinning, SimpleNamespace(client={0}))
    b.round = 0
    b.results = {"failures": [], "servers": {"maccept-2": {}}, "runs": []}
    return b


def fakeServer() -> servers.RunningServer:
    spec = servers.ServerSpec("maccept", 2, 7007)
    return cast(servers.RunningServer, SimpleNamespace(spec=spec, pid=100))


def report(**counts: int) -> dict[str, Any]:
    return {"rps": 10.0, "requests": 20, "errors": 0, "mismatches": 0, "stalled": 0, **counts}


class FailureTests(SynchronousTestCase):
    def test_primeChecked(self) -> None:
        """
        The prime's counts are kept, and its mismatches or stalls fail the
        cell, which the report lists.
        """
        b = bench()
        self.patch(_loadgen, "run", lambda load, cpus: report(errors=2, mismatches=3))
        b._prime(fakeServer())
        prime = b.results["servers"]["maccept-2"]["prime"]
        self.assertEqual((prime["errors"], prime["mismatches"]), (2, 3))
        [failure] = b.results["failures"]
        self.assertEqual((failure["workload"], failure["error"]), ("prime", "mismatches 3"))
        lines = _report._healthSection({**b.results, "settings": {}})
        self.assertIn("- maccept-2 prime (unmeasured): errors 2, mismatches 3", lines)
        self.assertIn("- FAILED maccept 2 w prime: mismatches 3", lines)

    def test_measuredRunChecked(self) -> None:
        """
        A measured run with mismatches or stalls stays in the tables and is
        a failure too; broken connections alone are not.
        """
        b = bench()
        b._checkRun(fakeServer(), "rr-1k", report(errors=5))
        self.assertEqual(b.results["failures"], [])
        b._checkRun(fakeServer(), "rr-1k", {**report(stalled=1), "first_error": "x at 3 s"})
        [failure] = b.results["failures"]
        self.assertEqual(failure["error"], "stalled 1 (first: x at 3 s)")

    def test_reloadChecked(self) -> None:
        """
        A reload that did not finish, or had mismatches or stalls, failed.
        """
        done = {"new_generation_ready_s": 0.5, "old_generation_gone_s": 1.0, "load": report()}
        self.assertIsNone(harness.reloadFailed(done))
        self.assertIn(
            "old generation", harness.reloadFailed({**done, "old_generation_gone_s": None}) or ""
        )
        self.assertIn("stalled 2", harness.reloadFailed({**done, "load": report(stalled=2)}) or "")


class WindowTests(SynchronousTestCase):
    def test_cpuWindowIsTheClients(self) -> None:
        """
        The CPU readings bound the client's measured window, however long
        maccept's /metrics takes to answer.
        """
        now = [0.0]

        def sleep(seconds: float) -> None:
            now[0] += seconds

        def slowCounters() -> dict[str, float]:
            now[0] += 0.7
            return {"accepted": now[0]}

        class Background:
            def __init__(self, load: _loadgen.Load, cpus: set[int]) -> None:
                pass

            def finish(self) -> dict[str, Any]:
                return {**report(), "client_cpu_s": 1.5}

        self.patch(time, "monotonic", lambda: now[0])
        self.patch(time, "sleep", sleep)
        self.patch(_loadgen, "Background", Background)
        self.patch(_procfs, "cpuTimes", lambda pid: (now[0], 0.0))
        server = cast(Any, fakeServer())
        server.workerPids = lambda: [101, 102]
        server.acceptCounters = slowCounters
        record = bench().measureLoad(server, harness.WORKLOADS["rr-1k"])
        self.assertEqual(record["worker_cpu_s"], [2.0, 2.0])
        self.assertEqual(record["parent_cpu_s"], 2.0)
        self.assertEqual(record["client_busy"], 0.5)


class ArgumentTests(SynchronousTestCase):
    def test_noDuration(self) -> None:
        """
        A zero --duration is refused in one line, not by a division by zero.
        """
        out = tempfile.mkdtemp(prefix="maccept-bench-")
        self.addCleanup(os.rmdir, out)
        with self.assertRaises(SystemExit) as raised:
            harness.main(["--out", out, "--duration", "0", "--warmup", "0"])
        self.assertEqual(raised.exception.code, "--duration: expected more than 0 seconds, got 0.0")


class SignalTests(SynchronousTestCase):
    def test_termEndsTheRun(self) -> None:
        """
        SIGTERM and SIGHUP become SystemExit, so the clean-up that stops the
        servers runs; a second signal then does not interrupt it.
        """
        for signum in (signal.SIGTERM, signal.SIGHUP):
            self.addCleanup(signal.signal, signum, signal.getsignal(signum))
        harness.exitOnSignals()
        stopped = []
        with self.assertRaises(SystemExit) as raised:
            try:
                os.kill(os.getpid(), signal.SIGTERM)
                for _ in range(1000):  # the handler runs between bytecodes
                    pass
            finally:
                stopped.append(True)
                os.kill(os.getpid(), signal.SIGHUP)  # ignored now
        self.assertEqual(raised.exception.code, 128 + signal.SIGTERM)
        self.assertEqual(stopped, [True])
        self.assertEqual(signal.getsignal(signal.SIGTERM), signal.SIG_IGN)


class ReportTests(SynchronousTestCase):
    def test_singleProcessColumn(self) -> None:
        """
        The one-process server's 1-worker run has its column even when
        --workers leaves out 1.
        """
        runs = [
            {"server": "twisted", "workers": 1, "workload": "rr-1k", "rps": 1.0},
            {"server": "maccept", "workers": 2, "workload": "rr-1k", "rps": 2.0},
        ]
        r = _report.Results({"runs": runs, "settings": {"workers": [2, 4]}})
        self.assertEqual(r.workers, [1, 2, 4])

    def test_dirtyTreeCoversBenchmarks(self) -> None:
        """
        The commit is marked as changed where the harness changed, not only
        maccept.
        """
        asked: list[tuple[str, ...]] = []

        def git(*args: str) -> str:
            asked.append(args)
            return ""

        self.patch(_system, "_git", git)
        self.patch(os, "environ", {})
        _system.environment()
        self.assertIn("benchmarks", asked[0])
