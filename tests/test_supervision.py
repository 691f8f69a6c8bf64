"""
The real server's pool under supervision: replacement, no orphans, start-up
failures, logs and descriptors.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time

from twisted.trial.unittest import SynchronousTestCase

from maccept._signals import SPAWN_BLOCKED, spawnSignalsBlocked
from tests.server import MacceptServer, alive, echoRoundTrip, runMaccept, waitFor

LOOPBACK = "tcp:0:interface=127.0.0.1"


class SupervisionTests(SynchronousTestCase):
    def start(self, *args: str, **kwargs: object) -> MacceptServer:
        server = MacceptServer(args, **kwargs)  # type: ignore[arg-type]
        self.addCleanup(server.cleanup)
        return server.waitReady()

    def test_killedWorkerIsReplaced(self) -> None:
        """
        A worker killed with SIGKILL is replaced by a new process and the
        pool keeps its size and keeps serving.
        """
        server = self.start("--workers", "2", "--listen", LOOPBACK)
        first = server.workers()
        self.assertEqual(len(first), 2)
        os.kill(first[0], signal.SIGKILL)
        after = waitFor(
            lambda: (w := server.workers()) and len(w) == 2 and first[0] not in w and w,
            what="a replacement worker",
        )
        assert isinstance(after, list)
        self.assertIn(first[1], after)
        waitFor(lambda: server.log().count("ready") >= 3, what="the replacement to be ready")
        self.assertIn(f"pid {first[0]}) died: signal 9 (SIGKILL)", server.log())
        for _ in range(10):
            with server.connect() as s:
                self.assertEqual(echoRoundTrip(s, b"still here"), b"still here")

    def test_parentKilledLeavesNoWorker(self) -> None:
        """
        SIGKILL of the parent leaves no worker behind.
        """
        server = self.start("--workers", "3", "--listen", LOOPBACK)
        workers = server.workers()
        os.kill(server.pid, signal.SIGKILL)
        server.process.wait()
        waitFor(lambda: not any(alive(pid) for pid in workers), 10, "the workers to exit")

    def test_stoppedParentKillsNoWorker(self) -> None:
        """
        A parent stopped for longer than --timeout (SIGSTOP here; a full log
        pipe or a paused VM alike) does not take its workers for hung when
        it runs again: the heartbeats they sent meanwhile are read first.
        """
        server = self.start("--workers", "2", "--listen", LOOPBACK, "--timeout", "2")
        workers = server.workers()
        os.kill(server.pid, signal.SIGSTOP)
        try:
            time.sleep(4)
        finally:
            os.kill(server.pid, signal.SIGCONT)
        waitFor(lambda: "the parent itself did not run for" in server.log(), what="the stall")
        time.sleep(3)  # more than --timeout since the parent ran again
        self.assertNotIn("silent for", server.log())
        self.assertEqual(server.workers(), workers)
        with server.connect() as s:
            self.assertEqual(echoRoundTrip(s, b"still here"), b"still here")

    def test_sigtermStopsEverything(self) -> None:
        """
        SIGTERM stops the workers and then the parent, which exits 0.
        """
        server = self.start("--workers", "2", "--listen", LOOPBACK)
        workers = server.workers()
        self.assertEqual(server.stop(), 0)
        self.assertFalse(any(alive(pid) for pid in workers))

    def test_sigintStopsEverything(self) -> None:
        """
        SIGINT (Ctrl-C) stops the pool the same way.
        """
        server = self.start("--workers", "2", "--listen", LOOPBACK)
        workers = server.workers()
        os.kill(server.pid, signal.SIGINT)
        self.assertEqual(server.process.wait(30), 0)
        waitFor(lambda: not any(alive(pid) for pid in workers), 10, "the workers to exit")

    def test_workersIgnoreTheParentsSignals(self) -> None:
        """
        A worker ignores the signals meant for the parent (a terminal's
        hang-up or C{systemctl kill -s USR2} reach every process): by
        default they would end it or suspend it.
        """
        server = self.start("--workers", "1", "--listen", LOOPBACK)
        [worker] = server.workers()
        with open(f"/proc/{worker}/status") as status:
            masks = dict(line.split()[:2] for line in status if line.startswith("Sig"))
        ignored, blocked = int(masks["SigIgn:"], 16), int(masks["SigBlk:"], 16)
        parents = [signal.SIGINT, signal.SIGQUIT, signal.SIGHUP, signal.SIGUSR2]
        parents += [signal.SIGTTIN, signal.SIGTTOU]
        for number in parents:
            self.assertTrue(ignored & (1 << (number - 1)), f"{number.name} not ignored")
            os.kill(worker, number)
        for number in (*parents, signal.SIGTERM):
            # Blocked only while the worker started (see spawnSignalsBlocked).
            self.assertFalse(blocked & (1 << (number - 1)), f"{number.name} still blocked")
        with server.connect() as client:
            self.assertEqual(echoRoundTrip(client, b"still here"), b"still here")
        self.assertEqual(server.workers(), [worker])

    def test_workerStartFailureExitsWithItsError(self) -> None:
        """
        When workers cannot start, twistd exits non-zero with the worker's
        error in one line, and leaves no process behind.
        """
        result = runMaccept(
            [
                "--workers",
                "2",
                "--listen",
                LOOPBACK,
                "--protocol",
                "tests.sample_protocols:failsInWorker",
            ]
        )
        self.assertNotEqual(result.returncode, 0)
        lines = [
            line
            for line in result.stdout.splitlines()
            if "failed to start: RuntimeError: boom in worker start-up" in line
        ]
        self.assertEqual(len(lines), 1, result.stdout)

    def test_workerLogsReachParentTagged(self) -> None:
        """
        A worker's log events reach the parent's log with their level and a
        system naming the worker's number and pid; its stdout and stderr
        lines too; and a traceback from its protocol lands there while the
        worker lives on.
        """
        jsonLog = os.path.join(tempfile.mkdtemp(), "log.json")
        server = self.start(
            "--workers",
            "1",
            "--listen",
            LOOPBACK,
            "--protocol",
            "tests.sample_protocols:Chatty",
            twistdArgs=["--logger", "tests.sample_protocols.jsonLogObserver"],
            env={"MACCEPT_TEST_JSON_LOG": jsonLog},
        )
        [worker] = server.workers()
        system = f"worker 1 pid {worker}"
        with server.connect() as s:
            s.sendall(b"hi")
            self.assertEqual(s.recv(2), b"hi")
        with server.connect() as s:
            s.sendall(b"crash")
            s.recv(10)

        def events() -> list[dict[str, object]]:
            with open(jsonLog) as f:
                return [json.loads(r) for r in f.read().split("\x1e") if r.strip()]

        def find(text: str) -> dict[str, object] | None:
            for event in events():
                if text in json.dumps(event):
                    return event
            return None

        waitFor(lambda: find("chatty was asked to crash"), what="the traceback")
        chatty = find("chatty connection from")
        assert chatty is not None
        self.assertEqual(chatty["log_system"], system)
        self.assertEqual(chatty["log_level"]["name"], "warn")  # type: ignore[index]
        stdout = find("chatty says hello on stdout")
        stderr = find("chatty says hello on stderr")
        assert stdout is not None and stderr is not None
        self.assertEqual(stdout["log_system"], system)
        self.assertEqual(stderr["log_system"], system)
        crash = find("chatty was asked to crash")
        assert crash is not None
        self.assertEqual(crash["log_system"], system)
        self.assertIn("Traceback", json.dumps(crash))
        self.assertEqual(server.workers(), [worker])

    def test_workersGetNoStrayDescriptors(self) -> None:
        """
        A descriptor the parent inherited never reaches a worker.
        """
        stray = tempfile.NamedTemporaryFile(prefix="stray-")  # noqa: SIM115
        self.addCleanup(stray.close)
        server = self.start("--workers", "2", "--listen", LOOPBACK, passFds=[stray.fileno()])

        def holders(pid: int) -> bool:
            fds = os.listdir(f"/proc/{pid}/fd")
            return any(_target(pid, fd) == stray.name for fd in fds)

        self.assertTrue(holders(server.pid))
        for worker in server.workers():
            self.assertFalse(holders(worker))


def _target(pid: int, fd: str) -> str:
    try:
        return os.readlink(f"/proc/{pid}/fd/{fd}")
    except OSError:
        return ""


class SpawnMaskTests(SynchronousTestCase):
    def test_childStartsWithParentSignalsBlocked(self) -> None:
        """
        A process spawned as Twisted spawns one (posix_spawn, ignored
        signals reset to default) while L{spawnSignalsBlocked} holds
        starts with the parent's signals and SIGTERM blocked, so that one
        arriving before it has its own handlers cannot end it; the parent's
        mask is back afterwards.
        """
        before = signal.pthread_sigmask(signal.SIG_BLOCK, [])
        readEnd, writeEnd = os.pipe()
        self.addCleanup(os.close, readEnd)
        script = "print([l.split()[1] for l in open('/proc/self/status') if l[:7] == 'SigBlk:'][0])"
        with spawnSignalsBlocked():
            pid = os.posix_spawnp(
                sys.executable,
                [sys.executable, "-c", script],
                os.environ,
                file_actions=[(os.POSIX_SPAWN_DUP2, writeEnd, 1)],
                setsigdef=[signal.SIGHUP],
            )
        os.close(writeEnd)
        os.waitpid(pid, 0)
        blocked = int(os.read(readEnd, 100).decode(), 16)
        for number in SPAWN_BLOCKED:
            self.assertTrue(blocked & (1 << (number - 1)), f"{number.name} not blocked")
        self.assertEqual(signal.pthread_sigmask(signal.SIG_BLOCK, []), before)

    def test_workerUnblocksWhatItHandles(self) -> None:
        """
        A worker started with every signal a new parent starts with blocked
        (L{UPGRADE_BLOCKED}: the first workers of a parent started by USR2,
        spawned before that parent has unblocked its own) has none of them
        blocked once its handlers are in place: SIGUSR1 too, or the
        watchdog's stack dump before a kill would never come.
        """
        script = (
            "import signal\n"
            "from maccept._signals import UPGRADE_BLOCKED\n"
            "from maccept._worker import _handleSignals\n"
            "signal.pthread_sigmask(signal.SIG_BLOCK, UPGRADE_BLOCKED)\n"
            "_handleSignals(None, None)\n"
            "print(sorted(int(s) for s in signal.pthread_sigmask(signal.SIG_BLOCK, [])))\n"
        )
        done = subprocess.run(
            [sys.executable, "-c", script], capture_output=True, text=True, timeout=60
        )
        self.assertEqual((done.stdout.strip(), done.stderr), ("[]", ""))
