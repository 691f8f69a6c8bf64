"""
Seeing inside a running server: C{/metrics}, C{/healthz} and the control
socket with C{maccept-ctl}, against the real C{twistd -n maccept}.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import stat
import struct
import subprocess
import sys
import tempfile
import threading
import urllib.error
import urllib.request
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families
from twisted.protocols import amp
from twisted.trial.unittest import SynchronousTestCase

from tests.server import MacceptServer, alive, echoRoundTrip, runMaccept, takenPort, waitFor

LOOPBACK = "tcp:0:interface=127.0.0.1"
METRICS_AT = re.compile(r"--metrics \S+: listening on (http://\S+/)")
MACCEPT_CTL = str(Path(sys.executable).with_name("maccept-ctl"))

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def ampBox(**fields: str) -> bytes:
    """
    One AMP box on the wire: length-prefixed keys and values, then an empty
    key.
    """
    out = b""
    for key, value in fields.items():
        for part in (key.encode(), value.encode()):
            out += struct.pack("!H", len(part)) + part
    return out + b"\x00\x00"


class ObservabilityTests(SynchronousTestCase):
    def start(
        self, *args: str, control: bool = False, env: dict[str, str] | None = None
    ) -> MacceptServer:
        argv = ["--listen", LOOPBACK, "--metrics", LOOPBACK, *args]
        if control:
            directory = tempfile.mkdtemp(prefix="maccept-ctl-")
            self.addCleanup(shutil.rmtree, directory, True)
            self.controlPath = os.path.join(directory, "control.sock")
            argv += ["--control", self.controlPath]
        server = MacceptServer(argv, env=env)
        self.addCleanup(server.cleanup)
        server.waitReady()
        match = waitFor(lambda: METRICS_AT.search(server.log()), what="the metrics address")
        assert isinstance(match, re.Match)
        self.metricsURL = match.group(1)
        return server

    def get(self, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(self.metricsURL + path, timeout=10) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()

    def scrape(self) -> Samples:
        """
        Every sample of C{/metrics}, parsed by prometheus_client's own parser.
        """
        status, text = self.get("metrics")
        self.assertEqual(status, 200)
        samples: Samples = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
        return samples

    def ctl(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [MACCEPT_CTL, self.controlPath, *args],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )

    def statusJSON(self) -> dict[str, object]:
        done = self.ctl("status", "--json")
        self.assertEqual(done.returncode, 0, done.stderr)
        result = json.loads(done.stdout)
        assert isinstance(result, dict)
        return result

    def workerPids(self) -> set[int]:
        workers = self.statusJSON()["workers"]
        assert isinstance(workers, list)
        return {w["pid"] for w in workers}

    def test_countersMatchWorkload(self) -> None:
        """
        N connections that each echo B bytes show up as at least N accepted
        and B*N bytes each way, with the pool's state and per-worker series.
        """
        server = self.start("--workers", "2")
        connections, size = 20, 3000
        for n in range(connections):
            with server.connect() as client:
                payload = bytes([n]) * size
                self.assertEqual(echoRoundTrip(client, payload), payload)

        def counted() -> Samples | None:
            samples = self.scrape()
            accepted = samples[("maccept_connections_accepted_total", ())]
            received = samples[("maccept_bytes_received_total", ())]
            sent = samples[("maccept_bytes_sent_total", ())]
            done = accepted >= connections and min(received, sent) >= connections * size
            return samples if done else None

        samples = waitFor(counted, what="the workload in the counters")
        assert isinstance(samples, dict)
        self.assertEqual(samples[("maccept_workers", (("state", "ready"),))], 2)
        self.assertEqual(samples[("maccept_connections_open", ())], 0)
        # One client at a time: each wake-up took one connection.
        self.assertEqual(
            samples[("maccept_accept_batches_total", ())],
            samples[("maccept_connections_accepted_total", ())],
        )
        memory = {
            dict(labels)["pid"]: value
            for (name, labels), value in samples.items()
            if name == "maccept_worker_resident_memory_bytes"
        }
        self.assertEqual(set(memory), {str(pid) for pid in server.workers()})
        self.assertTrue(all(value > 0 for value in memory.values()))
        address = (("listen", server.addresses[0]),)
        self.assertIn(("maccept_listen_backlog", address), samples)
        self.assertEqual(samples[("maccept_listen_backlog_limit", address)], 1024)

    def test_countersSurviveReload(self) -> None:
        """
        A reload replaces every worker, yet no counter goes backwards, and
        the restarts count the reload.
        """
        server = self.start("--workers", "2")
        for _ in range(10):
            with server.connect() as client:
                echoRoundTrip(client, b"x" * 1000)
        waitFor(
            lambda: self.scrape()[("maccept_connections_accepted_total", ())] >= 10,
            what="the first connections counted",
        )
        before = self.scrape()
        old = set(server.workers())
        os.kill(server.pid, signal.SIGHUP)
        waitFor(lambda: "generation 2 ready" in server.log(), what="the reload")
        waitFor(lambda: not any(alive(pid) for pid in old), what="the old workers to leave")
        after = self.scrape()
        for name in (
            "maccept_connections_accepted_total",
            "maccept_bytes_received_total",
            "maccept_bytes_sent_total",
        ):
            self.assertGreaterEqual(after[(name, ())], before[(name, ())], name)
        self.assertEqual(after[("maccept_worker_restarts_total", (("reason", "reload"),))], 2)

    def test_drainSweepIsNoWakeup(self) -> None:
        """
        A draining worker's last sweep of the backlog is not a wake-up that
        found nothing: one worker (no other to take a connection first),
        reloaded, counts none.
        """
        server = self.start("--workers", "1")
        with server.connect() as client:
            echoRoundTrip(client, b"x")
        old = set(server.workers())
        os.kill(server.pid, signal.SIGHUP)
        waitFor(lambda: "generation 2 ready" in server.log(), what="the reload")
        waitFor(lambda: not any(alive(pid) for pid in old), what="the old worker to leave")
        samples = self.scrape()
        self.assertEqual(samples[("maccept_worker_restarts_total", (("reason", "reload"),))], 1)
        self.assertEqual(samples[("maccept_accept_empty_wakeups_total", ())], 0)

    def test_healthz(self) -> None:
        """
        C{/healthz} answers 200 while workers serve, and 503 once the pool
        is stopping, while it still drains an open connection.
        """
        server = self.start("--workers", "1")
        self.assertEqual(self.get("healthz")[0], 200)
        self.assertEqual(self.get("metrics")[0], 200)
        # Scrapes and health checks every few seconds: no access log line,
        # nor one per HEAD.
        head = urllib.request.Request(self.metricsURL + "healthz", method="HEAD")
        with urllib.request.urlopen(head, timeout=10) as response:
            self.assertEqual((response.status, response.read()), (200, b""))
        self.assertNotIn("GET /", server.log())
        self.assertNotIn("HEAD request", server.log())
        # A body (any size: it would be spooled to disk) is refused.
        post = urllib.request.Request(self.metricsURL + "metrics", data=b"x" * 5_000_000)
        with self.assertRaises(urllib.error.HTTPError) as caught:
            urllib.request.urlopen(post, timeout=10)
        self.assertEqual(caught.exception.code, 413)
        caught.exception.close()
        client = server.connect()
        self.addCleanup(client.close)
        client.sendall(b"hold")
        self.assertEqual(client.recv(4), b"hold")
        os.kill(server.pid, signal.SIGTERM)
        waitFor(lambda: self.get("healthz")[0] == 503, what="/healthz to answer 503")
        client.sendall(b"still")
        self.assertEqual(client.recv(5), b"still")
        client.close()
        self.assertEqual(server.process.wait(30), 0)

    def test_stopDelay(self) -> None:
        """
        With C{--stop-delay}, C{/healthz} answers 503 at once on TERM while
        the workers still accept new connections; then the pool drains and
        the parent exits 0.
        """
        server = self.start("--workers", "1", "--stop-delay", "5", control=True)
        os.kill(server.pid, signal.SIGTERM)
        waitFor(lambda: self.get("healthz")[0] == 503, what="/healthz to answer 503")
        self.assertIn("stopping in 5s: /healthz answers 503", server.log())
        # Stopping for everything but accepting: no reload, no scaling.
        self.assertEqual(self.get("healthz")[1], "unavailable: pool is stopping\n")
        self.assertEqual(self.statusJSON()["state"], "stopping")
        self.assertEqual(self.ctl("reload").returncode, 1)
        self.assertEqual(self.ctl("scale", "2").returncode, 1)
        with server.connect() as client:
            self.assertEqual(echoRoundTrip(client, b"still welcome"), b"still welcome")
        self.assertEqual(server.process.wait(30), 0)
        self.assertIn("stopping: draining every worker", server.log())

    def test_ctlStatusListsLiveWorkers(self) -> None:
        """
        C{maccept-ctl status --json} lists exactly the live worker pids; the
        table names each of them, and a closed output is no error; the
        socket is for its owner only.
        """
        server = self.start("--workers", "2", control=True)
        self.assertEqual(self.workerPids(), set(server.workers()))
        self.assertEqual(stat.S_IMODE(os.stat(self.controlPath).st_mode), 0o600)
        table = self.ctl("status")
        self.assertEqual(table.returncode, 0, table.stderr)
        for pid in server.workers():
            self.assertIn(str(pid), table.stdout)
        # Its reader gone (`| true`): the parent answered, so no error.
        read, write = os.pipe()
        os.close(read)
        try:
            closed = subprocess.run(
                [MACCEPT_CTL, self.controlPath, "status"],
                stdout=write,
                stderr=subprocess.PIPE,
                text=True,
                timeout=30,
                check=False,
            )
        finally:
            os.close(write)
        self.assertEqual((closed.returncode, closed.stderr), (0, ""))
        # No line per control connection: a status every few seconds is routine.
        self.assertNotIn("ControlProtocol connection", server.log())

    def test_ctlScaleReloadStop(self) -> None:
        """
        C{scale} grows and shrinks the pool, C{reload} replaces every worker
        and C{stop} stops the server with status 0.
        """
        server = self.start("--workers", "1", control=True)
        self.assertEqual(self.ctl("scale", "3").returncode, 0)
        waitFor(lambda: len(self.workerPids()) == 3 == len(server.workers()), what="3 workers")
        self.assertEqual(self.ctl("scale", "1").returncode, 0)
        waitFor(lambda: len(server.workers()) == 1, what="1 worker")
        self.assertEqual(self.workerPids(), set(server.workers()))
        old = set(server.workers())
        self.assertEqual(self.ctl("reload").returncode, 0)
        waitFor(lambda: "generation 2 ready" in server.log(), what="the reload")
        waitFor(lambda: not (set(server.workers()) & old), what="the old worker to leave")
        with server.connect() as client:
            self.assertEqual(echoRoundTrip(client, b"after reload"), b"after reload")
        done = self.ctl("stop")
        self.assertEqual(done.returncode, 0, done.stderr)
        self.assertEqual(server.process.wait(30), 0)

    def test_ctlReloadWait(self) -> None:
        """
        C{reload --wait} returns once the new generation serves (exit 0),
        or once it has failed (exit 1, with why); C{status} then says the
        last reload failed, until one succeeds.
        """
        marker = os.path.join(tempfile.mkdtemp(prefix="maccept-break-"), "broken")
        self.addCleanup(shutil.rmtree, os.path.dirname(marker), True)
        server = self.start(
            "--workers",
            "2",
            "--protocol",
            "tests.sample_protocols:breakableEcho",
            control=True,
            env={"MACCEPT_TEST_BREAK": marker},
        )
        done = self.ctl("reload", "--wait")
        self.assertEqual((done.returncode, done.stdout), (0, "reloaded: generation 2 serves\n"))
        # Not only said: the new generation is ready when it returns.
        self.assertIn("generation 2 ready", server.log())
        with open(marker, "w"):
            pass
        done = self.ctl("reload", "--wait")
        self.assertEqual(done.returncode, 1, done.stdout)
        self.assertTrue(
            done.stderr.startswith(
                "maccept-ctl: reload: generation 3 failed, generation 2 serves on: "
            ),
            done.stderr,
        )
        self.assertIn("broken deploy", done.stderr)
        self.assertEqual(len(done.stderr.splitlines()), 1)
        table = self.ctl("status").stdout.splitlines()
        self.assertTrue(table[1].startswith("last reload (generation 3) failed: "), table)
        self.assertTrue(table[1].endswith("; generation 2 serves"), table)
        os.unlink(marker)
        done = self.ctl("reload", "--wait")
        self.assertEqual((done.returncode, done.stdout), (0, "reloaded: generation 4 serves\n"))
        self.assertNotIn("last reload", self.ctl("status").stdout)
        # Without --wait, as before: the request is taken, not awaited.
        self.assertEqual(self.ctl("reload").stdout, "reloading\n")

    def test_ctlRefusedScale(self) -> None:
        """
        A request the pool refuses (fewer than one worker, more than it may
        run) exits 1 with the reason on one line, and changes nothing.
        """
        self.start("--workers", "1", control=True)
        for workers, reason in [("0", "at least one"), ("100000", "at most 512")]:
            done = self.ctl("scale", workers)
            self.assertEqual(done.returncode, 1)
            [line] = done.stderr.strip().splitlines()
            self.assertIn(reason, line)
            self.assertNotIn("Traceback", done.stderr)
        self.assertEqual(self.statusJSON()["size"], 1)

    def test_ctlMissingSocket(self) -> None:
        """
        A socket nobody listens on: exit 2, one line naming the path.
        """
        self.controlPath = os.path.join(tempfile.gettempdir(), "maccept-no-such.sock")
        done = self.ctl("status")
        self.assertEqual(done.returncode, 2)
        [line] = done.stderr.strip().splitlines()
        self.assertIn(self.controlPath, line)

    def test_ctlBadPaths(self) -> None:
        """
        A path no UNIX socket can have (too long, empty, a regular file):
        exit 2 at once, one line saying why.
        """
        directory = tempfile.mkdtemp(prefix="maccept-ctl-paths-")
        self.addCleanup(shutil.rmtree, directory, True)
        regular = os.path.join(directory, "file")
        Path(regular).touch()
        for path, why in [
            (os.path.join(directory, "x" * 120), "longer than the 107 bytes"),
            ("", "the control socket's path is empty"),
            (regular, "is not a socket"),
        ]:
            self.controlPath = path
            done = self.ctl("status")
            self.assertEqual(done.returncode, 2)
            [line] = done.stderr.strip().splitlines()
            self.assertIn(why, line)

    def test_ctlStopTwice(self) -> None:
        """
        A second C{stop} while the workers drain is refused (exit 1): it
        does not turn into the kill a second TERM is, so open connections
        are still served.
        """
        server = self.start("--workers", "1", control=True)
        held = server.connect()
        self.addCleanup(held.close)
        held.sendall(b"before")
        self.assertEqual(held.recv(6), b"before")
        self.assertEqual(self.ctl("stop").returncode, 0)
        waitFor(lambda: "draining 1 open connections" in server.log(), what="the stop")
        again = self.ctl("stop")
        self.assertEqual(again.returncode, 1, again.stderr)
        self.assertIn("stopping already", again.stderr)
        self.assertEqual(echoRoundTrip(held, b"still served"), b"still served")
        self.assertEqual(server.process.wait(30), 0)

    def fakeControlSocket(self) -> socket.socket:
        """
        A control socket that takes connections but is not a pool.
        """
        directory = tempfile.mkdtemp(prefix="maccept-ctl-fake-")
        self.addCleanup(shutil.rmtree, directory, True)
        self.controlPath = os.path.join(directory, "ctl.sock")
        listening = socket.socket(socket.AF_UNIX)
        self.addCleanup(listening.close)
        listening.bind(self.controlPath)
        listening.listen(4)
        return listening

    def test_ctlNoAnswer(self) -> None:
        """
        A parent that never answers (its reactor blocked: the kernel still
        takes the connection) makes maccept-ctl give up after --timeout:
        exit 2, one line.
        """
        self.fakeControlSocket()
        done = self.ctl("--timeout", "0.5", "status")
        self.assertEqual(done.returncode, 2, done.stderr)
        [line] = done.stderr.strip().splitlines()
        self.assertIn("no answer within 0.5 s", line)

    def test_ctlBadTimeout(self) -> None:
        """
        A --timeout that is not a positive number: exit 2, one line naming it.
        """
        self.controlPath = os.path.join(tempfile.gettempdir(), "maccept-no-such.sock")
        for value in ("-1", "0", "nan", "soon"):
            done = self.ctl("--timeout", value, "status")
            self.assertEqual(done.returncode, 2, done.stderr)
            [line] = done.stderr.strip().splitlines()
            self.assertIn("--timeout", line)

    def test_ctlConnectionClosed(self) -> None:
        """
        A connection closed before the answer: exit 2, one line.
        """
        listening = self.fakeControlSocket()

        def closeFirst() -> None:
            connection, _ = listening.accept()
            connection.close()

        closer = threading.Thread(target=closeFirst)
        closer.start()
        done = self.ctl("status")
        closer.join()
        self.assertEqual(done.returncode, 2, done.stderr)
        [line] = done.stderr.strip().splitlines()
        self.assertIn("the connection closed before the answer", line)

    def test_ctlGarbledAnswer(self) -> None:
        """
        Something that answers, but not as maccept does (garbage, an
        unknown error, a box with a bad value): exit 2, one line, no
        traceback.
        """
        answers = [
            b"\xff" * 70000,
            amp.AmpBox(
                {b"_error": b"1", b"_error_code": b"BOOM", b"_error_description": b"boom"}
            ).serialize(),
            amp.AmpBox({b"_answer": b"1", b"size": b"abc"}).serialize(),
            # Neither an answer nor a question: Twisted logs it as unhandled.
            amp.AmpBox({b"hello": b"abc"}).serialize(),
        ]
        for answer in answers:
            listening = self.fakeControlSocket()

            def answerOnce(listening: socket.socket = listening, answer: bytes = answer) -> None:
                connection, _ = listening.accept()
                # maccept-ctl may hang up in the middle of a garbled answer.
                with connection, contextlib.suppress(OSError):
                    connection.recv(4096)
                    connection.sendall(answer)
                    connection.recv(4096)

            answering = threading.Thread(target=answerOnce)
            answering.start()
            done = self.ctl("--timeout", "5", "scale", "2")
            answering.join()
            self.assertEqual(done.returncode, 2, done.stderr)
            [line] = done.stderr.strip().splitlines()
            self.assertIn("not an answer maccept gives", line)

    def fakeParent(self, answers: list[dict[bytes, bytes] | None]) -> threading.Thread:
        """
        Answer maccept-ctl's commands, in turn, with C{answers} (AMP boxes
        without their C{_answer} tag); C{None} closes the connection.
        """
        listening = self.fakeControlSocket()

        def readBox(connection: socket.socket, buffered: bytearray) -> dict[bytes, bytes]:
            box: dict[bytes, bytes] = {}
            key = None
            while True:
                while len(buffered) < 2 or len(buffered) < 2 + struct.unpack("!H", buffered[:2])[0]:
                    chunk = connection.recv(4096)
                    if not chunk:
                        raise ConnectionResetError("maccept-ctl hung up")
                    buffered += chunk
                size = struct.unpack("!H", buffered[:2])[0]
                field, buffered[:] = bytes(buffered[2 : 2 + size]), buffered[2 + size :]
                if key is None:
                    if not field:
                        return box
                    key = field
                else:
                    box[key], key = field, None

        def answer() -> None:
            connection, _ = listening.accept()
            buffered = bytearray()
            with connection, contextlib.suppress(OSError):
                for reply in answers:
                    asked = readBox(connection, buffered)
                    if reply is None:
                        return
                    box = amp.AmpBox({b"_answer": asked[b"_ask"], **reply})
                    connection.sendall(box.serialize())

        answering = threading.Thread(target=answer)
        answering.start()
        self.addCleanup(answering.join)
        return answering

    def test_ctlReloadWaitEndings(self) -> None:
        """
        C{reload --wait} also returns when the reload will not serve: an
        upgrade dropped it while queued, or the pool stops (exit 1); when
        the parent closes the connection (exit 2); and when the parent is
        of a version that cannot say (exit 1).  One line on stderr each,
        never a traceback.
        """
        status = {b"size": b"1", b"generation": b"1", b"workers": b""}
        cases: list[tuple[list[dict[bytes, bytes] | None], int, str]] = [
            (
                [{b"generation": b"3"}, {**status, b"state": b"running", b"reloadDropped": b"3"}],
                1,
                "dropped before it started: an upgrade (USR2) starts the new code instead",
            ),
            (
                [{b"generation": b"2"}, {**status, b"state": b"stopping"}],
                1,
                "the pool is stopping; generation 2 will not serve",
            ),
            (
                [{b"generation": b"2"}, {**status, b"state": b"reloading"}, None],
                2,
                "the connection closed before the answer",
            ),
            ([{}], 1, "this parent is too old to say how it ends"),
        ]
        for answers, code, why in cases:
            answering = self.fakeParent(answers)
            done = self.ctl("reload", "--wait")
            answering.join()
            self.assertEqual(done.returncode, code, done.stderr)
            [line] = done.stderr.strip().splitlines()
            self.assertIn(why, line)

    def test_controlGarbage(self) -> None:
        """
        Garbage on the control socket closes that connection and is logged;
        the server and its control socket carry on.
        """
        server = self.start("--workers", "1", control=True)
        with socket.socket(socket.AF_UNIX) as bad:
            bad.settimeout(10)
            bad.connect(self.controlPath)
            try:
                bad.sendall(b"\xff\xffnot AMP at all\r\n" * 100)
                data = bad.recv(100)
            except (ConnectionResetError, BrokenPipeError):
                data = b""
            self.assertEqual(data, b"")
        waitFor(lambda: "garbage on the control socket" in server.log(), what="the log line")
        self.assertEqual(self.workerPids(), set(server.workers()))
        with server.connect() as client:
            self.assertEqual(echoRoundTrip(client, b"fine"), b"fine")

    def test_unknownCommand(self) -> None:
        """
        An AMP command the control socket does not know gets an error
        answer naming it; the server carries on.
        """
        server = self.start("--workers", "1", control=True)
        with socket.socket(socket.AF_UNIX) as client:
            client.settimeout(10)
            client.connect(self.controlPath)
            client.sendall(ampBox(_command="Frobnicate", _ask="1"))
            answer = client.recv(4096)
        self.assertIn(b"_error_code", answer)
        self.assertIn(b"UNHANDLED", answer)
        self.assertEqual(self.workerPids(), set(server.workers()))

    def test_scaleWithBadCount(self) -> None:
        """
        A Scale whose count is not a whole number, or is missing, gets an
        error answer saying so, and nothing is logged as critical.
        """
        server = self.start("--workers", "1", control=True)
        for arguments in ({"workers": "abc"}, {"workers": "1.5"}, {}):
            with socket.socket(socket.AF_UNIX) as client:
                client.settimeout(10)
                client.connect(self.controlPath)
                client.sendall(ampBox(_command="Scale", _ask="1", **arguments))
                answer = client.recv(4096)
            self.assertIn(b"workers must be a whole number", answer)
        self.assertNotIn("critical", server.log())
        self.assertNotIn("Traceback", server.log())
        self.assertEqual(self.statusJSON()["size"], 1)

    def test_metricsPortInUse(self) -> None:
        """
        C{--metrics} on a port already taken fails start-up with one line
        naming the option, and no traceback.
        """
        description = f"tcp:{takenPort(self)}:interface=127.0.0.1"
        done = runMaccept(["--listen", LOOPBACK, "--metrics", description])
        self.assertNotEqual(done.returncode, 0)
        self.assertNotIn("Traceback", done.stdout + done.stderr)
        self.assertIn(f"--metrics {description}:", done.stderr)
        self.assertIn("in use", done.stderr)
