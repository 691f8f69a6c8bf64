"""
The real server against real sockets: workers accept and echo, the parent
never does.
"""

from __future__ import annotations

import asyncio
import os
import random
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import time

from twisted.trial.unittest import SynchronousTestCase

from tests.server import (
    MacceptServer,
    closeAll,
    echoRoundTrip,
    serverSideInodes,
    socketInodes,
)


def startServer(test: SynchronousTestCase, *args: str) -> MacceptServer:
    server = MacceptServer(args)
    test.addCleanup(server.stop)
    return server.waitReady()


async def _echoClient(host: str, port: int, seed: int) -> bool:
    rng = random.Random(seed)
    reader, writer = await asyncio.open_connection(host, port)
    sent = bytearray()
    for _ in range(rng.randint(1, 8)):
        chunk = rng.randbytes(rng.randint(1, 20000))
        writer.write(chunk)
        sent += chunk
        await writer.drain()
    writer.write_eof()
    received = await reader.read(-1)
    writer.close()
    await writer.wait_closed()
    return bytes(received) == bytes(sent)


async def _manyClients(host: str, port: int, count: int) -> list[bool]:
    return await asyncio.gather(*(_echoClient(host, port, seed) for seed in range(count)))


class EchoTests(SynchronousTestCase):
    def test_concurrentClientsByteExact(self) -> None:
        """
        120 concurrent clients sending random chunks each get back exactly
        the bytes they sent.
        """
        server = startServer(self, "--workers", "3", "--listen", "tcp:0:interface=127.0.0.1")
        results = asyncio.run(_manyClients("127.0.0.1", server.port, 120))
        self.assertEqual(results.count(True), 120)

    def test_everyWorkerReactor(self) -> None:
        """
        Workers on Twisted's own epoll reactor and on its asyncio reactor
        serve the same byte-exact echo as on the default one.
        """
        for name in ("epoll", "asyncio"):
            server = startServer(
                self,
                "--workers",
                "2",
                "--worker-reactor",
                name,
                "--listen",
                "tcp:0:interface=127.0.0.1",
            )
            results = asyncio.run(_manyClients("127.0.0.1", server.port, 20))
            self.assertEqual(results.count(True), 20, name)
            self.assertEqual(server.stop(), 0, name)

    def test_workersServeEveryConnectionParentNone(self) -> None:
        """
        Each of 100 open connections is held by a worker process and none
        by the parent: the parent never accepts.
        """
        server = startServer(self, "--workers", "4", "--listen", "tcp:0:interface=127.0.0.1")
        clients = [server.connect() for _ in range(100)]
        self.addCleanup(closeAll, clients)
        for c in clients:
            c.sendall(b"x")
            self.assertEqual(c.recv(1), b"x")
        workers = server.workers()
        self.assertEqual(len(workers), 4)
        owners = {pid: socketInodes(pid) for pid in [server.pid, *workers]}
        serverInodes = serverSideInodes(server.port)
        for client in clients:
            inode = serverInodes[client.getsockname()[1]]
            holders = [pid for pid, inodes in owners.items() if inode in inodes]
            self.assertEqual(len(holders), 1, f"connection held by {holders}")
            self.assertIn(holders[0], workers)
            self.assertNotEqual(holders[0], server.pid)

    def test_startingDirectoryShadowsNothing(self) -> None:
        """
        A C{maccept/} package in the directory maccept was started from (a
        checkout not installed) is not what the workers import: they import
        what the parent does, as C{-m} alone would not have them.
        """
        directory = tempfile.mkdtemp(prefix="maccept-shadow-")
        self.addCleanup(shutil.rmtree, directory, True)
        os.mkdir(os.path.join(directory, "maccept"))
        with open(os.path.join(directory, "maccept", "__init__.py"), "w") as shadow:
            shadow.write("raise ImportError('the shadow package was imported')\n")
        server = MacceptServer(
            ["--workers", "2", "--listen", "tcp:0:interface=127.0.0.1"], cwd=directory
        )
        self.addCleanup(server.cleanup)
        server.waitReady()
        with server.connect() as s:
            self.assertEqual(echoRoundTrip(s, b"the real one\n"), b"the real one\n")
        self.assertNotIn("shadow package", server.log())
        self.assertEqual(server.stop(), 0)

    def test_protocolBesideTheRunner(self) -> None:
        """
        Started as C{python -m twisted maccept} from the directory of the
        protocol's module, the parent finds it on its path (the current
        directory, from C{-m}), and so do the workers.
        """
        directory = tempfile.mkdtemp(prefix="maccept-beside-")
        self.addCleanup(shutil.rmtree, directory, True)
        with open(os.path.join(directory, "shoutbeside.py"), "w") as module:
            module.write(
                "from twisted.internet.protocol import Factory, Protocol\n"
                "class Shout(Protocol):\n"
                "    def dataReceived(self, data):\n"
                "        self.transport.write(data.upper())\n"
                "factory = Factory.forProtocol(Shout)\n"
            )
        server = MacceptServer(
            [
                *("--workers", "2", "--listen", "tcp:0:interface=127.0.0.1"),
                *("--protocol", "shoutbeside:factory"),
            ],
            env={"PYTHONPATH": ""},
            cwd=directory,
            runner=(sys.executable, "-m", "twisted", "--log-format", "text"),
        )
        self.addCleanup(server.cleanup)
        server.waitReady()
        for _ in range(4):
            with server.connect() as s:
                self.assertEqual(echoRoundTrip(s, b"beside\n"), b"BESIDE\n")
        self.assertEqual(server.stop(), 0)

    def test_unixAndTcpTogether(self) -> None:
        """
        With two --listen options every worker accepts on both sockets; the
        UNIX socket path is gone once the server stops.
        """
        path = os.path.join(tempfile.mkdtemp(), "echo.sock")
        server = MacceptServer(
            ["--workers", "2", "--listen", "tcp:0:interface=127.0.0.1", "--listen", f"unix:{path}"]
        )
        self.addCleanup(server.cleanup)
        server.waitReady()
        self.assertEqual(server.addresses[1], path)
        for address in server.addresses:
            with server.connect(address) as s:
                self.assertEqual(echoRoundTrip(s, b"both ways\n" * 100), b"both ways\n" * 100)
        self.assertEqual(server.stop(), 0)
        self.assertFalse(os.path.exists(path))

    def test_unixModeAndBacklogKept(self) -> None:
        """
        The mode and backlog a unix: description asks for are what the socket
        has once workers adopted it (Twisted's own adoption would chmod it
        to 0666 and listen again with a backlog of 50).
        """
        path = os.path.join(tempfile.mkdtemp(), "private.sock")
        server = startServer(
            self, "--workers", "2", "--listen", f"unix:{path}:mode=600:backlog=321"
        )
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o600)
        listening = subprocess.run(
            ["ss", "-xlnH", "src", path], capture_output=True, text=True, check=True
        ).stdout.split()
        self.assertEqual(listening[:4], ["u_str", "LISTEN", "0", "321"])
        with server.connect(path) as client:
            self.assertEqual(echoRoundTrip(client, b"private"), b"private")

    def test_ipv6(self) -> None:
        """
        A tcp6 listener on ::1 serves IPv6 clients.
        """
        try:
            socket.create_server(("::1", 0), family=socket.AF_INET6).close()
        except OSError:
            self.skipTest("no ::1 on this machine")
        server = startServer(self, "--workers", "2", "--listen", "tcp6:0:interface=\\:\\:1")
        self.assertTrue(server.addresses[0].startswith("[::1]:"))
        with socket.create_connection(("::1", server.port), timeout=10) as client:
            self.assertEqual(echoRoundTrip(client, b"over IPv6"), b"over IPv6")

    def test_backpressure(self) -> None:
        """
        A client that sends without reading fills the buffers and then
        blocks: the worker stops reading from it instead of buffering, so
        its memory grows by far less than 32 MiB; everything sent still
        comes back byte-exact.
        """
        server = startServer(self, "--workers", "1", "--listen", "tcp:0:interface=127.0.0.1")
        [worker] = server.workers()
        before = _rss(worker)
        sock = server.connect()
        sock.setblocking(False)
        block = bytes(range(256)) * 4096  # 1 MiB
        sent = 0
        stalls = 0
        while sent < 512 * 1024 * 1024 and stalls < 40:
            try:
                sent += sock.send(block[sent % len(block) :] or block)
                stalls = 0
            except BlockingIOError:
                stalls += 1
                time.sleep(0.025)
        grown = _rss(worker) - before
        self.assertLess(sent, 512 * 1024 * 1024, "the worker never pushed back")
        self.assertLess(grown, 32 * 1024 * 1024)
        sock.setblocking(True)
        sock.settimeout(30)
        received = bytearray()
        sock.shutdown(socket.SHUT_WR)
        while True:
            data = sock.recv(1 << 20)
            if not data:
                break
            received += data
        sock.close()
        self.assertEqual(len(received), sent)
        expected = (block * (sent // len(block) + 1))[:sent]
        self.assertEqual(bytes(received), expected)


def _rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no RSS for {pid}")
