"""
Started as root with twistd's C{--uid}/C{--gid}, the parent binds a
privileged port first and no worker ever runs as root.

The workers run C{sys.executable}, and the user they run as must be able to
execute it and import maccept and its dependencies.  The development
machine keeps its interpreter and virtualenv under C{/root} (mode 700), so
the test runs twistd with a Python of the same minor version that the
target user can execute (the running one, or the system's), and copies the
packages the server imports into a directory that user can read.
"""

from __future__ import annotations

import grp
import os
import pwd
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from maccept.testing import childrenOf
from tests.server import HERE, MacceptServer, alive, echoRoundTrip, killGroup, waitFor

#: What a parent and a worker serving C{echo} on TCP import.
SERVER_MODULES = (
    "maccept._tap",
    "maccept._worker",
    "maccept._workerprocess",
    "twisted.scripts.twistd",
    "twisted.internet.epollreactor",
    "twisted.plugins.maccept_plugin",
    "twisted.plugins.maccept_protocols",
)


def asUser(uid: int, gid: int) -> Callable[[], None]:
    """
    A C{preexec_fn} that becomes C{uid}/C{gid} for good.
    """

    def become() -> None:
        os.setgroups([])
        os.setgid(gid)
        os.setuid(uid)

    return become


def interpreterFor(uid: int, gid: int) -> str | None:
    """
    A Python of this minor version that C{uid} can execute, or L{None}.
    """
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    for candidate in (sys.executable, f"/usr/bin/python{version}"):
        if not os.path.exists(candidate):
            continue
        try:
            probe = subprocess.run(
                [candidate, "-c", f"import sys; assert sys.version.startswith('{version}.')"],
                preexec_fn=asUser(uid, gid),
                capture_output=True,
                cwd="/",
                env={},
            )
        except PermissionError:
            continue
        if probe.returncode == 0:
            return candidate
    return None


def copyServerPackages(destination: Path) -> None:
    """
    Copy maccept, its twistd plugins and every third-party package the server
    imports into C{destination}, one directory a less privileged user can
    read.
    """
    listing = subprocess.run(
        [
            sys.executable,
            "-c",
            "import importlib, sys\n"
            f"for name in {SERVER_MODULES!r}: importlib.import_module(name)\n"
            "for module in list(sys.modules.values()):\n"
            "    print(getattr(module, '__file__', None) or '')\n",
        ],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PYTHONPATH": str(HERE.parent)},
    ).stdout.split()
    stdlib = Path(sys.base_prefix).resolve()
    roots = [Path(p).resolve() for p in sys.path if "-packages" in p]
    tops: set[Path] = set()
    for filename in listing:
        path = Path(filename).resolve()
        if path.is_relative_to(stdlib) and not any(path.is_relative_to(r) for r in roots):
            continue
        for root in (*roots, HERE.parent.resolve()):
            if path.is_relative_to(root) and path != root:
                tops.add(root / path.relative_to(root).parts[0])
                break
    for top in sorted(tops):
        if top.name in ("twisted", "maccept") and top.parent == HERE.parent.resolve():
            continue  # the repository's own, copied below
        if top.is_dir():
            shutil.copytree(top, destination / top.name, dirs_exist_ok=True)
        else:
            shutil.copy2(top, destination / top.name)
    ignore = shutil.ignore_patterns("__pycache__", "dropin.cache")
    shutil.copytree(HERE.parent / "maccept", destination / "maccept", ignore=ignore)
    shutil.copytree(
        HERE.parent / "twisted" / "plugins",
        destination / "twisted" / "plugins",
        ignore=ignore,
        dirs_exist_ok=True,
    )


def freePrivilegedPort() -> int:
    """
    A port below 1024 that nothing listens on at 127.0.0.1 right now.
    """
    for port in range(1023, 512, -1):
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise AssertionError("no free port below 1024 on 127.0.0.1")


