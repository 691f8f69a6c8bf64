"""
The production lifecycle with real processes: graceful stop, reload under
load, scaling, the watchdog, recycling and crash loops.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import signal
import socket
import tempfile
import time
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from maccept._parent import SAME_STOP_WINDOW
from tests.load import Churn, Stream
from tests.server import MacceptServer, alive, runMaccept, waitFor

LOOPBACK = "tcp:0:interface=127.0.0.1"
SLOW_TO_START = "tests.sample_protocols:SlowToStartFactory"


def killIfAlive(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


class LifecycleTests(SynchronousTestCase):
    def start(self, *args: str) -> MacceptServer:
        server = MacceptServer(["--listen", LOOPBACK, *args])
        self.addCleanup(server.cleanup)
        return server.waitReady()

    def test_gracefulStop(self) -> None:
        """
        After SIGTERM an open connection keeps echoing while new connections
        are refused; once the client closes, the parent exits 0 and no
        worker is left.
        """
        server = self.start("--workers", "2")
        workers = server.workers()
        client = server.connect()
        client.sendall(b"before")
        self.assertEqual(client.recv(6), b"before")
        os.kill(server.pid, signal.SIGTERM)
        waitFor(lambda: "draining" in server.log(), what="the drain")

        def refused() -> bool:
            try:
                server.connect().close()
            except ConnectionRefusedError:
                return True
            return False

        waitFor(refused, what="new connections to be refused")
        for _ in range(5):
            client.sendall(b"during")
            self.assertEqual(client.recv(6), b"during")
        self.assertIsNone(server.process.poll())
        client.close()
        self.assertEqual(server.process.wait(30), 0)
        waitFor(lambda: not any(alive(pid) for pid in workers), 10, "the workers to exit")

    def test_stopServesTheBacklog(self) -> None:
        """
        Connections that wait in the backlog when the stop comes are
        accepted and served by the draining worker, not reset when the
        socket closes.
        """
        server = self.start("--workers", "1")
        [worker] = server.workers()
        # Stopped, the worker reads its drain order before the connections
        # that queue behind it: it must take them on its way out.
        os.kill(worker, signal.SIGSTOP)
        try:
            os.kill(server.pid, signal.SIGTERM)
            waitFor(lambda: "drain" in server.log(), what="the parent to start the drain")
            waiting = [server.connect() for _ in range(5)]
            for number, client in enumerate(waiting):
                self.addCleanup(client.close)
                client.sendall(b"queued %d" % number)
        finally:
            os.kill(worker, signal.SIGCONT)
        for number, client in enumerate(waiting):
            client.settimeout(10)
            self.assertEqual(client.recv(20), b"queued %d" % number)
            client.close()
        self.assertEqual(server.process.wait(30), 0)

    def test_secondSignalStopsAtOnce(self) -> None:
        """
        A second SIGTERM does not wait for open connections.
        """
        server = self.start("--workers", "1")
        client = server.connect()
        self.addCleanup(client.close)
        os.kill(server.pid, signal.SIGTERM)
        waitFor(lambda: "draining" in server.log(), what="the drain")
        # One sooner would be taken for the same request (SAME_STOP_WINDOW).
        time.sleep(SAME_STOP_WINDOW + 0.1)
        os.kill(server.pid, signal.SIGTERM)
        self.assertEqual(server.process.wait(30), 0)
        # Closed at once: an end of stream, or a reset from the killed worker.
        with contextlib.suppress(ConnectionResetError):
            self.assertEqual(client.recv(10), b"")

    def test_quitStopsGracefullyAndUsr1IsLogged(self) -> None:
        """
        USR1 to a parent logging to stdout (no --logfile for twistd to
        rotate) is logged, not fatal; QUIT stops gracefully, as TERM: an
        open connection is served until it closes.
        """
        server = self.start("--workers", "1")
        client = server.connect()
        self.addCleanup(client.close)
        os.kill(server.pid, signal.SIGUSR1)
        waitFor(lambda: "USR1: no log file to reopen" in server.log(), what="the USR1 line")
        client.sendall(b"still")
        self.assertEqual(client.recv(5), b"still")
        os.kill(server.pid, signal.SIGQUIT)
        waitFor(lambda: "draining" in server.log(), what="the drain")
        client.sendall(b"served")
        self.assertEqual(client.recv(6), b"served")
        client.close()
        self.assertEqual(server.process.wait(30), 0)

    def test_reloadUnderLoadLosesNothing(self) -> None:
        """
        SIGHUP replaces every worker while clients keep connecting and
        long-lived connections keep streaming: no connection is refused or
        reset and no byte is altered.
        """
        server = self.start("--workers", "2")
        old = server.workers()
        loads: list[Churn | Stream] = [Churn("127.0.0.1", server.port) for _ in range(3)]
        loads += [Stream("127.0.0.1", server.port) for _ in range(4)]
        for load in loads:
            load.start()
        try:
            waitFor(lambda: all(load.ok > 5 for load in loads), what="the load to run")
            os.kill(server.pid, signal.SIGHUP)
            waitFor(lambda: "generation 2 ready" in server.log(), what="the new generation")
            before = sum(load.ok for load in loads)
            waitFor(lambda: sum(load.ok for load in loads) > before + 200, what="more traffic")
        finally:
            for load in loads:
                load.stop()
        errors = [e for load in loads for e in load.errors]
        self.assertEqual(errors, [])
        waitFor(lambda: not any(alive(pid) for pid in old), what="the old workers to exit")
        new = server.workers()
        self.assertEqual(len(new), 2)
        self.assertFalse(set(new) & set(old))
        waitFor(lambda: "left (reload)" in server.log(), what="the departures logged")

    def test_failedReloadKeepsOldWorkers(self) -> None:
        """
        A new generation that cannot start is abandoned; the old workers
        keep serving.
        """
        marker = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"maccept-break-{os.getpid()}")
        server = MacceptServer(
            [
                "--listen",
                LOOPBACK,
                "--workers",
                "2",
                "--protocol",
                "tests.sample_protocols:breakableEcho",
            ],
            env={"MACCEPT_TEST_BREAK": marker},
        )
        self.addCleanup(server.cleanup)
        server.waitReady()
        old = server.workers()
        with open(marker, "w"):
            pass
        self.addCleanup(os.unlink, marker)
        os.kill(server.pid, signal.SIGHUP)
        waitFor(lambda: "reload failed, keeping the old workers" in server.log(), what="failure")
        # The abandoned new workers are killed; only the old ones remain.
        waitFor(lambda: server.workers() == old, what="only the old workers")
        with server.connect() as s:
            s.sendall(b"still")
            self.assertEqual(s.recv(5), b"still")

    def test_ttinAndTtou(self) -> None:
        """
        SIGTTIN adds a worker; SIGTTOU removes one, never below one.
        """
        server = self.start("--workers", "1")
        os.kill(server.pid, signal.SIGTTIN)
        waitFor(lambda: len(server.workers()) == 2, what="a second worker")
        waitFor(lambda: server.log().count(") ready") >= 2, what="it to be ready")
        os.kill(server.pid, signal.SIGTTOU)
        waitFor(lambda: len(server.workers()) == 1, what="back to one worker")
        os.kill(server.pid, signal.SIGTTOU)
        waitFor(lambda: "keeps at least one worker" in server.log(), what="the refusal")
        self.assertEqual(len(server.workers()), 1)

    def test_hungWorkerIsReplacedWithItsStack(self) -> None:
        """
        A worker blocked in time.sleep inside dataReceived is replaced after
        --timeout, and its stack is in the log.
        """
        server = self.start(
            "--workers", "1", "--timeout", "2", "--protocol", "tests.sample_protocols:Sleepy"
        )
        [hung] = server.workers()
        client = server.connect()
        self.addCleanup(client.close)
        client.sendall(b"sleep")
        waitFor(lambda: not alive(hung), 30, "the hung worker to be killed")
        waitFor(lambda: len(server.workers()) == 1, what="a replacement")
        waitFor(lambda: "left (watchdog)" in server.log(), what="the departure logged")
        log = server.log()
        self.assertIn("silent for", log)
        self.assertIn("in dataReceived", log)

    def test_stoppedWorkerCountsAsHung(self) -> None:
        """
        A worker stopped with SIGSTOP is replaced after --timeout.
        """
        server = self.start("--workers", "1", "--timeout", "2")
        [stopped] = server.workers()
        os.kill(stopped, signal.SIGSTOP)
        waitFor(lambda: not alive(stopped), 30, "the stopped worker to be killed")
        waitFor(lambda: len(server.workers()) == 1, what="a replacement")

    def test_recyclingByConnectionCount(self) -> None:
        """
        With --max-connections, workers are replaced as they reach it, and
        no connection is refused meanwhile.
        """
        server = self.start(
            "--workers", "2", "--max-connections", "25", "--max-connections-jitter", "5"
        )
        first = set(server.workers())
        for n in range(150):
            with server.connect() as s:
                s.sendall(b"%d" % n)
                self.assertEqual(s.recv(10), b"%d" % n)
        waitFor(lambda: "left (recycle)" in server.log(), what="a recycled worker")
        self.assertNotEqual(set(server.workers()), first)
        self.assertIn("accepted", server.log())

    def test_workerTerminatedAlone(self) -> None:
        """
        SIGTERM sent to one worker has it replaced at once and drained: an
        open connection is still served, and the pool counts a recycling,
        not a crash.
        """
        server = self.start("--workers", "1")
        [worker] = server.workers()
        client = server.connect()
        self.addCleanup(client.close)
        os.kill(worker, signal.SIGTERM)
        waitFor(lambda: "received SIGTERM" in server.log(), what="the replacement")
        waitFor(lambda: len(set(server.workers()) - {worker}) == 1, what="a new worker")
        client.sendall(b"still here")
        self.assertEqual(client.recv(10), b"still here")
        client.close()
        waitFor(lambda: "left (recycle)" in server.log(), what="the worker to leave")
        self.assertNotIn("died", server.log())
        with server.connect() as fresh:
            fresh.sendall(b"new")
            self.assertEqual(fresh.recv(3), b"new")

    def test_idleWorkerTerminatedAlone(self) -> None:
        """
        A worker with no connection to finish leaves at once on SIGTERM;
        it is started again, as a recycling, not a crash.
        """
        server = self.start("--workers", "1")
        [worker] = server.workers()
        os.kill(worker, signal.SIGTERM)
        waitFor(lambda: "starting worker 1 again" in server.log(), what="the restart")
        waitFor(lambda: server.log().count(") ready") == 2, what="the new worker to be ready")
        self.assertNotIn("died", server.log())
        self.assertIn("left (recycle)", server.log())
        with server.connect() as client:
            client.sendall(b"back")
            self.assertEqual(client.recv(4), b"back")

    def test_startingWorkerTerminatedAlone(self) -> None:
        """
        SIGTERM to a worker still running its start hook cuts the start
        short (the hook's Deferred is cancelled, not waited for): the worker
        leaves at once and is started again, as a recycling, not a crash.
        """
        marker = os.path.join(tempfile.gettempdir(), f"maccept-slow-start-{os.getpid()}")
        server = MacceptServer(
            ["--listen", LOOPBACK, "--workers", "1", "--protocol", SLOW_TO_START],
            env={"MACCEPT_TEST_SLOW": marker},
        )
        self.addCleanup(server.cleanup)
        server.waitReady()
        Path(marker).touch()
        self.addCleanup(Path(marker).unlink, missing_ok=True)
        [first] = server.workers()
        os.kill(first, signal.SIGKILL)
        waitFor(lambda: "hook: starting slowly" in server.log(), what="the restart's hook")
        [starting] = server.workers()
        os.unlink(marker)
        os.kill(starting, signal.SIGTERM)
        waitFor(lambda: "starting worker 1 again" in server.log(), what="the restart")
        waitFor(lambda: server.log().count(") ready") == 2, what="the new worker to be ready")
        self.assertIn(f"worker 1 (pid {starting}) left (recycle), exit code 0", server.log())
        self.assertEqual(server.log().count("died:"), 1)  # the SIGKILL, not the SIGTERM
        with server.connect() as client:
            client.sendall(b"back")
            self.assertEqual(client.recv(4), b"back")

    def test_groupTerminatedStartsNothing(self) -> None:
        """
        SIGTERM to the whole process group (systemd's default KillMode)
        stops the pool without starting replacements for the workers.
        """
        server = self.start("--workers", "3")
        os.killpg(os.getpgid(server.pid), signal.SIGTERM)
        self.assertEqual(server.process.wait(30), 0)
        self.assertNotIn("replacing worker", server.log())
        self.assertNotIn("again", server.log())
        self.assertNotIn("started worker 4", server.log())

    def test_recyclingByMemory(self) -> None:
        """
        With --max-memory, a worker that grows past it is replaced, the
        replacement first.
        """
        server = self.start(
            "--workers", "1", "--max-memory", "80", "--protocol", "tests.sample_protocols:Hog"
        )
        [hog] = server.workers()
        with server.connect() as s:
            s.sendall(b"grow")
            self.assertEqual(s.recv(4), b"grow")
        waitFor(lambda: not alive(hog), what="the grown worker to go")
        # The parent logs the departure once it has reaped the worker.
        waitFor(lambda: "left (recycle)" in server.log(), what="the departure logged")
        log = server.log()
        self.assertIn("over --max-memory 80 MiB", log)
        self.assertLess(
            log.index("started worker 1 (pid", log.index("over --max-memory")),
            log.index("left (recycle)"),
        )
        self.assertEqual(len(server.workers()), 1)

    def test_deathSeenThoughAChildHoldsItsPipes(self) -> None:
        """
        A worker that dies while a child it started (C{subprocess.Popen},
        which inherits its output pipes) lives on is seen dead, logged and
        restarted, and a stop then ends promptly.
        """
        server = self.start("--workers", "1", "--protocol", "tests.sample_protocols:SpawnsThenDies")
        [worker] = server.workers()
        with server.connect() as s:
            s.settimeout(10)
            s.sendall(b"go")
            child = int(s.recv(32).split()[0])
        self.addCleanup(killIfAlive, child)
        waitFor(lambda: "died: exit code 3" in server.log(), what="the death logged")
        waitFor(lambda: server.workers() and server.workers() != [worker], what="a new worker")
        os.kill(server.pid, signal.SIGTERM)
        self.assertEqual(server.process.wait(30), 0)

    def test_childrenLeftRunningEndWithTheWorker(self) -> None:
        """
        A worker that leaves (a reload) sends TERM to the processes it
        started and left running, and says so: under twistd nothing else
        would stop them.
        """
        server = self.start("--workers", "1", "--protocol", "tests.sample_protocols:SpawnsChild")
        with server.connect() as s:
            s.settimeout(10)
            s.sendall(b"go")
            child = int(s.recv(32).split()[0])
        self.addCleanup(killIfAlive, child)
        self.assertTrue(alive(child))
        os.kill(server.pid, signal.SIGHUP)
        waitFor(lambda: not alive(child), what="the child to be stopped")
        self.assertIn(
            f"sent TERM to the 1 process(es) it started and left running: {child}", server.log()
        )

    def test_termsWhileLeavingAreNoCrash(self) -> None:
        """
        A worker sent TERM again and again while it leaves (its reactor
        stopped, the interpreter finalizing) still exits cleanly: a
        recycling, not a death by signal.
        """
        server = self.start("--workers", "1")
        [worker] = server.workers()
        deadline = time.monotonic() + 5
        with contextlib.suppress(ProcessLookupError):
            while alive(worker) and time.monotonic() < deadline:
                os.kill(worker, signal.SIGTERM)
                time.sleep(0.003)
        waitFor(
            lambda: re.search(rf"\(pid {worker}\) (left|died)", server.log()),
            what="the worker's departure",
        )
        self.assertIn(f"worker 1 (pid {worker}) left (recycle)", server.log())
        self.assertNotIn("died", server.log())

    def test_lingeringThreadShownBeforeKill(self) -> None:
        """
        A worker kept alive after its drain by a thread of its own has its
        stacks, that thread's among them, in the log before it is killed.
        """
        server = self.start(
            "--workers",
            "1",
            "--graceful-timeout",
            "1",
            "--protocol",
            "tests.sample_protocols:ThreadKeepsAlive",
        )
        os.kill(server.pid, signal.SIGTERM)
        server.process.wait(30)
        log = server.log()
        self.assertIn("killing it", log)
        self.assertLess(log.index("Thread 0x"), log.index("killing it"))
        # The main thread waits for it, as the interpreter exits.
        self.assertIn("in _shutdown", log)

    def test_crashLoopBacksOff(self) -> None:
        """
        Workers that crash on every connection are respawned a handful of
        times, not in a tight loop, and each death is logged with its last
        words.
        """
        server = self.start(
            "--workers", "2", "--protocol", "tests.sample_protocols:CrashesOnConnect"
        )
        deadline = time.monotonic() + 12
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", server.port), timeout=1) as s:
                    s.recv(1)
            except OSError as e:
                self.assertIn(e.errno, (errno.ECONNRESET, errno.ECONNREFUSED, None))
            time.sleep(0.02)
        log = server.log()
        spawned = log.count("started worker")
        self.assertLessEqual(spawned, 10, log)
        self.assertIn("died: exit code 7; last words: crashing on purpose", log)

    def test_hooksRunInEachWorker(self) -> None:
        """
        IWorkerLifecycle hooks run in every worker: starting before it
        accepts, then draining and stopping when it stops.
        """
        server = self.start(
            "--workers", "2", "--protocol", "tests.sample_protocols:HookedEchoFactory"
        )
        for pid in server.workers():
            self.assertIn(f"hook: starting in {pid}", server.log())
        log = server.log
        os.kill(server.pid, signal.SIGTERM)
        self.assertEqual(server.process.wait(30), 0)
        self.assertEqual(log().count("hook: draining"), 2)
        self.assertEqual(log().count("hook: stopping"), 2)

    def test_failingStartHookFailsTheWorker(self) -> None:
        result = runMaccept(
            [
                "--listen",
                LOOPBACK,
                "--workers",
                "1",
                "--protocol",
                "tests.sample_protocols:FailingHookFactory",
            ]
        )
        self.assertNotEqual(result.returncode, 0)
        self.assertIn("failed to start: RuntimeError: the database is down", result.stdout)


class LifecycleBadInputTests(SynchronousTestCase):
    def check(self, args: list[str], option: str, problem: str) -> None:
        result = runMaccept(args)
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        self.assertNotEqual(result.returncode, 0)
        self.assertNotIn("Traceback", result.stdout + result.stderr)
        self.assertEqual(len(lines), 1, result.stderr)
        self.assertIn(option, lines[0])
        self.assertIn(problem, lines[0])

    def test_gracefulTimeoutNegative(self) -> None:
        self.check(["--graceful-timeout", "-1"], "--graceful-timeout", "at least 0")

    def test_timeoutNotANumber(self) -> None:
        self.check(["--timeout", "abc"], "--timeout", "expected a number")

    def test_timeoutTooShort(self) -> None:
        self.check(["--timeout", "1e-6"], "--timeout", "must be 0 (off) or at least 1")

    def test_maxConnectionsZero(self) -> None:
        self.check(["--max-connections", "0"], "--max-connections", "at least 1")

    def test_maxMemoryBelowStartupSize(self) -> None:
        self.check(["--max-memory", "1"], "--max-memory", "must be at least")

    def test_maxMemoryBelowTheProtocolsSize(self) -> None:
        """
        The smallest --max-memory counts the protocol's code, which a
        worker loads too: a limit that only leaves out a heavy module's
        64 MiB is refused at start-up rather than replacing workers without
        end.
        """
        plain = runMaccept(["--max-memory", "1"]).stderr
        smallest = int(re.search(r"must be at least (\d+)", plain).group(1))  # type: ignore[union-attr]
        limit = str(smallest + 16)
        self.check(
            ["--protocol", "tests.sample_heavy:factory", "--max-memory", limit],
            "--max-memory",
            "must be at least",
        )


class TitleTests(SynchronousTestCase):
    def test_processTitles(self) -> None:
        """
        With setproctitle installed, ps shows the parent as the master with
        its listen descriptions and each worker by number.
        """
        server = MacceptServer(["--listen", LOOPBACK, "--workers", "2"])
        self.addCleanup(server.cleanup)
        server.waitReady()

        def title(pid: int) -> str:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                return f.read().replace(b"\0", b" ").decode().strip()

        waitFor(lambda: title(server.pid).startswith("maccept: master"), what="the title")
        self.assertEqual(title(server.pid), f"maccept: master {LOOPBACK}")
        titles = sorted(title(pid) for pid in server.workers())
        self.assertEqual(titles, ["maccept: worker 1", "maccept: worker 2"])

    def test_withoutSetproctitleNothingBreaks(self) -> None:
        """
        Without setproctitle, setting a title leaves the process as it was.
        """
        import sys

        from maccept._titles import setTitle

        saved = sys.modules.get("setproctitle")
        sys.modules["setproctitle"] = None  # type: ignore[assignment]
        with open("/proc/self/cmdline", "rb") as f:
            before = f.read()
        try:
            setTitle("maccept: test")
            with open("/proc/self/cmdline", "rb") as f:
                self.assertEqual(f.read(), before)
        finally:
            if saved is None:
                del sys.modules["setproctitle"]
            else:
                sys.modules["setproctitle"] = saved
