"""
Where a benchmark ran, and which CPUs the servers and the client get.

Numbers from different machines are not comparable, so every report carries
the CPU, kernel and software versions, and exactly how processes were pinned.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import _loadgen

REPO = Path(__file__).resolve().parent.parent


def parseCpus(text: str) -> set[int]:
    """
    Parse a CPU list as taskset and /sys write them: C{0-3,8,10-11}.
    """
    cpus: set[int] = set()
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        low, _, high = part.partition("-")
        cpus.update(range(int(low), int(high or low) + 1))
    if not cpus:
        raise ValueError(f"empty CPU list {text!r}")
    return cpus


def formatCpus(cpus: set[int] | list[int]) -> str:
    """
    The inverse of L{parseCpus}: C{{0, 1, 2, 5}} becomes C{0-2,5}.
    """
    ordered = sorted(cpus)
    if not ordered:
        return ""  # e.g. the affinity of a process already gone
    ranges: list[str] = []
    start = previous = ordered[0]
    for cpu in [*ordered[1:], None]:
        if cpu is not None and cpu == previous + 1:
            previous = cpu
            continue
        ranges.append(str(start) if start == previous else f"{start}-{previous}")
        if cpu is not None:
            start = previous = cpu
    return ",".join(ranges)


def smtSiblings(root: Path = Path("/sys/devices/system/cpu")) -> list[set[int]]:
    """
    The groups of CPUs that are hardware threads of one core, as the kernel
    reports them (a VM may hide that its CPUs are such threads).
    """
    groups: list[set[int]] = []
    for path in sorted(root.glob("cpu[0-9]*/topology/thread_siblings_list")):
        try:
            group = parseCpus(path.read_text().strip())
        except (OSError, ValueError):
            continue
        if len(group) > 1 and group not in groups:
            groups.append(group)
    return groups


def sharedCores(server: set[int], client: set[int], siblings: list[set[int]]) -> list[str]:
    """
    What the CPU split shares of a core: a server CPU whose sibling serves
    the client, or two server CPUs on one core, cost scaling that no server
    can win back.
    """
    notes = []
    for group in siblings:
        served, loaded = group & server, group & client
        if served and loaded:
            notes.append(
                f"server CPUs {formatCpus(served)} share a core with client CPUs "
                f"{formatCpus(loaded)}"
            )
        elif len(served) > 1:
            notes.append(f"server CPUs {formatCpus(served)} are threads of one core")
    return notes


@dataclass(frozen=True)
class Pinning:
    """
    The CPU sets of the servers and of the load generator.
    """

    server: set[int]
    client: set[int]

    @classmethod
    def choose(cls, server: str | None, client: str | None) -> Pinning:
        """
        Use the sets asked for, checked against the CPUs this process may
        use; by default split the usable CPUs in two halves, or share them
        all when there are fewer than four.
        """
        usable = os.sched_getaffinity(0)
        ordered = sorted(usable)
        half = len(ordered) // 2
        if len(ordered) >= 4:
            defaults = (set(ordered[:half]), set(ordered[half:]))
        else:
            defaults = (usable, usable)
        chosen = cls(
            parseCpus(server) if server else defaults[0],
            parseCpus(client) if client else defaults[1],
        )
        for name, cpus in (("server", chosen.server), ("client", chosen.client)):
            if not cpus <= usable:
                raise ValueError(
                    f"{name} CPUs {formatCpus(cpus - usable)} are not usable here "
                    f"(usable: {formatCpus(usable)})"
                )
        return chosen

    @property
    def overlap(self) -> set[int]:
        return self.server & self.client

    def describe(self, siblings: list[set[int]] | None = None) -> dict[str, Any]:
        overlap = self.overlap
        if overlap:
            note = (
                f"server and client sets overlap on CPUs {formatCpus(overlap)}: "
                "server and client compete for those cores, so absolute numbers are lower "
                "and scaling with workers is capped by the client"
            )
        else:
            note = "server and client sets are disjoint"
        if siblings is None:
            siblings = smtSiblings()
        shared = sharedCores(self.server, self.client, siblings)
        if shared:
            note += "; hardware threads: " + "; ".join(shared)
        elif not siblings:
            note += "; the kernel reports one thread per core"
        return {
            "server_cpus": formatCpus(self.server),
            "client_cpus": formatCpus(self.client),
            "overlap": formatCpus(overlap) if overlap else None,
            "method": (
                "os.sched_setaffinity(0, cpus) in each child between fork and exec "
                "(subprocess preexec_fn); server workers inherit the parent's set; the "
                "harness itself (polling logs and /proc) runs on the client CPUs"
            ),
            "note": note,
        }


def _cpuModel() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _version(distribution: str) -> str | None:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def _git(*args: str) -> str | None:
    try:
        done = subprocess.run(
            ["git", "-C", str(REPO), *args], capture_output=True, text=True, check=False
        )
    except OSError:
        return None  # no git where the run happens: the commit goes unnamed
    return done.stdout.strip() if done.returncode == 0 else None


def environment() -> dict[str, Any]:
    """
    The machine and software a run used.
    """
    # A copy without .git (a lent machine) names its commit in MACCEPT_COMMIT.
    commit = os.environ.get("MACCEPT_COMMIT")
    # benchmarks/ too, a changed harness or load generator changes the
    # numbers; not its results/, where this run may be writing.
    paths = ["maccept", "twisted", "benchmarks", ":(exclude)benchmarks/results"]
    dirty = "" if commit else _git("status", "--porcelain", "--", *paths)
    return {
        "cpu_model": _cpuModel(),
        "cpu_count": os.cpu_count(),
        "usable_cpus": formatCpus(os.sched_getaffinity(0)),
        "kernel": platform.release(),
        "machine": platform.machine(),
        "python": sys.version.split()[0],
        "python_implementation": platform.python_implementation(),
        "twisted": _version("twisted"),
        "uvloop": _version("uvloop"),
        "maccept": _version("maccept"),
        "maccept_commit": commit or _git("rev-parse", "--short", "HEAD"),
        "maccept_tree_dirty": bool(dirty) if dirty is not None else None,
        "cc": _loadgen.compilerVersion(),
        "loadavg_before": loadAverage(),
        "smt_siblings": [formatCpus(group) for group in smtSiblings()],
    }


def loadAverage() -> str:
    """
    The 1, 5 and 15 minute load averages: other work on the machine shows
    here, and skews every number of a run.
    """
    return " ".join(f"{x:.2f}" for x in os.getloadavg())