def identities(pid: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """
    The real, effective, saved and filesystem uids and gids of C{pid}.
    """
    fields = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("Uid", "Gid"):
                fields[key] = tuple(int(v) for v in value.split())
    return fields["Uid"], fields["Gid"]


class PrivilegesTests(SynchronousTestCase):
    def setUp(self) -> None:
        if os.geteuid() != 0:
            self.skipTest("starting as root with --uid needs root")
        self.uid = pwd.getpwnam("nobody").pw_uid
        self.gid = grp.getgrnam("nogroup").gr_gid
        python = interpreterFor(self.uid, self.gid)
        if python is None:
            self.skipTest(f"no Python {sys.version_info[:2]} that nobody can execute")
        self.python = python
        self.packages = Path(tempfile.mkdtemp(prefix="maccept-privileges-"))
        self.addCleanup(shutil.rmtree, self.packages, True)
        copyServerPackages(self.packages)
        os.chmod(self.packages, 0o755)

    @property
    def nobody(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        return (self.uid,) * 4, (self.gid,) * 4

    def startAsNobody(self, *args: str) -> MacceptServer:
        """
        Start C{twistd --uid nobody --gid nogroup -n maccept ARGS} with two
        workers, as root, and wait until they are ready.
        """
        server = MacceptServer(
            [*args, "--workers", "2"],
            twistdArgs=[f"--uid={self.uid}", f"--gid={self.gid}"],
            env={"PYTHONPATH": str(self.packages)},
            twistd=[self.python, "-c", "from twisted.scripts.twistd import run; run()"],
        )
        self.addCleanup(server.stop)
        return server.waitReady()

    def test_rootBindsWorkersNeverRoot(self) -> None:
        """
        C{twistd --uid nobody --gid nogroup -n maccept --listen tcp:PORT}
        with PORT below 1024, started as root: the port serves echo, the
        parent is nobody once started, and every worker, including those a
        reload starts, is nobody from its real to its filesystem uid.

        UNIX socket paths root made: the parent removes one in a directory
        nobody may write to, and says in one line why it leaves one where it
        may not.
        """
        port = freePrivilegedPort()
        sockets = Path(tempfile.mkdtemp(prefix="maccept-sockets-"))
        self.addCleanup(shutil.rmtree, sockets, True)
        os.chmod(sockets, 0o755)
        (sockets / "nobody").mkdir()
        os.chown(sockets / "nobody", self.uid, self.gid)
        removable, stuck = sockets / "nobody" / "echo.sock", sockets / "echo.sock"
        server = self.startAsNobody(
            *("--listen", f"tcp:{port}:interface=127.0.0.1"),
            *("--listen", f"unix:{removable}:lockfile=0"),
            *("--listen", f"unix:{stuck}:lockfile=0"),
        )
        nobody = self.nobody

        first = server.workers()
        self.assertEqual(len(first), 2)
        self.assertEqual(identities(server.pid), nobody)
        for pid in first:
            self.assertEqual(identities(pid), nobody)
        with server.connect(f"127.0.0.1:{port}") as client:
            self.assertEqual(echoRoundTrip(client, b"low port"), b"low port")

        os.kill(server.pid, signal.SIGHUP)

        def replaced() -> list[int]:
            workers = server.workers()
            return workers if len(workers) == 2 and not set(workers) & set(first) else []

        for pid in waitFor(replaced, what="workers replaced by the reload"):
            self.assertEqual(identities(pid), nobody)
        with server.connect(f"127.0.0.1:{port}") as client:
            self.assertEqual(echoRoundTrip(client, b"after reload"), b"after reload")
        with server.connect(str(removable)) as client:
            self.assertEqual(echoRoundTrip(client, b"unix"), b"unix")

        log = server.log
        server.process.send_signal(signal.SIGTERM)
        self.assertEqual(server.process.wait(20), 0)
        self.assertFalse(removable.exists())
        self.assertTrue(stuck.exists())
        self.assertIn(
            f"--listen unix:{stuck}:lockfile=0: cannot remove {stuck}: Permission denied", log()
        )
        self.assertNotIn("Traceback", log())

    def test_upgradeAsNobody(self) -> None:
        """
        SIGUSR2 to a parent that shed root: the new parent, started by
        nobody, takes the privileged port and a UNIX socket over without
        binding anything (it could not), serves, runs nobody's workers, and
        removes the UNIX path when it stops.
        """
        port = freePrivilegedPort()
        sockets = Path(tempfile.mkdtemp(prefix="maccept-sockets-"))
        self.addCleanup(shutil.rmtree, sockets, True)
        os.chmod(sockets, 0o755)
        os.chown(sockets, self.uid, self.gid)
        path = sockets / "echo.sock"
        server = self.startAsNobody(
            "--listen", f"tcp:{port}:interface=127.0.0.1", "--listen", f"unix:{path}"
        )
        old = server.pid
        os.kill(old, signal.SIGUSR2)
        waitFor(lambda: f"old parent (pid {old}) drains" in server.log(), what="the takeover")
        self.assertEqual(server.process.wait(30), 0)
        [new] = [
            int(pid) for pid in re.findall(r"started a new parent \(pid (\d+)\)", server.log())
        ]
        self.addCleanup(killGroup, os.getpgid(new))
        self.assertEqual(identities(new), self.nobody)
        workers = childrenOf(new)
        self.assertEqual(len(workers), 2)
        for pid in workers:
            self.assertEqual(identities(pid), self.nobody)
        with socket.create_connection(("127.0.0.1", port), timeout=10) as client:
            self.assertEqual(echoRoundTrip(client, b"upgraded"), b"upgraded")
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o666)
        self.assertEqual(os.readlink(f"{path}.lock"), str(new))
        os.kill(new, signal.SIGTERM)
        waitFor(lambda: not alive(new), what="the new parent to stop")
        self.assertFalse(path.exists())
        self.assertFalse(os.path.lexists(f"{path}.lock"))
        self.assertNotIn("Traceback", server.log())
