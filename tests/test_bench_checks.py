"""
The benchmark says when a run went wrong rather than only slow: echoes that
never complete or differ (and then do not count as served), a server that
exits during a run, mismatches in any run (the prime included) and a failed
reload fail it; a signal to the harness stops its servers; the CPU window is
the client's.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import signal
import socketserver
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
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
    C{delay} seconds late; each chunk read passed through the server's
    C{mangle}, if any, on its way back: a broken server of another kind.
    """

    def handle(self) -> None:
        drop = cast(Any, self.server).dropFirst
        delay = cast(Any, self.server).delay
        mangle: Callable[[bytes], bytes] | None = cast(Any, self.server).mangle
        # The client resets connections it closes with echoes unread.
        with contextlib.suppress(ConnectionError):
            while data := self.request.recv(65536):
                if drop:
                    data, drop = data[1:], False
                time.sleep(delay)
                self.request.sendall(data if mangle is None else mangle(data))


def echoServer(
    testCase: SynchronousTestCase,
    dropFirst: bool = False,
    delay: float = 0.0,
    mangle: Callable[[bytes], bytes] | None = None,
) -> int:
    """
    Serve echo on a loopback port for the test; return the port.
    """
    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _Echo)
    server.daemon_threads = True
    cast(Any, server).dropFirst = dropFirst
    cast(Any, server).delay = delay
    cast(Any, server).mangle = mangle
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    testCase.addCleanup(server.server_close)
    testCase.addCleanup(server.shutdown)
    return int(server.server_address[1])


def echoload(port: int, duration: float, mode: str = "rr") -> tuple[int, dict[str, Any]]:
    """
    Run the load generator against C{port}: its exit status and report.
    """
    try:
        _loadgen.build()
    except _loadgen.LoadgenError as e:
        raise SkipTest(f"cannot build echoload: {e}") from None
    load = _loadgen.Load(mode=mode, port=port, connections=4, threads=2, duration=duration)
    done = subprocess.run(load.command(), capture_output=True, text=True, timeout=30, check=False)
    return done.returncode, _loadgen._parse(done.stdout, load)


def flipByte(at: int) -> Callable[[bytes], bytes]:
    """
    A C{mangle} that flips the bits of byte C{at} of every chunk.
    """

    def flip(data: bytes) -> bytes:
        if len(data) <= at:
            return data
        return data[:at] + bytes([data[at] ^ 0xFF]) + data[at + 1 :]

    return flip


class StalledTests(SynchronousTestCase):
    def test_lostByte(self) -> None:
        """
        A server that loses a byte leaves every request waiting: the client
        counts them as stalled and exits 1.  What it says first is where
        the echo, shifted by the lost byte, went wrong.
        """
        status, report = echoload(echoServer(self, dropFirst=True), 1.3)
        self.assertEqual((status, report["stalled"], report["mismatches"]), (1, 4, 0))
        self.assertIn("echo differs from the request at byte 0", report["first_error"])
        self.assertIn("stalled 4", harness.failed(report) or "")

    def test_silentServer(self) -> None:
        """
        A server that never answers leaves every request waiting, and the
        client says so.
        """
        status, report = echoload(echoServer(self, mangle=lambda data: b""), 1.3)
        self.assertEqual((status, report["stalled"], report["mismatches"]), (1, 4, 0))
        self.assertIn("echo stalled", report["first_error"])

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


def fakeServer(exited: str | None = None) -> servers.RunningServer:
    """
    A server that runs, or with C{exited}, that has exited so.
    """
    spec = servers.ServerSpec("maccept", 2, 7007)
    server = SimpleNamespace(spec=spec, pid=100, exited=lambda workers=(): exited)
    return cast(servers.RunningServer, server)


def report(**counts: int) -> dict[str, Any]:
    return {"rps": 10.0, "requests": 20, "errors": 0, "mismatches": 0, "stalled": 0, **counts}


