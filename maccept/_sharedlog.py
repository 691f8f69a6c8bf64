# -*- test-case-name: tests.test_upgrade_unit,tests.test_upgrade -*-
"""
One log file, two parents: during an upgrade (USR2) the old parent and the
new one both write twistd's C{--logfile}, and neither may write over the
other's lines or lose its own when the file is rotated.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import stat
from collections.abc import Mapping
from typing import Any

from twisted.internet.task import LoopingCall


def shareLogFile(twistdConfig: Mapping[str, Any] | None) -> None:
    """
    In the old parent, as an upgrade starts: make the descriptor of
    twistd's C{--logfile} append-only (C{O_APPEND}).  Two parents write
    that file during an upgrade, and each would otherwise write at its own
    offset, over the other's lines.  (When twistd rotates the file during
    the upgrade, the rotating parent reopens a new file alone, so that
    needs no flag; only a rotation before the new parent has opened the
    log would be shared without one.)
    """
    config = twistdConfig or {}
    logfile = config.get("logfile") or ("twistd.log" if not config.get("nodaemon") else None)
    if not logfile or logfile == "-":
        return
    name = os.path.basename(logfile)
    for entry in os.listdir("/proc/self/fd"):
        fd = int(entry)
        try:
            if os.path.basename(os.readlink(f"/proc/self/fd/{fd}")) != name:
                continue
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                continue
            flags = fcntl.fcntl(fd, fcntl.F_GETFL)
            if flags & os.O_ACCMODE != os.O_RDONLY:
                fcntl.fcntl(fd, fcntl.F_SETFL, flags | os.O_APPEND)
        except OSError:
            continue  # closed meanwhile (listdir's own descriptor)


def appendToLogFiles() -> None:
    """
    In a new parent, before twistd opens C{--logfile}: open every log file
    append-only (C{O_APPEND}).  twistd opens it at its end but not for
    appending, and writes its first lines at once, while the old parent
    still writes the same file: at the offset it saw, they went over the
    old parent's latest lines (torn lines, lost lines), before this
    parent's service could make the descriptor append-only.
    """
    from twisted.python import logfile

    opened = logfile.LogFile._openFile

    def _openFile(self: logfile.LogFile) -> None:
        opened(self)
        fd = self._file.fileno()
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | os.O_APPEND)
        if self not in _SHARED_LOGS:
            _SHARED_LOGS.append(self)

    logfile.LogFile._openFile = _openFile  # type: ignore[method-assign]


#: The log files a new parent opened while the old one wrote them too.
_SHARED_LOGS: list[Any] = []


def followRotatedLogs(reactor: Any, oldParent: int, interval: float = 1.0) -> None:
    """
    In a new parent that took over, while the old one (its parent) drains:
    if the old parent rotates the shared log file, this parent's
    descriptor is left on the renamed file, and it would write there, the
    file named by --logfile ending with the old parent's "Server Shut
    Down.".  Reopen the file by its name whenever it is another file,
    until the old parent is gone.
    """

    def check() -> None:
        for log in _SHARED_LOGS:
            with contextlib.suppress(OSError):
                if os.stat(log.path).st_ino != os.fstat(log._file.fileno()).st_ino:
                    log.reopen()
        if os.getppid() != oldParent:
            follow.stop()

    follow = LoopingCall(check)
    follow.clock = reactor
    follow.start(interval, now=False)
