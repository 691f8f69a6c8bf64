"""
C{Type=notify}: the parent tells systemd READY, RELOADING, STOPPING and
watchdog keep-alives, checked on a notify socket the test listens on, as
systemd would.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from maccept._states import PoolState
from maccept._systemd import MIN_WATCHDOG_PING, SystemdNotifier
from maccept.testing import childrenOf
from tests.server import (
    HERE,
    TWISTD,
    MacceptServer,
    alive,
    echoRoundTrip,
    killGroup,
    runMaccept,
    waitFor,
)


class NotifySocket:
    """
    A datagram socket standing in for systemd's.
    """

    def __init__(self, test: SynchronousTestCase) -> None:
        directory = tempfile.mkdtemp(prefix="maccept-notify-")
        test.addCleanup(shutil.rmtree, directory, True)
        self.path = os.path.join(directory, "notify")
        self.socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.socket.bind(self.path)
        self.socket.settimeout(30)
        test.addCleanup(self.socket.close)

    def next(self) -> dict[str, str]:
        message = self.socket.recv(4096).decode()
        return dict(line.split("=", 1) for line in message.splitlines())

    def until(self, key: str) -> dict[str, str]:
        """
        Read messages until one carries C{key} (skipping keep-alives).
        """
        while True:
            message = self.next()
            if key in message:
                return message

    def queued(self) -> list[dict[str, str]]:
        """
        The messages already sent and not read yet.
        """
        self.socket.setblocking(False)
        messages = []
        try:
            while True:
                messages.append(self.next())
        except BlockingIOError:
            return messages
        finally:
            self.socket.settimeout(30)


class FakePool:
    def __init__(self) -> None:
        self.size = 3
        self.state = PoolState.RUNNING
        self.reloadFailure: str | None = None
        self.stateObservers: list[object] = []
        self.sizeObservers: list[Any] = []
        self.stopObservers: list[Any] = []


class NotifierTests(SynchronousTestCase):
    def test_notInSystemd(self) -> None:
        """
        Without C{NOTIFY_SOCKET} there is no notifier.
        """
        self.assertIsNone(SystemdNotifier.fromEnvironment(Clock(), {}))

    def test_watchdogOnlyForThisProcess(self) -> None:
        """
        The watchdog runs when C{WATCHDOG_USEC} is set, at half its period,
        unless C{WATCHDOG_PID} names another process.
        """
        notify = NotifySocket(self)
        clock = Clock()
        other = {"NOTIFY_SOCKET": notify.path, "WATCHDOG_USEC": "4000000", "WATCHDOG_PID": "1"}
        notifier = SystemdNotifier.fromEnvironment(clock, other)
        assert notifier is not None
        self.addCleanup(notifier.close)
        self.assertIsNone(notifier.watchdog)
        mine = {**other, "WATCHDOG_PID": str(os.getpid())}
        notifier = SystemdNotifier.fromEnvironment(clock, mine)
        assert notifier is not None
        self.addCleanup(notifier.close)
        self.assertEqual(notify.next(), {"WATCHDOG": "1"})
        clock.advance(2)
        self.assertEqual(notify.next(), {"WATCHDOG": "1"})

    def test_watchdogFloor(self) -> None:
        """
        A tiny C{WATCHDOG_USEC} does not make the parent ping without end:
        pings come at most every C{MIN_WATCHDOG_PING} seconds.
        """
        notify = NotifySocket(self)
        clock = Clock()
        environ = {"NOTIFY_SOCKET": notify.path, "WATCHDOG_USEC": "1"}
        notifier = SystemdNotifier.fromEnvironment(clock, environ)
        assert notifier is not None
        self.addCleanup(notifier.close)
        assert notifier.watchdog is not None
        self.assertEqual(notifier.watchdog.interval, MIN_WATCHDOG_PING)

    def test_states(self) -> None:
        """
        Running is READY, reloading is RELOADING with the monotonic time,
        stopping is STOPPING.
        """
        notify = NotifySocket(self)
        notifier = SystemdNotifier(Clock(), notify.path)
        self.addCleanup(notifier.close)
        notifier.follow(FakePool())  # type: ignore[arg-type]
        notifier.poolChanged(PoolState.RUNNING)
        self.assertEqual(notify.next()["READY"], "1")
        notifier.poolChanged(PoolState.RELOADING)
        reloading = notify.next()
        self.assertEqual(reloading["RELOADING"], "1")
        self.assertTrue(reloading["MONOTONIC_USEC"].isdigit())
        notifier.poolChanged(PoolState.STOPPING)
        self.assertEqual(notify.next()["STOPPING"], "1")

    def test_statusFollowsScalingAndFailedReloads(self) -> None:
        """
        STATUS= follows the pool's size when it is scaled, and says that
        the last reload failed (with why) until one succeeds: a failed
        reload must not read as a success in C{systemctl status}.
        """
        notify = NotifySocket(self)
        notifier = SystemdNotifier(Clock(), notify.path)
        self.addCleanup(notifier.close)
        pool = FakePool()
        notifier.follow(pool)  # type: ignore[arg-type]
        pool.size = 5
        for observer in pool.sizeObservers:
            observer(5)
        self.assertEqual(notify.next(), {"STATUS": "serving with 5 workers"})
        pool.reloadFailure = "worker 1 failed to start: exit code 2"
        notifier.poolChanged(PoolState.RUNNING)
        self.assertEqual(
            notify.next()["STATUS"],
            "serving with 5 workers; the last reload failed: worker 1 failed to start: exit code 2",
        )

    def test_stopAnnounced(self) -> None:
        """
        A stop announced for after C{--stop-delay} is STOPPING at once.
        """
        notify = NotifySocket(self)
        notifier = SystemdNotifier(Clock(), notify.path)
        self.addCleanup(notifier.close)
        pool = FakePool()
        notifier.follow(pool)  # type: ignore[arg-type]
        for observer in pool.stopObservers:
            observer()
        self.assertEqual(notify.next()["STOPPING"], "1")

    def test_statusOneLine(self) -> None:
        """
        A failed reload's reason goes into STATUS= on one line: a line
        break would start another assignment (MAINPID=, STOPPING=).
        """
        notify = NotifySocket(self)
        notifier = SystemdNotifier(Clock(), notify.path)
        self.addCleanup(notifier.close)
        pool = FakePool()
        pool.reloadFailure = "ValueError: config invalid\nSTOPPING=1"
        notifier.follow(pool)  # type: ignore[arg-type]
        notifier.poolChanged(PoolState.RUNNING)
        message = notify.next()
        self.assertNotIn("STOPPING", message)
        self.assertTrue(message["STATUS"].endswith("config invalid STOPPING=1"))

    def test_silent(self) -> None:
        """
        A parent that does not speak for the service (it handed over to a
        new one, or is a new one not yet serving) says nothing of its
        pool: systemd would take STOPPING=1 for the service's.
        """
        notify = NotifySocket(self)
        notifier = SystemdNotifier(Clock(), notify.path)
        self.addCleanup(notifier.close)
        notifier.follow(FakePool(), silent=lambda: True)  # type: ignore[arg-type]
        for state in (PoolState.RUNNING, PoolState.RELOADING, PoolState.STOPPING):
            notifier.poolChanged(state)
        notifier.notify("X=1")
        self.assertEqual(notify.next(), {"X": "1"})


class UnderNotifySocketTests(SynchronousTestCase):
    def test_readyReloadingStopping(self) -> None:
        """
        The real server sends READY=1 once all workers accept, RELOADING=1
        then READY=1 around a reload, and STOPPING=1 when it stops; with a
        watchdog period it sends keep-alives.
        """
        notify = NotifySocket(self)
        env = {"NOTIFY_SOCKET": notify.path, "WATCHDOG_USEC": "1000000"}
        server = MacceptServer(["--listen", "tcp:0:interface=127.0.0.1", "--workers", "2"], env=env)
        self.addCleanup(server.cleanup)
        self.assertEqual(notify.until("READY")["STATUS"], "serving with 2 workers")
        waitFor(lambda: "all 2 workers ready" in server.log(), what="the ready line")
        notify.until("WATCHDOG")
        os.kill(server.pid, signal.SIGHUP)
        notify.until("RELOADING")
        notify.until("READY")
        waitFor(lambda: "generation 2 ready" in server.log(), what="the reload line")
        os.kill(server.pid, signal.SIGTERM)
        notify.until("STOPPING")
        self.assertEqual(server.process.wait(30), 0)

    def test_upgradeHandsOverQuietly(self) -> None:
        """
        After SIGUSR2 the new parent reports READY=1 with its own MAINPID,
        and the old one says nothing as it drains and exits: systemd (with
        NotifyAccess=all) would take its STOPPING=1 for the service's.  The
        new parent says STOPPING=1 when it stops.
        """
        notify = NotifySocket(self)
        server = MacceptServer(
            ["--listen", "tcp:0:interface=127.0.0.1", "--workers", "1"],
            env={"NOTIFY_SOCKET": notify.path},
        )
        self.addCleanup(server.cleanup)
        self.assertEqual(notify.until("READY")["MAINPID"], str(server.pid))
        os.kill(server.pid, signal.SIGUSR2)
        newParent = int(notify.until("READY")["MAINPID"])
        self.assertNotEqual(newParent, server.pid)
        self.addCleanup(killGroup, os.getpgid(newParent))
        self.assertEqual(server.process.wait(30), 0)
        self.assertEqual([m for m in notify.queued() if "STOPPING" in m], [])
        os.kill(newParent, signal.SIGTERM)
        notify.until("STOPPING")
        waitFor(lambda: not alive(newParent), what="the new parent to stop")

    def test_failedUpgradeSaysNothing(self) -> None:
        """
        A new parent whose workers fail tells systemd nothing (its
        STOPPING=1 would stop the unit the old parent still serves): the old
        parent's STOPPING=1 is the next one, at its own stop.
        """
        marker = os.path.join(tempfile.gettempdir(), f"maccept-break-notify-{os.getpid()}")
        notify = NotifySocket(self)
        server = MacceptServer(
            [
                *("--listen", "tcp:0:interface=127.0.0.1", "--workers", "1"),
                *("--protocol", "tests.sample_protocols:breakableEcho"),
            ],
            env={"NOTIFY_SOCKET": notify.path, "MACCEPT_TEST_BREAK": marker},
        )
        self.addCleanup(server.cleanup)
        notify.until("READY")
        Path(marker).touch()
        self.addCleanup(os.unlink, marker)
        os.kill(server.pid, signal.SIGUSR2)
        waitFor(lambda: "upgrade failed, keeping this parent" in server.log(), what="the failure")
        self.assertEqual([m for m in notify.queued() if "STOPPING" in m], [])
        os.kill(server.pid, signal.SIGTERM)
        notify.until("STOPPING")
        self.assertEqual(server.process.wait(30), 0)


SOCKET_ACTIVATE = shutil.which("systemd-socket-activate")


def connectOrNone(port: int) -> socket.socket | None:
    try:
        return socket.create_connection(("127.0.0.1", port), timeout=10)
    except ConnectionRefusedError:
        return None


class SocketActivationTests(SynchronousTestCase):
    """
    C{--listen systemd:...} under the real C{systemd-socket-activate}: the
    parent adopts the socket systemd passed and hands it to its workers.
    """

    def activate(self, port: int, *args: str) -> subprocess.Popen[str]:
        if SOCKET_ACTIVATE is None:
            self.skipTest("systemd-socket-activate is not installed (Debian package systemd)")
        log = tempfile.NamedTemporaryFile(prefix="maccept-sd-", suffix=".log", delete=False)  # noqa: SIM115
        self.addCleanup(os.unlink, log.name)
        self.addCleanup(log.close)
        process = subprocess.Popen(
            [
                SOCKET_ACTIVATE,
                "--fdname=echo",
                "-l",
                f"127.0.0.1:{port}",
                TWISTD,
                "-n",
                "--pidfile=",
                "maccept",
                *args,
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            text=True,
            cwd=tempfile.gettempdir(),
            env={**os.environ, "PYTHONPATH": str(HERE.parent)},
            start_new_session=True,
        )
        self.addCleanup(self.stop, process)
        self.log = log.name
        return process

    def stop(self, process: subprocess.Popen[str]) -> None:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()

    def activated(self, workers: int) -> tuple[subprocess.Popen[str], int]:
        """
        maccept under systemd-socket-activate on a free port, started (by
        a first connection, echoed) and with all its workers ready.
        """
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port: int = probe.getsockname()[1]
        process = self.activate(
            port, "--workers", str(workers), "--listen", "systemd:domain=INET:name=echo"
        )
        # systemd-socket-activate binds, then starts the server at the
        # first connection.
        client = waitFor(lambda: connectOrNone(port), what="systemd-socket-activate to listen")
        assert isinstance(client, socket.socket)
        self.addCleanup(client.close)
        self.assertEqual(echoRoundTrip(client, b"activated"), b"activated")
        ready = f"all {workers} workers ready"
        waitFor(lambda: ready in Path(self.log).read_text(), what="the workers")
        return process, port

    def test_servesTheActivatedSocket(self) -> None:
        """
        Workers accept on the socket systemd made; a TERM stops everything
        with status 0.
        """
        process, port = self.activated(2)
        self.assertEqual(len(childrenOf(process.pid)), 2)
        with socket.create_connection(("127.0.0.1", port), timeout=10) as second:
            self.assertEqual(echoRoundTrip(second, b"again"), b"again")
        process.send_signal(signal.SIGTERM)
        self.assertEqual(process.wait(30), 0)

    def test_upgradeUnderSocketActivation(self) -> None:
        """
        SIGUSR2 works under socket activation: the new parent takes the
        systemd socket over with the others (not from LISTEN_FDS, which
        name the old parent), and serves once the old one has exited.
        """
        process, port = self.activated(1)
        process.send_signal(signal.SIGUSR2)
        self.assertEqual(process.wait(30), 0)
        log = Path(self.log).read_text()
        self.assertNotIn("upgrade failed", log)
        [newParent] = re.findall(r"started a new parent \(pid (\d+)\)", log)
        self.addCleanup(killGroup, os.getpgid(int(newParent)))
        with socket.create_connection(("127.0.0.1", port), timeout=10) as second:
            self.assertEqual(echoRoundTrip(second, b"upgraded"), b"upgraded")
        os.kill(int(newParent), signal.SIGTERM)
        waitFor(lambda: not alive(int(newParent)), what="the new parent to stop")

    def passing(
        self,
        sock: socket.socket,
        description: str,
        names: str = "echo",
        pid: str = "",
        count: str = "1",
        extra: tuple[str, ...] = (),
    ) -> subprocess.CompletedProcess[str]:
        """
        Run maccept as systemd would, with C{sock} as its descriptor 3
        (named C{names}, for this process or the pid C{pid}, C{count} in
        C{LISTEN_FDS}), listening on C{description}; C{extra} are more
        options.
        """
        launcher = (
            "import os, sys; os.dup2(int(sys.argv[1]), 3); os.set_inheritable(3, True); "
            f"os.environ.update(LISTEN_FDS={count!r}, LISTEN_PID={pid!r} or str(os.getpid())); "
            f"os.environ.update(LISTEN_FDNAMES={names!r}) if {names!r} else None; "
            "os.execv(sys.argv[2], sys.argv[2:])"
        )
        command = [sys.executable, "-c", launcher, str(sock.fileno()), TWISTD, "-n"]
        command += ["--pidfile=", "maccept", "--workers", "1", "--listen", description, *extra]
        return subprocess.run(
            command, pass_fds=[sock.fileno()], capture_output=True, text=True, timeout=60
        )

    def test_wrongKindOfSocket(self) -> None:
        """
        A descriptor that is not a listening stream socket of the family
        the description names is refused at start-up in one line (a
        datagram socket would otherwise be adopted as a stream port).
        """
        datagram = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        notListening = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listening = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        for sock in (datagram, notListening, listening):
            self.addCleanup(sock.close)
            sock.bind(("127.0.0.1", 0))
        listening.listen()
        for sock, description, problem in [
            (datagram, "systemd:domain=INET:name=echo", "systemd passed a datagram socket"),
            (notListening, "systemd:domain=INET:name=echo", "not listening"),
            (listening, "systemd:domain=UNIX:name=echo", "an INET socket, not the domain=UNIX"),
        ]:
            result = self.passing(sock, description)
            self.assertEqual(result.returncode, 2, result.stderr)
            self.assertIn(problem, result.stderr)
            self.assertNotIn("Traceback", result.stderr + result.stdout)
            self.assertEqual(len(result.stderr.strip().splitlines()), 1, result.stderr)

    def test_wrongName(self) -> None:
        """
        A name systemd did not pass is one line naming those it did.
        """
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port: int = probe.getsockname()[1]
        process = self.activate(port, "--listen", "systemd:domain=INET:name=web")
        client = waitFor(lambda: connectOrNone(port), what="systemd-socket-activate to listen")
        assert isinstance(client, socket.socket)
        client.close()
        self.assertEqual(process.wait(30), 2)
        with open(self.log) as log:
            self.assertIn(
                "systemd passed no descriptor named 'web', only echo (see FileDescriptorName=",
                log.read(),
            )

    def test_descriptorUsedTwice(self) -> None:
        """
        One of systemd's descriptors named twice (by name, then by index)
        is refused in one line naming both: the second would adopt whatever
        held that descriptor number by then.  So is a LISTEN_FDS that is not
        a count.
        """
        listening = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.addCleanup(listening.close)
        listening.bind(("127.0.0.1", 0))
        listening.listen()
        byName, byIndex = "systemd:domain=INET:name=echo", "systemd:domain=INET:index=0"
        for extra, problem in [
            (("--metrics", byIndex), f"--metrics {byIndex}: the same systemd descriptor as"),
            (("--listen", byIndex), f"--listen {byIndex}: the same systemd descriptor as"),
        ]:
            result = self.passing(listening, byName, extra=extra)
            self.assertEqual(result.returncode, 2, result.stderr)
            [line] = result.stderr.strip().splitlines()
            self.assertIn(f"{problem} --listen {byName}", line)
        result = self.passing(listening, byName, count="abc")
        self.assertEqual(result.returncode, 2, result.stderr)
        [line] = result.stderr.strip().splitlines()
        self.assertIn("LISTEN_FDS='abc' is not a count of descriptors", line)

    def test_descriptorsNotUsable(self) -> None:
        """
        Descriptors passed without names, or for another process (a
        wrapper that forked), or none at the index asked for, are refused
        in one line saying so.
        """
        listening = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.addCleanup(listening.close)
        listening.bind(("127.0.0.1", 0))
        listening.listen()
        for description, names, pid, problem in [
            ("systemd:domain=INET:index=0", "", "", "descriptors without names"),
            ("systemd:domain=INET:name=echo", "", "", "without names, so none named 'echo'"),
            ("systemd:domain=INET:name=echo", "echo", "1", "are for pid 1 (LISTEN_PID)"),
            ("systemd:domain=INET:index=1", "echo", "", "1 descriptor(s), named echo: none at"),
        ]:
            result = self.passing(listening, description, names, pid)
            self.assertEqual(result.returncode, 2, result.stderr)
            [line] = result.stderr.strip().splitlines()
            self.assertIn(problem, line)

    def test_withoutSystemd(self) -> None:
        """
        C{systemd:} without socket activation is one line at start-up.
        """
        result = runMaccept(["--listen", "systemd:domain=INET:index=0"])
        self.assertEqual(result.returncode, 2)
        self.assertEqual(
            result.stderr.strip(),
            "maccept: error: --listen systemd:domain=INET:index=0: systemd passed no "
            "descriptor at that index (LISTEN_FDS=unset; run under socket activation)",
        )
        result = runMaccept(["--listen", "systemd:domain=INET:name=web"])
        self.assertEqual(
            result.stderr.strip(),
            "maccept: error: --listen systemd:domain=INET:name=web: systemd passed no "
            "descriptor named 'web', nor any (run under socket activation)",
        )
