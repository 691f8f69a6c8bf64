"""
What C{/proc} says of a worker process: its memory and its CPU time, for
C{--max-memory}, C{/metrics} and C{maccept-ctl status}; whether it is
stopped, for the log line of its kill; and what processes there are, for
a worker to end the children it leaves and for the testing kit.
"""

from __future__ import annotations

import os


def residentBytes(pid: int) -> int | None:
    """
    Resident set size of C{pid}; C{None} if it is gone.
    """
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, IndexError, ValueError):
        return None


def cpuSeconds(pid: int) -> float | None:
    """
    User plus system CPU time of C{pid}; C{None} if it is gone.
    """
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def liveProcesses() -> list[tuple[int, int, int]]:
    """
    C{(pid, parent pid, process group)} of every live process (zombies
    excluded).
    """
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z":
            found.append((int(entry), int(fields[1]), int(fields[2])))
    return found


def childrenOf(pid: int) -> list[int]:
    """
    Live processes whose parent is C{pid}.
    """
    return sorted(child for child, parent, _ in liveProcesses() if parent == pid)


def isStopped(pid: int) -> bool:
    """
    Whether C{pid} is stopped (C{SIGSTOP}, or a debugger): it answers no
    signal but C{SIGKILL} until it is continued.
    """
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("T", "t")
    except (OSError, IndexError):
        return False
