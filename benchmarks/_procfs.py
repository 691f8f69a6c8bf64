"""
What the benchmark learns about server processes from Linux's /proc.

Reading /proc instead of asking the servers keeps every competitor unchanged:
the harness needs no hook in maccept or in the other servers to count a
worker's connections, its memory or its CPU time.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable
from pathlib import Path

PROC = Path("/proc")
_TCP_ESTABLISHED = "01"
_TICKS = os.sysconf("SC_CLK_TCK")


def _pids() -> Iterable[int]:
    for entry in PROC.iterdir():
        if entry.name.isdigit():
            yield int(entry.name)


def _stat(pid: int) -> list[str] | None:
    """
    The fields of /proc/PID/stat after the command name (which may hold
    spaces), so that index 0 is the state and index 1 the parent pid.
    """
    try:
        text = (PROC / str(pid) / "stat").read_text()
    except OSError:
        return None
    return text[text.rindex(")") + 2 :].split()


def children(pid: int) -> list[int]:
    """
    The live children of C{pid}.
    """
    found = []
    for candidate in _pids():
        fields = _stat(candidate)
        if fields is not None and fields[1] == str(pid) and fields[0] != "Z":
            found.append(candidate)
    return found


def alive(pid: int, parent: int | None = None) -> bool:
    """
    Whether C{pid} runs (a zombie has exited, only not been reaped yet)
    and, with C{parent}, is still that parent's child, not a process that
    was given the pid of one that exited.
    """
    fields = _stat(pid)
    if fields is None or fields[0] in ("Z", "X"):
        return False
    return parent is None or pid == parent or fields[1] == str(parent)


def groupMembers(group: int) -> list[int]:
    """
    The live processes whose process group is C{group}.
    """
    found = []
    for candidate in _pids():
        fields = _stat(candidate)
        if fields is not None and fields[2] == str(group) and fields[0] != "Z":
            found.append(candidate)
    return found


def cmdline(pid: int) -> str:
    try:
        return (PROC / str(pid) / "cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def cpuTimes(pid: int) -> tuple[float, float]:
    """
    User and system CPU time C{pid} has used so far: the system part is
    the kernel's TCP work on its behalf, which no server code can shed.
    """
    fields = _stat(pid)
    if fields is None:
        return 0.0, 0.0
    # utime and stime are fields 14 and 15 of stat(5), 11 and 12 here.
    return int(fields[11]) / _TICKS, int(fields[12]) / _TICKS


def memory(pid: int) -> dict[str, int | None]:
    """
    Resident and proportional set sizes of C{pid} in KiB.  PSS splits the
    pages that forked processes share, so it is the fairer per-process cost.
    """
    result: dict[str, int | None] = {"rss_kib": None, "pss_kib": None}
    with contextlib.suppress(OSError):
        for line in (PROC / str(pid) / "status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                result["rss_kib"] = int(line.split()[1])
    with contextlib.suppress(OSError):
        for line in (PROC / str(pid) / "smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                result["pss_kib"] = int(line.split()[1])
    return result


def affinity(pid: int) -> list[int]:
    try:
        return sorted(os.sched_getaffinity(pid))
    except OSError:
        return []


def socketInodes(pid: int) -> set[int]:
    """
    The inodes of the sockets open in C{pid}, from the C{socket:[INODE]}
    links in /proc/PID/fd.
    """
    inodes = set()
    with contextlib.suppress(OSError):
        for fd in (PROC / str(pid) / "fd").iterdir():
            with contextlib.suppress(OSError):
                target = os.readlink(fd)
                if target.startswith("socket:["):
                    inodes.add(int(target[8:-1]))
    return inodes


def establishedServerInodes(port: int) -> set[int]:
    """
    Inodes of the established TCP sockets whose local port is C{port}: the
    server ends of the connections.  Connections still waiting in the
    accept queue have no inode (0) and so belong to nobody yet.
    """
    inodes = set()
    # Addresses are hex: HOST:PORT.  Checking for the port as text first
    # skips splitting the thousands of TIME_WAIT lines a churn run leaves.
    needle = f":{port:04X} "
    for table in ("tcp", "tcp6"):
        with contextlib.suppress(OSError):
            lines = (PROC / "net" / table).read_text().splitlines()[1:]
            for line in lines:
                if needle not in line:
                    continue
                fields = line.split()
                localPort = int(fields[1].rsplit(":", 1)[1], 16)
                if localPort == port and fields[3] == _TCP_ESTABLISHED and fields[9] != "0":
                    inodes.add(int(fields[9]))
    return inodes


def connectionsPerProcess(port: int, pids: list[int]) -> list[int]:
    """
    How many established connections to C{port} each of C{pids} holds.
    """
    established = establishedServerInodes(port)
    return [len(socketInodes(pid) & established) for pid in pids]
