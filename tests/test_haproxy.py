"""
Behind a real HAProxy: PROXY protocol v2 from HAProxy shows the protocol
its client's own address, and two maccept hosts (127.0.0.2 and 127.0.0.3)
reloaded one after the other cost the clients going through HAProxy
nothing.  HAProxy checks each host's C{/healthz}.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from tests.load import Churn, stopAll
from tests.server import MacceptServer, alive, echoRoundTrip, freePort, waitFor

HAPROXY = shutil.which("haproxy") or shutil.which("haproxy", path="/usr/sbin:/usr/local/sbin")
METRICS_AT = re.compile(r"--metrics \S+: listening on http://[\d.]+:(\d+)/")

CONFIG = """
global
    maxconn 4096
defaults
    mode tcp
    timeout connect 5s
    timeout client 30s
    timeout server 30s
    retries 3
    option redispatch
frontend clients
    bind 127.0.0.1:{front}
    default_backend maccept
backend maccept
    balance roundrobin
    option httpchk GET /healthz
{servers}
"""
SERVER = (
    "    server {name} {host}:{port} send-proxy-v2 check port {metrics} inter 200ms fall 2 rise 1"
)


class HAProxyTests(SynchronousTestCase):
    def setUp(self) -> None:
        if HAPROXY is None:
            self.skipTest("haproxy is not installed (Debian package haproxy)")

    def maccept(self, host: str, *args: str) -> tuple[MacceptServer, int]:
        server = MacceptServer(
            [
                "--workers",
                "2",
                "--listen",
                f"haproxy:tcp:0:interface={host}",
                "--metrics",
                f"tcp:0:interface={host}",
                *args,
            ]
        )
        self.addCleanup(server.cleanup)
        server.waitReady()
        match = waitFor(lambda: METRICS_AT.search(server.log()), what="the metrics port")
        assert isinstance(match, re.Match)
        return server, int(match.group(1))

    def haproxy(self, backends: list[tuple[str, MacceptServer, int]]) -> int:
        """
        Start HAProxy in front of C{backends}; return its frontend port once
        a round trip through it works.
        """
        front = freePort()
        servers = "\n".join(
            SERVER.format(name=f"m{n}", host=host, port=server.port, metrics=metrics)
            for n, (host, server, metrics) in enumerate(backends)
        )
        directory = tempfile.mkdtemp(prefix="maccept-haproxy-")
        self.addCleanup(shutil.rmtree, directory, True)
        config = Path(directory, "haproxy.cfg")
        config.write_text(CONFIG.format(front=front, servers=servers))
        log = open(Path(directory, "haproxy.log"), "w")  # noqa: SIM115 (closed in cleanup)
        self.addCleanup(log.close)
        assert HAPROXY is not None
        process = subprocess.Popen(
            [HAPROXY, "-f", str(config), "-db"],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        self.addCleanup(self.stopHAProxy, process)

        def roundTrip() -> bool:
            if process.poll() is not None:
                raise AssertionError(Path(directory, "haproxy.log").read_text())
            try:
                with socket.create_connection(("127.0.0.1", front), timeout=5) as client:
                    return echoRoundTrip(client, b"through haproxy").endswith(b"through haproxy")
            except OSError:
                return False

        waitFor(roundTrip, what="HAProxy to pass a round trip")
        return front

    def stopHAProxy(self, process: subprocess.Popen[bytes]) -> None:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()

    def test_clientAddressThroughProxyV2(self) -> None:
        """
        The protocol's C{getPeer()} is the client's own address and port,
        as HAProxy passes them in its PROXY v2 header.
        """
        server, metrics = self.maccept(
            "127.0.0.2", "--protocol", "tests.sample_protocols:peerReporter"
        )
        front = self.haproxy([("127.0.0.2", server, metrics)])
        with socket.create_connection(("127.0.0.1", front), timeout=10) as client:
            host, port = client.getsockname()
            line = b""
            while not line.endswith(b"\n"):
                line += client.recv(1)
        self.assertEqual(line.decode(), f"{host} {port}\n")

    def test_rollingReloadBehindHAProxy(self) -> None:
        """
        Two hosts behind HAProxy are reloaded one after the other while
        clients keep connecting through HAProxy: no client sees an error.
        """
        hosts = []
        for host in ("127.0.0.2", "127.0.0.3"):
            server, metrics = self.maccept(host)
            hosts.append((host, server, metrics))
        front = self.haproxy(hosts)
        loads = [Churn("127.0.0.1", front, limit=60) for _ in range(4)]
        for load in loads:
            load.start()
        self.addCleanup(stopAll, loads)
        time.sleep(0.5)
        for _, server, _ in hosts:
            old = server.workers()
            os.kill(server.pid, signal.SIGHUP)

            def reloaded(s: MacceptServer = server) -> bool:
                return "generation 2 ready" in s.log()

            def oldGone(o: list[int] = old) -> bool:
                return not any(alive(pid) for pid in o)

            waitFor(reloaded, what="the reload")
            waitFor(oldGone, what="the old workers")
        time.sleep(0.5)
        for load in loads:
            load.stop()
        errors = [error for load in loads for error in load.errors]
        self.assertEqual(errors, [])
        self.assertGreater(sum(load.ok for load in loads), 100)