class MismatchTests(SynchronousTestCase):
    """
    Echoes that differ from the request, as the load generator counts and
    reports them.
    """

    def test_wrongEchoNotServed(self) -> None:
        """
        A request whose echo differs is a mismatch, not a request served:
        it adds nothing to the rate or the latency.
        """
        status, report = echoload(echoServer(self, mangle=flipByte(5)), 0.5)
        self.assertEqual(status, 1)
        self.assertGreater(report["mismatches"], 0)
        self.assertEqual((report["requests"], report["rps"], report["max_us"]), (0, 0, 0))

    def test_mismatchSaysWhere(self) -> None:
        """
        A run whose only fault is wrong echoes says what went wrong first,
        and where in the request.
        """
        status, report = echoload(echoServer(self, mangle=flipByte(5)), 0.5)
        self.assertEqual((status, report["stalled"], report["errors"]), (1, 0, 0))
        self.assertIn("echo differs from the request at byte 5 at ", report["first_error"])
        self.assertIn("(first: echo differs", harness.failed(report) or "")

    def test_churnBytesAfterTheEcho(self) -> None:
        """
        Churn reads to the end of the stream after the echo: a server that
        sends more than it was sent is caught, though the client has all
        it asked for.
        """
        status, report = echoload(echoServer(self, mangle=lambda data: data + b"Z"), 0.5, "churn")
        self.assertEqual(status, 1)
        self.assertGreater(report["mismatches"], 0)
        self.assertEqual(report["requests"], 0)
        self.assertIn("echo longer than the request (bytes after it)", report["first_error"])

    def test_churn(self) -> None:
        """
        Against a server that echoes and closes when the client has shut
        down its side, churn counts connections served and nothing wrong.
        """
        status, report = echoload(echoServer(self), 0.5, "churn")
        self.assertEqual((status, report["mismatches"], report["stalled"]), (0, 0, 0))
        self.assertEqual((report["errors"], report["first_error"]), (0, None))
        self.assertGreater(report["requests"], 0)

    def test_burstWrongByte(self) -> None:
        """
        A burst connection that gets another byte back than the one it sent
        says so, rather than that the echo was too long.
        """
        status, report = echoload(echoServer(self, mangle=flipByte(0)), 1.0, "burst")
        self.assertEqual((status, report["mismatches"], report["requests"]), (1, 4, 0))
        self.assertIn("echo differs from the byte sent", report["first_error"])


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


