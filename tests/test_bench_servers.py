"""
Pieces of the benchmark's competitors and measurements that can be checked
without a load: the sockets of the C{SO_REUSEPORT} recipe, reading the load
generator's progress lines, and counting a burst's connections.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

from twisted.trial.unittest import SynchronousTestCase

from tests.server import closeAll

sys.path.append(str(Path(__file__).resolve().parent.parent / "benchmarks"))

import _loadgen
import _report
import run as harness
import servers


class ReusePortTests(SynchronousTestCase):
    def test_socketPerWorker(self) -> None:
        """
        Each worker gets a listening socket of its own on the one port, and
        a connection to the port reaches one of them.
        """
        port = servers.freePort()
        sockets = servers._reusePortSockets(port, 3, 16)
        self.addCleanup(closeAll, sockets)
        self.assertEqual(len({s.fileno() for s in sockets}), 3)
        self.assertEqual({s.getsockname() for s in sockets}, {(servers.HOST, port)})
        with socket.create_connection((servers.HOST, port), timeout=5):
            for s in sockets:
                s.setblocking(True)
                s.settimeout(0.2)
            accepted = []
            for s in sockets:
                with contextlib.suppress(TimeoutError):
                    accepted.append(s.accept()[0])
            self.assertEqual(len(accepted), 1)
            accepted[0].close()


class BurstLinesTests(SynchronousTestCase):
    def test_linesWrittenTogether(self) -> None:
        """
        The harness sees the client's second line at once even when both
        came in one write (it once sat in the pipe's buffer, unseen by
        select, until the client exited and closed the connections).
        """
        background = object.__new__(_loadgen.Background)
        background.load = SimpleNamespace(timeout=30.0, command=lambda: ["sh"])  # type: ignore[assignment]
        background._pending = b""
        background.process = subprocess.Popen(
            ["sh", "-c", "printf '# open 3\\n# served 2\\n' >&2; exec sleep 30"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.addCleanup(background.process.wait)
        self.addCleanup(background.process.kill)
        self.assertEqual(background.waitOpen(), 3)
        self.assertEqual(background.waitServed(), 2)
        self.assertIsNone(background.process.poll())


class CountConnectionsTests(SynchronousTestCase):
    def test_countsEveryWorkersConnections(self) -> None:
        """
        The count is each process's established connections to the port;
        a count short of what the client saw served is read again until
        the limit.
        """
        with socket.create_server((servers.HOST, 0)) as listener:
            port = listener.getsockname()[1]
            clients = [socket.create_connection((servers.HOST, port)) for _ in range(3)]
            accepted = [listener.accept()[0] for _ in clients]
            self.addCleanup(closeAll, [*clients, *accepted])
            pid = os.getpid()
            self.assertEqual(harness.countConnections(port, [pid], 3, 5.0), [3])
            self.assertEqual(harness.countConnections(port, [pid], 4, 0.05), [3])


class AcceptCountersTests(SynchronousTestCase):
    def test_readFromARealServer(self) -> None:
        """
        A maccept server started with a metrics port reports its accept
        path's counters: the connections it accepted, and the pauses and
        empty wake-ups counted beside them.
        """
        spec = servers.ServerSpec("maccept", 2, servers.freePort(), metricsPort=servers.freePort())
        self.assertIn(f"tcp:{spec.metricsPort}:interface={servers.HOST}", spec.command())
        log = Path(tempfile.mkdtemp(prefix="maccept-bench-")) / "server.log"
        self.addCleanup(shutil.rmtree, log.parent, True)
        server = servers.RunningServer(spec, set(os.sched_getaffinity(0)), log)
        server.start()
        self.addCleanup(server.stop)
        for _ in range(3):
            with socket.create_connection((servers.HOST, spec.port), timeout=10) as client:
                client.sendall(b"ping")
                self.assertEqual(client.recv(4), b"ping")
        counters = harness.waitUntil(lambda: server.acceptCounters().get("accepted") == 3, 30)
        self.assertIsNotNone(counters, "the workers never reported 3 connections")
        self.assertEqual(
            set(server.acceptCounters()),
            {"accepted", "balance_pauses", "empty_wakeups", "batches"},
        )

    def test_olderServerLacksSome(self) -> None:
        """
        A page from a maccept that lacks a counter gives the others.
        """
        page = (
            "# TYPE maccept_connections_accepted counter\n"
            "maccept_connections_accepted_total 12.0\n"
            "# TYPE maccept_accept_pauses counter\n"
            'maccept_accept_pauses_total{reason="balance"} 3.0\n'
            'maccept_accept_pauses_total{reason="max_concurrent"} 1.0\n'
        )
        self.assertEqual(servers.acceptCounters(page), {"accepted": 12.0, "balance_pauses": 3.0})

    def test_reportedPerThousand(self) -> None:
        """
        The report gives pauses and empty wake-ups per 1000 connections
        accepted in the window, connections per accept batch, and a dash
        where nothing was counted.
        """
        counts = {
            "accepted": 20000.0,
            "balance_pauses": 300.0,
            "empty_wakeups": 50.0,
            "batches": 8000.0,
        }
        self.assertEqual(_report._acceptPath({"accept_path": counts}), "15.0 / 2.5 / 2.5")
        self.assertEqual(_report._acceptPath({"accept_path": {"accepted": 10.0}}), "- / - / -")
        self.assertEqual(_report._acceptPath({"rps": 1.0}), "-")

    def test_unreadablePageIsNoCounters(self) -> None:
        """
        A /metrics page that cannot be read (nothing listens there, or the
        parent is too slow) gives no counters rather than ending the run.
        """
        spec = servers.ServerSpec("maccept", 1, servers.freePort(), metricsPort=servers.freePort())
        server = servers.RunningServer(spec, set(), Path(tempfile.gettempdir()) / "unused.log")
        stderr = io.StringIO()
        self.patch(sys, "stderr", stderr)
        self.assertEqual(server.acceptCounters(), {})
        self.assertIn("no accept-path counters", stderr.getvalue())
