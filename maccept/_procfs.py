"""
What C{/proc} says of a worker process: its memory and its CPU time, for
C{--max-memory}, C{/metrics} and C{maccept-ctl status}; whether it is
stopped, for the log line of its kill.
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