class ServerExitTests(SynchronousTestCase):
    """
    A server that exits during a cell fails the run it happened in, and the
    rest of the cell is not measured against a dead port.
    """

    def test_runFailsWhenTheServerExits(self) -> None:
        """
        A run during which the server exited is a failure that says so,
        with its record marked, however clean the client's counts, and the
        cell breaks off.
        """
        b = bench()
        record = report(connect_failures=7)
        exited = fakeServer("server exited with status 1")
        with self.assertRaises(harness.ServerExitedError):
            b._checkRun(exited, "rr-1k", record, [101])
        [failure] = b.results["failures"]
        self.assertEqual(failure["workload"], "rr-1k")
        self.assertEqual(failure["error"], "server exited with status 1 during the run")
        self.assertEqual(record["failed"], "server exited with status 1 during the run")
        lines = _report._healthSection({**b.results, "settings": {}})
        self.assertIn(
            "- FAILED maccept 2 w rr-1k: server exited with status 1 during the run", lines
        )

    def test_cellBreaksOff(self) -> None:
        """
        After the run in which the server exited, the cell's other
        workloads are not run; the sweep goes on, and exits 1.
        """
        b = bench()
        b.settings = cast(
            harness.Settings,
            SimpleNamespace(**vars(b.settings), workloads=("rr-1k", "churn")),
        )
        status: list[str | None] = [None]
        server = cast(Any, fakeServer())
        server.exited = lambda workers=(): status[0]
        server.start = server.stop = lambda: None
        server.workerPids = lambda: [101, 102]
        measured: list[str] = []

        def measureLoad(server: Any, workload: harness.Workload) -> dict[str, Any]:
            measured.append(workload.name)
            status[0] = "worker 102 exited"
            return {**report(errors=3), "p99_us": 1000}

        self.patch(b, "serve", lambda kind, workers, label="", metrics=False: server)
        self.patch(b, "_describeServer", lambda server: server.workerPids())
        self.patch(b, "_prime", lambda server, pids=(): None)
        self.patch(b, "measureLoad", measureLoad)
        self.patch(b, "save", lambda: None)
        self.patch(sys, "stderr", io.StringIO())
        b.measureServer("maccept", 2)
        self.assertEqual(measured, ["rr-1k"])
        [failure] = b.results["failures"]
        self.assertEqual(failure["error"], "worker 102 exited during the run")
        self.assertEqual(b.results["runs"][0]["failed"], "worker 102 exited during the run")

    def test_reloadParentExits(self) -> None:
        """
        A reload during which the parent exited failed, whatever the
        clients saw.
        """
        b = bench()
        b.settings = cast(harness.Settings, SimpleNamespace(**vars(b.settings), startup_workers=2))
        server = cast(Any, fakeServer("server killed by SIGSEGV"))
        server.start = server.stop = lambda: None
        done = {"new_generation_ready_s": 0.5, "old_generation_gone_s": 1.0, "load": report()}
        self.patch(harness, "reloadSupported", lambda: True)
        self.patch(b, "serve", lambda kind, workers, label="", metrics=False: server)
        self.patch(b, "_reload", lambda server: done)
        self.patch(b, "save", lambda: None)
        self.patch(sys, "stderr", io.StringIO())
        b.measureReload()
        [failure] = b.results["failures"]
        self.assertEqual(failure["error"], "server killed by SIGSEGV during the reload")


class ExitedTests(SynchronousTestCase):
    """
    What the harness reads of a server's processes after each run.
    """

    def test_alive(self) -> None:
        """
        A process is alive while it runs: not once it has exited, reaped
        or not, and not as the child of another parent than its own.
        """
        self.assertTrue(_procfs.alive(os.getpid()))
        self.assertTrue(_procfs.alive(os.getpid(), os.getppid()))
        self.assertFalse(_procfs.alive(os.getpid(), os.getpid() + 1))
        child = subprocess.Popen([sys.executable, "-c", ""])
        self.addCleanup(child.wait)
        while _procfs.alive(child.pid):  # a zombie until reaped below
            time.sleep(0.01)
        self.assertTrue((_procfs.PROC / str(child.pid)).exists())
        child.wait()
        self.assertFalse(_procfs.alive(child.pid))

    def test_serverExited(self) -> None:
        """
        The server started says how it exited; while it runs, a worker
        that has gone, or is no child of it, is named.
        """
        out = Path(tempfile.mkdtemp(prefix="maccept-exit-"))
        self.addCleanup(shutil.rmtree, out, True)
        go = out / "go"
        script = (
            "import os, sys, time\n"
            "print('READY', os.getpid(), flush=True)\n"
            f"while not os.path.exists({str(go)!r}): time.sleep(0.01)\n"
            "sys.exit(1)\n"
        )

        class Spec(servers.ServerSpec):
            def command(self) -> list[str]:
                return [sys.executable, "-c", script]

        server = servers.RunningServer(Spec("asyncio", 1, 0), os.sched_getaffinity(0), out / "log")
        self.addCleanup(server.stop)
        server.start(timeout=30)
        self.assertIsNone(server.exited([server.pid]))
        self.assertEqual(server.exited([os.getpid()]), f"worker {os.getpid()} exited")
        go.touch()
        assert server.process is not None
        server.process.wait(30)
        self.assertEqual(server.exited(), "server exited with status 1")

    def test_exitStatus(self) -> None:
        """
        A status in words: a signal by its name.
        """
        self.assertEqual(servers._exitStatus(3), "exited with status 3")
        self.assertEqual(servers._exitStatus(-9), "killed by SIGKILL")


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
