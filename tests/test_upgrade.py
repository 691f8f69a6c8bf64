"""
Upgrading maccept itself with SIGUSR2: a new parent from the code on disk
takes the listening sockets over, the old one drains, no connection is
refused, and the pidfile follows the parent that serves; a new parent that
fails leaves the old one serving.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import tempfile
import time
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from tests.load import Churn, Stream
from tests.server import MacceptServer, alive, echoRoundTrip, waitFor

NEW_PARENT = re.compile(r"started a new parent \(pid (\d+)\)")


class UpgradeTests(SynchronousTestCase):
    def start(self, *args: str, env: dict[str, str] | None = None) -> MacceptServer:
        directory = tempfile.mkdtemp(prefix="maccept-upgrade-")
        self.addCleanup(shutil.rmtree, directory, True)
        self.pidfile = Path(directory, "maccept.pid")
        self.socketPath = os.path.join(directory, "echo.sock")
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
        loads = [Churn("127.0.0.1", server.port) for _ in range(3)]
        loads.append(Stream("127.0.0.1", server.port))
        for load in loads:
            load.start()
        self.addCleanup(lambda: [load.stop() for load in loads])
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
            "--protocol", "tests.sample_protocols:breakableEcho", env={"MACCEPT_TEST_BREAK": marker}
        )
        Path(marker).touch()
        self.addCleanup(os.unlink, marker)
        os.kill(server.pid, signal.SIGUSR2)
        new = self.newParent(server)
        waitFor(lambda: "upgrade failed, keeping this parent" in server.log(), what="the failure")
        waitFor(lambda: not alive(new), what="the new parent to exit")
        self.assertEqual(self.pidfile.read_text().strip(), str(server.pid))
        self.assertEqual(len(server.workers()), 2)
        with server.connect() as client:
            self.assertEqual(echoRoundTrip(client, b"still old"), b"still old")
