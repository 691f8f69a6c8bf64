# -*- test-case-name: tests.test_socketpath -*-
"""
The filesystem side of a UNIX listening socket: its path, and the lock
Twisted may keep beside it (C{PATH.lock}, a symlink to the owner's pid; see
L{twisted.python.lockfile.FilesystemLock}).

The parent that owns them removes them when it stops.  Ownership moves
twice in a parent's life.  twistd daemonises after the sockets are made,
so the lock names a pid that is gone: the parent points it at itself once
it runs.  And an upgrade (SIGUSR2) hands the sockets to a new parent,
which owns them only once it has taken over: a new parent that fails
before then must leave the old one's path and lock alone.
"""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from twisted.internet.address import UNIXAddress
from twisted.internet.interfaces import IListeningPort
from twisted.logger import Logger

_log = Logger(namespace="maccept")

#: The longest path a UNIX socket address holds (C{sun_path}, less its NUL).
MAX_PATH_BYTES = 107


#: Whether access(2) can be asked about the effective ids (as bind(2) acts
#: with them), not the real ones.
_EFFECTIVE_IDS = os.access in os.supports_effective_ids


def pathProblem(path: str) -> str | None:
    """
    Why no UNIX socket can be made at C{path}, found before Twisted takes
    the lock beside it (which a failed listen would leave behind), in
    words that name the cause; C{None} if nothing is known to be wrong.
    """
    if not path or path.startswith("\0"):
        return None  # the abstract namespace has no file
    if len(os.fsencode(path)) > MAX_PATH_BYTES:
        return f"the path is longer than the {MAX_PATH_BYTES} bytes a UNIX socket address holds"
    # As the kernel resolves it, not on paper: "missing/../dir" is none.
    directory = os.path.dirname(path) or "."
    if not os.path.isdir(directory):
        return f"directory {directory} does not exist"
    if not os.access(directory, os.W_OK | os.X_OK, effective_ids=_EFFECTIVE_IDS):
        return f"directory {directory} is not writable by this user (uid {os.geteuid()})"
    try:
        mode = os.stat(path).st_mode  # through a symlink, as bind(2) goes
    except OSError:
        return None  # nothing there (or Twisted will say what is wrong)
    if not stat.S_ISSOCK(mode):
        return f"{path} exists and is not a socket"
    return None


def dropOwnLock(path: str) -> None:
    """
    Remove C{PATH.lock} if it names this process: what a listen that
    failed after taking it leaves behind.
    """
    lock = path + ".lock"
    with contextlib.suppress(OSError):
        if os.readlink(lock) == str(os.getpid()):
            os.unlink(lock)


@dataclass
class SocketPath:
    """
    @ivar label: the option that asked for the socket, for log lines.
    @ivar lockName: C{PATH.lock} where the socket has a lock.
    @ivar owned: whether this parent removes them when it stops.
    """

    label: str
    path: str
    lockName: str | None = None
    owned: bool = True

    @classmethod
    def of(cls, label: str, port: IListeningPort, owned: bool = True) -> SocketPath | None:
        """
        The path and lock of C{port}, if it is a UNIX socket with a path
        (not one in the abstract namespace).
        """
        address = port.getHost()
        if not isinstance(address, UNIXAddress) or not address.name:
            return None
        path = os.fsdecode(address.name)
        if path.startswith("\0"):
            return None
        # Twisted's own lock on a port it made; on an adopted one, the lock
        # the old parent left beside the path.
        lockFile = getattr(port, "lockFile", None)
        lockName: str | None = path + ".lock"
        if lockFile is not None:
            lockName = os.fsdecode(lockFile.name)
        elif not os.path.islink(path + ".lock"):
            lockName = None
        return cls(label, path, lockName, owned)

    @staticmethod
    def ofOwners(owners: Iterable[Any]) -> list[SocketPath]:
        """
        The paths of those of C{owners} (listeners, service ports) that are
        UNIX sockets.
        """
        return [each.socketPath for each in owners if each.socketPath is not None]

    def claim(self) -> None:
        """
        Own the path, and point the lock at this process (atomically: a
        rival start never sees no lock).
        """
        self.owned = True
        if self.lockName is None:
            return
        pid = str(os.getpid())
        try:
            if os.readlink(self.lockName) == pid:
                return
            temporary = f"{self.lockName}.{pid}"
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temporary)  # left by a process that had our pid
            os.symlink(pid, temporary)
            os.replace(temporary, self.lockName)
        except OSError as e:
            self._warn(f"cannot take the lock {self.lockName}", e)

    def remove(self) -> None:
        """
        Remove the path and the lock, if this parent owns them; a failure is
        one log line (typically twistd --uid: root made them, and the
        parent no longer may remove them), and stopping goes on.
        """
        if not self.owned:
            return
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        except OSError as e:
            self._warn(
                f"cannot remove {self.path}",
                e,
                " (the parent's user needs write access to its directory)",
            )
        if self.lockName is None:
            return
        try:
            if os.readlink(self.lockName) == str(os.getpid()):
                os.unlink(self.lockName)
        except FileNotFoundError:
            pass
        except OSError as e:
            self._warn(f"cannot remove the lock {self.lockName}", e)

    def _warn(self, what: str, error: OSError, hint: str = "") -> None:
        _log.warn(
            "{label}: {what}: {reason}{hint}",
            label=self.label,
            what=what,
            reason=error.strerror,
            hint=hint,
        )
