"""
Upgrading maccept itself with SIGUSR2: a new parent from the code on disk
takes the listening sockets over, the old one drains, no connection is
refused, and the pidfile follows the parent that serves; a new parent that
fails leaves the old one serving.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from maccept.testing import childrenOf
from tests.load import Churn, Stream, stopAll
from tests.server import (
    HERE,
    READY,
    TWISTD,
    MacceptServer,
    alive,
    echoRoundTrip,
    freePort,
    killGroup,
    waitFor,
)
from tests.test_observability import MACCEPT_CTL
from tests.test_tls import selfSignedCertificate

NEW_PARENT = re.compile(r"started a new parent \(pid (\d+)\)")
#: Stand-ins in L{UpgradeTests.start}'s arguments for paths in the test's directory.
CONTROL = "<control socket>"
METRICS_UNIX = "<unix metrics socket>"


def ctl(path: str, *args: str) -> dict[str, Any]:
    """
    Run C{maccept-ctl PATH ARGS} and return its JSON answer.
    """
    done = subprocess.run(
        [MACCEPT_CTL, path, *args], capture_output=True, text=True, timeout=30, check=True
    )
    answer: dict[str, Any] = json.loads(done.stdout)
    return answer


class UpgradeTests(SynchronousTestCase):
    def start(self, *args: str, env: dict[str, str] | None = None) -> MacceptServer:
        directory = tempfile.mkdtemp(prefix="maccept-upgrade-")
        self.addCleanup(shutil.rmtree, directory, True)
        self.pidfile = Path(directory, "maccept.pid")
        self.socketPath = os.path.join(directory, "echo.sock")
        self.controlPath = os.path.join(directory, "ctl.sock")
        self.metricsPath = os.path.join(directory, "m.sock")
        placeholders = {CONTROL: self.controlPath, METRICS_UNIX: f"unix:{self.metricsPath}"}
        args = tuple(placeholders.get(arg, arg) for arg in args)
        server = MacceptServer(
            [
                "--workers",
                "2",
                "--listen",
                "tcp:0:interface=127.0.0.1",
                "--listen",
                f"unix:{self.socketPath}",
                *args,
            ],
            twistdArgs=["--pidfile", str(self.pidfile)],
            env=env,
        )
        self.addCleanup(server.cleanup)
        return server.waitReady()

    def newParent(self, server: MacceptServer) -> int:
        match = waitFor(lambda: NEW_PARENT.search(server.log()), what="the new parent")
        assert isinstance(match, re.Match)
        pid = int(match.group(1))
        self.addCleanup(self.stopNewParent, pid)
        return pid

    def stopNewParent(self, pid: int) -> None:
        if alive(pid):
            os.kill(pid, signal.SIGTERM)
            waitFor(lambda: not alive(pid), what="the new parent to stop")

    def test_upgradeUnderLoad(self) -> None:
        """
        During the upgrade, clients connecting all the time and a stream
        lose nothing; an open connection to an old worker keeps echoing
        until it closes; then the old parent exits 0, the pidfile names the
        new parent, and the new parent serves on the same TCP port and UNIX
        path.
        """
        server = self.start()
        old = server.pid
        self.assertEqual(self.pidfile.read_text().strip(), str(old))
        held = server.connect()
        self.addCleanup(held.close)
        held.sendall(b"before")
        self.assertEqual(held.recv(6), b"before")
        loads: list[Churn | Stream] = [Churn("127.0.0.1", server.port) for _ in range(3)]
        loads.append(Stream("127.0.0.1", server.port))
        for load in loads:
            load.start()
        self.addCleanup(stopAll, loads)
        time.sleep(0.3)
        os.kill(old, signal.SIGUSR2)
        new = self.newParent(server)
        waitFor(lambda: f"old parent (pid {old}) drains" in server.log(), what="the takeover")
        held.sendall(b"during")
        self.assertEqual(held.recv(6), b"during")
        time.sleep(0.5)
        for load in loads:
            load.stop()
        self.assertEqual([e for load in loads for e in load.errors], [])
        self.assertGreater(sum(load.ok for load in loads), 50)
        held.close()
        self.assertEqual(server.process.wait(30), 0)
        self.assertEqual(self.pidfile.read_text().strip(), str(new))
        self.assertFalse(Path(f"{self.pidfile}.oldbin").exists())
        for address in server.addresses:
            with server.connect(address) as client:
                self.assertEqual(echoRoundTrip(client, b"upgraded"), b"upgraded")

    def test_failedUpgradeKeepsServing(self) -> None:
        """
        A new parent whose workers cannot start exits; the old parent logs
        it, takes its pidfile back and keeps serving.
        """
        marker = os.path.join(tempfile.gettempdir(), f"maccept-break-upgrade-{os.getpid()}")
        server = self.start(
            "--protocol",
            "tests.sample_protocols:breakableEcho",
            "--control",
            CONTROL,
            env={"MACCEPT_TEST_BREAK": marker},
        )
        controlPath = self.controlPath
        Path(marker).touch()
        self.addCleanup(os.unlink, marker)
        os.kill(server.pid, signal.SIGUSR2)
        new = self.newParent(server)
        waitFor(lambda: "upgrade failed, keeping this parent" in server.log(), what="the failure")
        waitFor(lambda: not alive(new), what="the new parent to exit")
        # The old parent's line says why, as the new one told it.
        [failed] = [line for line in server.log().splitlines() if "upgrade failed" in line]
        self.assertIn("failed to start: RuntimeError: broken deploy", failed)
        self.assertEqual(self.pidfile.read_text().strip(), str(server.pid))
        self.assertEqual(len(server.workers()), 2)
        with server.connect() as client:
            self.assertEqual(echoRoundTrip(client, b"still old"), b"still old")
        # The new parent that failed left the old one's paths and locks.
        self.assertTrue(os.path.exists(self.socketPath))
        self.assertEqual(os.readlink(controlPath + ".lock"), str(server.pid))
        status = ctl(controlPath, "status", "--json")
        self.assertEqual({w["pid"] for w in status["workers"]}, set(server.workers()))

    def test_stopDuringUpgrade(self) -> None:
        """
        TERM to the parent while the new one starts its workers stops both:
        nothing serves after the stop, the UNIX path is gone, and the pidfile
        was the old parent's until it exited.
        """
        self.stopDuringUpgrade(greeted=True)

    def test_stopAtOnceAfterUpgrade(self) -> None:
        """
        So does a TERM right after USR2, whether or not the new parent has
        greeted the old one yet (before, the stop is taken for the SIGTERM
        with which older code hands over, until the greeting comes).
        """
        self.stopDuringUpgrade(greeted=False)

    def test_groupStopDuringUpgrade(self) -> None:
        """
        TERM to the whole process group (Ctrl-C, systemd) while the new
        parent starts stops both gracefully: the new parent gets it twice
        (from the sender and from the old parent) and kills nothing.
        """
        self.stopDuringUpgrade(greeted=True, group=True)
        self.assertNotIn("second stop request", self.stoppedLog)
        self.assertNotIn("SIGKILL", self.stoppedLog)

    def test_termToOldParentAfterHandOverDrains(self) -> None:
        """
        TERM to the old parent once the new one has taken over (gunicorn's
        USR2, then TERM) is its first stop, not a second that kills: a
        client of an old worker is still served until it closes.
        """
        server = self.start()
        old = server.pid
        held = server.connect()
        self.addCleanup(held.close)
        held.sendall(b"before")
        self.assertEqual(held.recv(6), b"before")
        os.kill(old, signal.SIGUSR2)
        self.newParent(server)
        waitFor(lambda: f"old parent (pid {old}) drains" in server.log(), what="the takeover")
        os.kill(old, signal.SIGTERM)
        waitFor(lambda: "a second request kills" in server.log(), what="the TERM")
        held.sendall(b"after")
        self.assertEqual(held.recv(5), b"after")
        held.close()
        self.assertEqual(server.process.wait(30), 0)
        self.assertNotIn("second stop request", server.log())

    def test_groupHangUpAsTheNewParentStarts(self) -> None:
        """
        A HUP to the whole group (C{systemctl kill -s HUP}, a terminal's
        hang-up) just as the new parent starts, before it has its handlers,
        does not end it: it is started with its signals blocked, and takes
        the HUP once it can (a reload, queued while its pool starts).  The
        old parent ignores it, the upgrade under way.
        """
        server = self.start()
        old = server.pid
        os.kill(old, signal.SIGUSR2)
        new = self.newParent(server)
        os.killpg(old, signal.SIGHUP)
        waitFor(lambda: f"old parent (pid {old}) drains" in server.log(), what="the takeover")
        self.assertTrue(alive(new))
        self.assertNotIn("upgrade failed", server.log())
        with server.connect() as client:
            self.assertEqual(echoRoundTrip(client, b"served"), b"served")

    def stopDuringUpgrade(self, greeted: bool, group: bool = False) -> None:
        marker = os.path.join(tempfile.gettempdir(), f"maccept-slow-upgrade-{os.getpid()}")
        server = self.start(
            "--protocol",
            "tests.sample_protocols:SlowToStartFactory",
            # The new workers wait for their start hook up to this long.
            "--graceful-timeout",
            "2",
            env={"MACCEPT_TEST_SLOW": marker},
        )
        Path(marker).touch()
        self.addCleanup(os.unlink, marker)
        os.kill(server.pid, signal.SIGUSR2)
        new = self.newParent(server)
        if greeted:
            waitFor(lambda: "starts its workers" in server.log(), what="the greeting")
        if group:
            # Once the new parent has its handlers: its workers are started.
            waitFor(lambda: server.log().count("hook: starting slowly") == 2, what="new workers")
            os.killpg(server.pid, signal.SIGTERM)
        else:
            os.kill(server.pid, signal.SIGTERM)
        self.assertEqual(server.process.wait(30), 0)
        waitFor(lambda: not alive(new), what="the new parent to stop")
        self.stoppedLog = server.log()
        self.assertIn("upgrade abandoned", server.log())
        self.assertNotIn("upgrade failed", server.log())
        self.assertFalse(os.path.exists(self.socketPath))
        self.assertFalse(self.pidfile.exists())
        with self.assertRaises(ConnectionRefusedError):
            server.connect().close()

    def test_oldParentAnswersUntilHandOver(self) -> None:
        """
        While the new parent starts its workers, only the old one answers
        on the metrics port, though both hold it: /healthz does not flap to
        503, nor the workers ready to 0, during a zero-downtime upgrade.  It
        refuses to scale meanwhile (the new parent was told the size), and to
        reload (the new parent imports the code anew).
        """
        marker = os.path.join(tempfile.gettempdir(), f"maccept-slow-metrics-{os.getpid()}")
        port = freePort()
        server = self.start(
            *("--protocol", "tests.sample_protocols:SlowToStartFactory"),
            *("--graceful-timeout", "2", "--metrics", f"tcp:{port}:interface=127.0.0.1"),
            *("--control", CONTROL),
            env={"MACCEPT_TEST_SLOW": marker},
        )
        Path(marker).touch()
        self.addCleanup(os.unlink, marker)
        os.kill(server.pid, signal.SIGUSR2)
        self.newParent(server)
        waitFor(lambda: "starts its workers" in server.log(), what="the greeting")

        def adopted() -> bool:
            return "QuietSite starting on" in server.log().split("new parent")[-1]

        waitFor(adopted, what="the new parent to adopt the metrics port")
        for _ in range(20):
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=10) as answer:
                self.assertEqual(answer.status, 200)
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as answer:
                self.assertIn(b'maccept_workers{state="ready"} 2.0', answer.read())
        scaled = subprocess.run(
            [MACCEPT_CTL, self.controlPath, "scale", "4"], capture_output=True, text=True
        )
        self.assertEqual(scaled.returncode, 1, scaled.stderr)
        self.assertIn("an upgrade (USR2) is under way", scaled.stderr)
        reloaded = subprocess.run(
            [MACCEPT_CTL, self.controlPath, "reload"], capture_output=True, text=True
        )
        self.assertEqual(reloaded.returncode, 1, reloaded.stderr)
        self.assertIn("cannot reload: an upgrade (USR2) is under way", reloaded.stderr)
        self.assertNotIn("reloading: starting generation", server.log())

    def test_scaledSizeFollows(self) -> None:
        """
        A pool scaled since start (TTIN) keeps its size across USR2, as it
        does across HUP: the new parent does not fall back to --workers.
        """
        server = self.start()
        os.kill(server.pid, signal.SIGTTIN)
        waitFor(lambda: len(server.workers()) == 3, what="a third worker")
        os.kill(server.pid, signal.SIGUSR2)
        new = self.newParent(server)
        self.assertEqual(server.process.wait(30), 0)
        waitFor(lambda: len(childrenOf(new)) == 3, what="the new parent's 3 workers")

    def test_metricsAndControlFollow(self) -> None:
        """
        A fixed C{--metrics} port and the C{--control} socket are handed
        over too: once the old parent has exited, the new one answers on
        both, with its own workers, and removes the control socket's path
        when it stops.
        """
        port = freePort()
        server = self.start("--metrics", f"tcp:{port}:interface=127.0.0.1", "--control", CONTROL)
        controlPath = self.controlPath
        os.kill(server.pid, signal.SIGUSR2)
        new = self.newParent(server)
        self.assertEqual(server.process.wait(30), 0)
        self.assertNotIn("cannot listen", server.log())
        status = ctl(controlPath, "status", "--json")
        self.assertEqual({w["pid"] for w in status["workers"]}, set(childrenOf(new)))
        # The lock names the new parent, so that no other start takes the path.
        self.assertEqual(os.readlink(controlPath + ".lock"), str(new))
        url = f"http://127.0.0.1:{port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as response:
            self.assertIn(b"maccept_workers", response.read())
        self.stopNewParent(new)
        self.assertFalse(os.path.exists(controlPath))
        self.assertFalse(os.path.lexists(controlPath + ".lock"))

    def test_tlsMetricsStayTLS(self) -> None:
        """
        An C{ssl:} metrics endpoint is still TLS in the new parent, which
        adopts the bare socket: it serves HTTPS, and plain HTTP gets no page.
        """
        directory = Path(tempfile.mkdtemp(prefix="maccept-upgrade-tls-"))
        self.addCleanup(shutil.rmtree, directory, True)
        key, certificate = selfSignedCertificate(directory)
        port = freePort()
        description = f"ssl:{port}:interface=127.0.0.1:privateKey={key}:certKey={certificate}"
        server = self.start("--metrics", description)
        self.assertIn(f"listening on https://127.0.0.1:{port}/", server.log())
        os.kill(server.pid, signal.SIGUSR2)
        self.newParent(server)
        self.assertEqual(server.process.wait(30), 0)
        context = ssl.create_default_context(cafile=str(certificate))
        context.check_hostname = False
        url = f"https://127.0.0.1:{port}/metrics"
        with urllib.request.urlopen(url, timeout=10, context=context) as response:
            self.assertIn(b"maccept_workers", response.read())
        with self.assertRaises((OSError, http.client.HTTPException)):
            urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read()

    def test_unixMetricsRemovedAfterUpgrade(self) -> None:
        """
        A UNIX --metrics socket is handed over, and the new parent removes
        its path and lock when it stops, so that the next start can bind.
        """
        server = self.start("--metrics", METRICS_UNIX)
        metricsPath = self.metricsPath
        os.kill(server.pid, signal.SIGUSR2)
        new = self.newParent(server)
        self.assertEqual(server.process.wait(30), 0)
        self.assertTrue(os.path.exists(metricsPath))
        self.stopNewParent(new)
        self.assertFalse(os.path.exists(metricsPath))
        self.assertFalse(os.path.lexists(metricsPath + ".lock"))


class DaemonUpgradeTests(SynchronousTestCase):
    def test_daemonUpgrade(self) -> None:
        """
        Under twistd without C{-n} (a daemon), the new parent takes over as
        it does in the foreground: the pidfile names it, the UNIX socket's
        path stays, both listeners serve; stopped, it removes both.
        """
        directory = Path(tempfile.mkdtemp(prefix="maccept-daemon-"))
        self.addCleanup(shutil.rmtree, directory, True)
        pidfile, logfile = directory / "maccept.pid", directory / "maccept.log"
        socketPath, controlPath = directory / "echo.sock", directory / "ctl.sock"
        started = subprocess.run(
            [
                TWISTD,
                f"--pidfile={pidfile}",
                f"--logfile={logfile}",
                "maccept",
                *("--workers", "1", "--listen", "tcp:0:interface=127.0.0.1"),
                *("--listen", f"unix:{socketPath}", "--control", str(controlPath)),
            ],
            cwd=directory,
            env={**os.environ, "PYTHONPATH": str(HERE.parent)},
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        self.assertEqual(started.returncode, 0, started.stderr)
        old = int(waitFor(lambda: pidfile.exists() and pidfile.read_text().strip()))
        # The daemon, its workers and any new parent share one process group.
        self.addCleanup(killGroup, os.getpgid(old))
        log = lambda: logfile.read_text(errors="replace")  # noqa: E731
        ready = waitFor(lambda: READY.search(log()), what="the daemon's workers")
        assert ready is not None
        tcpPort = int(ready.group(2).split()[0].rsplit(":", 1)[1])

        # twistd made the lock before daemonising; the daemon took it.
        self.assertEqual(os.readlink(f"{controlPath}.lock"), str(old))
        held = socket.create_connection(("127.0.0.1", tcpPort), timeout=10)
        self.addCleanup(held.close)
        self.assertEqual(echoOnce(held, b"before"), b"before")

        os.kill(old, signal.SIGUSR2)
        waitFor(lambda: f"old parent (pid {old}) drains" in log(), what="the takeover")
        # The old parent drains: its open connection is still served.
        self.assertEqual(echoOnce(held, b"during"), b"during")
        held.close()
        waitFor(lambda: not alive(old), what="the old parent to exit")
        new = int(pidfile.read_text().strip())
        self.assertNotEqual(new, old)
        # Both parents wrote the log file, each at its end: neither's lines
        # are written over by the other's.
        text = log()
        self.assertNotIn("\0", text)
        self.assertIn(f"old parent (pid {old}) drains", text)
        self.assertIn(f"upgrade: started a new parent (pid {new})", text)
        self.assertIn("Server Shut Down.", text)
        self.assertEqual(
            [line for line in text.splitlines() if not re.match(r"\d{4}-\d\d-\d\dT", line)], []
        )
        for line in ("reactor class", "started worker 1", "all 1 workers ready"):
            # Once from each parent.
            self.assertEqual(text.count(line), 2, line)
        self.assertTrue(alive(new))
        self.assertNotIn("upgrade failed", log())
        with socket.create_connection(("127.0.0.1", tcpPort), timeout=10) as client:
            self.assertEqual(echoRoundTrip(client, b"tcp"), b"tcp")
        with socket.socket(socket.AF_UNIX) as client:
            client.settimeout(10)
            client.connect(str(socketPath))
            self.assertEqual(echoRoundTrip(client, b"unix"), b"unix")

        self.assertEqual(os.readlink(f"{controlPath}.lock"), str(new))
        status = ctl(str(controlPath), "status", "--json")
        self.assertEqual({w["pid"] for w in status["workers"]}, set(childrenOf(new)))

        os.kill(new, signal.SIGTERM)
        waitFor(lambda: not alive(new), what="the new parent to stop")
        self.assertFalse(pidfile.exists())
        self.assertFalse(socketPath.exists())
        self.assertFalse(controlPath.exists())
        self.assertEqual(sorted(p.name for p in directory.iterdir()), ["maccept.log"])


def echoOnce(client: socket.socket, payload: bytes) -> bytes:
    """
    Send C{payload} on an open connection and read as many bytes back.
    """
    client.sendall(payload)
    received = b""
    while len(received) < len(payload):
        chunk = client.recv(len(payload) - len(received))
        if not chunk:
            break
        received += chunk
    return received


class RunDirectoryTests(SynchronousTestCase):
    def test_rundir(self) -> None:
        """
        twistd's C{--rundir} changes into another directory once the command
        line is checked.  A relative entry of C{PYTHONPATH} and a relative
        path in a C{--protocol-option} mean in the workers, and in a new
        parent (USR2), what they meant where the command was given.
        """
        top, rundir = (
            tempfile.mkdtemp(prefix="maccept-top-"),
            tempfile.mkdtemp(prefix="maccept-run-"),
        )
        self.addCleanup(shutil.rmtree, top, True)
        self.addCleanup(shutil.rmtree, rundir, True)
        Path(top, "answer.txt").write_text("read where the command was given")
        Path(top, "answering.py").write_text(
            "import os\n"
            "from twisted.internet.protocol import Factory, Protocol\n"
            "from twisted.python import usage\n"
            "class Options(usage.Options):\n"
            "    optParameters = [['file', None, None, 'what to answer']]\n"
            "    def postOptions(self):\n"
            "        if not os.path.isfile(self['file']):\n"
            "            raise usage.UsageError(f\"file: no such file: {self['file']}\")\n"
            "def factory(options):\n"
            "    with open(options['file'], 'rb') as f:\n"
            "        answer = f.read()\n"
            "    class Answer(Protocol):\n"
            "        def dataReceived(self, data):\n"
            "            self.transport.write(answer)\n"
            "            self.transport.loseConnection()\n"
            "    return Factory.forProtocol(Answer)\n"
        )
        Path(top, "twisted", "plugins").mkdir(parents=True)
        Path(top, "twisted", "plugins", "answering_plugin.py").write_text(
            "from maccept._plugins import ProtocolPlugin\n"
            "answering = ProtocolPlugin('answering', 'answers a file',"
            " 'answering:factory', options='answering:Options')\n"
        )
        server = MacceptServer(
            [
                *("--workers", "1", "--listen", "tcp:0:interface=127.0.0.1"),
                *("--protocol", "answering", "--protocol-option", "file=answer.txt"),
            ],
            twistdArgs=["--rundir", rundir],
            env={"PYTHONPATH": "."},
            cwd=top,
        )
        self.addCleanup(server.cleanup)
        server.waitReady()

        def answer() -> bytes:
            with server.connect() as client:
                client.settimeout(10)
                client.sendall(b"?")
                return client.recv(100)

        self.assertEqual(answer(), b"read where the command was given")
        os.kill(server.pid, signal.SIGUSR2)
        waitFor(lambda: "drains and exits" in server.log(), what="the new parent to serve")
        self.assertEqual(answer(), b"read where the command was given")
