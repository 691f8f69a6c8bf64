# -*- test-case-name: tests.test_affinity -*-
"""
C{--cpu-affinity}: one CPU per worker, as nginx's C{worker_cpu_affinity}.

Left to the scheduler, a worker that sleeps in C{epoll_wait} may wake on
another CPU than the one whose caches hold its connections, and two busy
workers may share a CPU for a while.  Pinned, worker N always runs on the
N-th CPU of the list, in turn: the pool's workers spread over the CPUs
whatever the scheduler would have done.  A replacement keeps its slot's
CPU, so a reload or a recycle does not move the load.

C{auto} takes one hardware thread of every core before a second thread of
any: two workers on the two threads of one core share its execution units
while another core idles, and machines (virtual ones especially) often
number a core's threads next to each other (0 and 1), so plain CPU order
would do just that.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path

#: Where the kernel describes each CPU's topology.
SYS_CPUS = Path("/sys/devices/system/cpu")


def availableCPUs() -> tuple[int, ...]:
    """
    The CPUs this process may run on (its affinity, as C{taskset} or a
    cgroup left it), in order.
    """
    try:
        return tuple(sorted(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return tuple(range(os.cpu_count() or 1))


def coresFirst(cpus: Iterable[int], sysCpus: Path = SYS_CPUS) -> tuple[int, ...]:
    """
    C{cpus} ordered so that each core's first thread (among C{cpus}) comes
    before any core's second: by the CPU's rank among its core's threads,
    then by number.  A CPU whose topology the kernel does not show counts
    as a core of its own.
    """
    chosen = set(cpus)
    rank = {}
    for cpu in chosen:
        try:
            text = (sysCpus / f"cpu{cpu}" / "topology" / "thread_siblings_list").read_text()
            siblings = sorted(set(_cpuList(text)) & chosen) or [cpu]
        except (OSError, ValueError):
            siblings = [cpu]
        rank[cpu] = siblings.index(cpu) if cpu in siblings else 0
    return tuple(sorted(chosen, key=lambda cpu: (rank[cpu], cpu)))


def _cpuList(text: str) -> list[int]:
    """
    A kernel CPU list (C{0-3,8}) as CPU numbers.
    """
    cpus: list[int] = []
    for part in text.strip().split(","):
        first, dash, last = part.partition("-")
        cpus.extend(range(int(first), int(last if dash else first) + 1))
    return cpus


def parseCPUs(value: str, available: Iterable[int], sysCpus: Path = SYS_CPUS) -> tuple[int, ...]:
    """
    C{auto} (every CPU this process may run on, one thread of each core
    first) or a CPU list such as C{0-3,8} (as C{taskset -c} takes), in the
    order given; every CPU must be one this process may run on.

    @raise ValueError: with the line to show the user.
    """
    allowed = sorted(set(available))
    if value == "auto":
        return coresFirst(allowed, sysCpus)
    allowedSet = set(allowed)
    cpus: list[int] = []
    seen: set[int] = set()
    for part in value.split(","):
        first, dash, last = part.strip().partition("-")
        try:
            low = int(first)
            high = int(last) if dash else low
        except ValueError:
            raise ValueError(
                f"expected 'auto' or a CPU list such as 0-3,8, got {value!r}"
            ) from None
        if low < 0 or high < low:
            raise ValueError(f"{part.strip()!r} is not a CPU range")
        # Check before listing: a typo such as 0-99999999 must not take long.
        missing = next((cpu for cpu in range(low, high + 1) if cpu not in allowedSet), None)
        if missing is not None:
            raise ValueError(
                f"CPU {missing} is not one this process may run on "
                f"(those are {describeCPUs(allowed)})"
            )
        for cpu in range(low, high + 1):
            if cpu not in seen:
                seen.add(cpu)
                cpus.append(cpu)
    return tuple(cpus)


def describeCPUs(cpus: Sequence[int]) -> str:
    """
    C{[0, 1, 2, 5]} as C{0-2,5}.
    """
    ranges: list[str] = []
    for cpu in sorted(cpus):
        if ranges and cpu == int(ranges[-1].rpartition("-")[2]) + 1:
            ranges[-1] = f"{ranges[-1].partition('-')[0]}-{cpu}"
        else:
            ranges.append(str(cpu))
    return ",".join(ranges)


def cpuForWorker(number: int, cpus: Sequence[int]) -> int | None:
    """
    The CPU worker C{number} (counting from 1) runs on: the list in turn.
    """
    if not cpus:
        return None
    return cpus[(number - 1) % len(cpus)]


def pinTo(cpu: int) -> None:
    """
    Run the calling process on C{cpu} only.
    """
    os.sched_setaffinity(0, {cpu})
