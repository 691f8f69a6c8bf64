"""
A UNIX socket's path and lock: who removes them, and taking the lock over.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile

from twisted.internet import reactor
from twisted.internet.endpoints import UNIXServerEndpoint
from twisted.internet.protocol import Factory
from twisted.logger import capturedLogs, formatEvent
from twisted.trial.unittest import SynchronousTestCase

from maccept._descriptions import ListenError
from maccept._listening import listenNow
from maccept._socketpath import SocketPath, dropOwnLock, pathProblem


class FakeUNIXPort:
    def __init__(self, path: str) -> None:
        self.path = path

    def getHost(self) -> object:
        from twisted.internet.address import UNIXAddress

        return UNIXAddress(self.path.encode())


class SocketPathTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.directory = tempfile.mkdtemp(prefix="maccept-socketpath-")
        self.addCleanup(shutil.rmtree, self.directory, True)
        self.path = os.path.join(self.directory, "s.sock")
        self.lock = self.path + ".lock"
        self.sock = socket.socket(socket.AF_UNIX)
        self.addCleanup(self.sock.close)
        self.sock.bind(self.path)

    def test_ofFindsLeftLock(self) -> None:
        """
        Of an adopted port (no lock object), the lock is the one beside the
        path, if there is one.
        """
        port = FakeUNIXPort(self.path)
        self.assertIsNone(SocketPath.of("--listen x", port, owned=False).lockName)  # type: ignore[arg-type, union-attr]
        os.symlink("1", self.lock)
        found = SocketPath.of("--listen x", port, owned=False)  # type: ignore[arg-type]
        self.assertEqual((found.path, found.lockName, found.owned), (self.path, self.lock, False))  # type: ignore[union-attr]

    def test_notOwnedLeftAlone(self) -> None:
        """
        A parent that does not own them (it adopted the socket and has not
        taken over) removes neither path nor lock.
        """
        os.symlink("12345", self.lock)
        SocketPath("--control p", self.path, self.lock, owned=False).remove()
        self.assertTrue(os.path.exists(self.path))
        self.assertEqual(os.readlink(self.lock), "12345")

    def test_claimThenRemove(self) -> None:
        """
        Claiming points the lock at this process; then the owner removes
        both.
        """
        os.symlink("12345", self.lock)
        socketPath = SocketPath("--control p", self.path, self.lock, owned=False)
        socketPath.claim()
        self.assertTrue(socketPath.owned)
        self.assertEqual(os.readlink(self.lock), str(os.getpid()))
        self.assertEqual([n for n in os.listdir(self.directory) if n != "s.sock"], ["s.sock.lock"])
        socketPath.remove()
        self.assertFalse(os.path.exists(self.path))
        self.assertFalse(os.path.lexists(self.lock))

    def test_someoneElsesLockKept(self) -> None:
        """
        A lock that names another process (a rival took it) is not removed.
        """
        os.symlink("12345", self.lock)
        SocketPath("--control p", self.path, self.lock).remove()
        self.assertFalse(os.path.exists(self.path))
        self.assertEqual(os.readlink(self.lock), "12345")

    def test_cannotRemoveIsOneLine(self) -> None:
        """
        A path that cannot be removed is one warning naming the option.
        """
        socketPath = SocketPath("--control p", os.path.join(self.path, "under-a-socket"))
        with capturedLogs() as events:
            socketPath.remove()
        [event] = events
        self.assertIn("--control p: cannot remove", formatEvent(event))


class PathProblemTests(SynchronousTestCase):
    """
    What is wrong with a UNIX socket path before Twisted locks it, and the
    lock a failed listen leaves.
    """

    def setUp(self) -> None:
        self.directory = tempfile.mkdtemp(prefix="maccept-pp-")
        self.addCleanup(shutil.rmtree, self.directory, True)

    def test_problems(self) -> None:
        regular = os.path.join(self.directory, "file")
        open(regular, "w").close()
        self.assertIn("longer than", pathProblem(os.path.join(self.directory, "x" * 120)) or "")
        self.assertIn("does not exist", pathProblem("/no/such/dir/s.sock") or "")
        self.assertIn("is not a socket", pathProblem(regular) or "")
        self.assertIsNone(pathProblem(os.path.join(self.directory, "new.sock")))
        self.assertIsNone(pathProblem("\0abstract"))
        # Through a directory that does not exist, as the kernel sees it.
        through = os.path.join(self.directory, "missing", "..", "s.sock")
        self.assertEqual(
            pathProblem(through),
            f"directory {os.path.join(self.directory, 'missing', '..')} does not exist",
        )

    def test_unwritableDirectory(self) -> None:
        """
        A directory this user may not create in is named, before Twisted
        fails on the lock beside the socket in other words.
        """
        self.patch(os, "access", lambda path, mode, effective_ids=False: False)
        self.assertEqual(
            pathProblem(os.path.join(self.directory, "s.sock")),
            f"directory {self.directory} is not writable by this user (uid {os.geteuid()})",
        )

    def test_staleSocketThroughSymlink(self) -> None:
        """
        A symlink to a socket is judged by the socket, as bind(2) sees it.
        """
        target = os.path.join(self.directory, "real.sock")
        with socket.socket(socket.AF_UNIX) as s:
            s.bind(target)
        link = os.path.join(self.directory, "link.sock")
        os.symlink(target, link)
        self.assertIsNone(pathProblem(link))

    def test_dropOwnLockOnly(self) -> None:
        """
        Only a lock naming this process is removed.
        """
        mine, theirs = (os.path.join(self.directory, name) for name in ("a.sock", "b.sock"))
        os.symlink(str(os.getpid()), mine + ".lock")
        os.symlink("1", theirs + ".lock")
        dropOwnLock(mine)
        dropOwnLock(theirs)
        self.assertFalse(os.path.islink(mine + ".lock"))
        self.assertTrue(os.path.islink(theirs + ".lock"))


class LockHeldTests(SynchronousTestCase):
    def test_holderNamed(self) -> None:
        """
        A UNIX path whose lock a live process holds is refused naming that
        process's pid, not with Twisted's "Cannot acquire lock".
        """

        directory = tempfile.mkdtemp(prefix="maccept-lockheld-")
        self.addCleanup(shutil.rmtree, directory, True)
        path = os.path.join(directory, "c.sock")
        holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        self.addCleanup(holder.wait)
        self.addCleanup(holder.kill)
        os.symlink(str(holder.pid), path + ".lock")
        endpoint = UNIXServerEndpoint(reactor, path, wantPID=True)
        with self.assertRaises(ListenError) as caught:
            listenNow(endpoint, Factory(), path)
        self.assertEqual(
            str(caught.exception),
            f"cannot listen: another process (pid {holder.pid}) holds {path} "
            f"(its lock, {path}.lock, names it)",
        )
        self.assertEqual(os.readlink(path + ".lock"), str(holder.pid))
