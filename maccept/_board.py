# -*- test-case-name: tests.test_accepting -*-
"""
The load board: a page of shared memory where every worker posts how many
connections it holds, so that each can see whether it is ahead of the
others before it accepts another one.

The parent creates the page (an anonymous C{memfd}) and hands it to every
worker as one more descriptor.  Each worker writes only its own slot; the
parent writes only the header.  A torn read costs at most one accept
decision, so no lock is taken.
"""

from __future__ import annotations

import mmap
import os
import struct
import time

#: Header: how many slots are in use (the parent raises it as it spawns).
_HEADER = struct.Struct("=I")
#: Slot: pid, open connections, last post while accepting (monotonic ns; 0 = not accepting).
_SLOT = struct.Struct("=iIq")

MAX_SLOTS = 1024
#: The most workers a pool runs: a reload runs two generations at once, and
#: a worker draining for its graceful timeout still holds its slot.
MAX_WORKERS = MAX_SLOTS // 2
SIZE = _HEADER.size + _SLOT.size * MAX_SLOTS


def monotonicNs() -> int:
    """
    C{CLOCK_MONOTONIC} is one clock for the whole machine, so timestamps
    posted by one process mean the same to another.
    """
    return time.monotonic_ns()


class LoadBoard:
    """
    A view of the shared page.
    """

    def __init__(self, memory: mmap.mmap) -> None:
        self._memory = memory

    @classmethod
    def create(cls) -> tuple[LoadBoard, int]:
        """
        Make a new, zeroed board; return it and the descriptor to hand on.
        """
        fd = os.memfd_create("maccept-board", 0)
        os.ftruncate(fd, SIZE)
        return cls(mmap.mmap(fd, SIZE)), fd

    @classmethod
    def attach(cls, fd: int) -> LoadBoard:
        """
        Map the board a parent handed over at C{fd}, then close C{fd}.
        """
        board = cls(mmap.mmap(fd, SIZE))
        os.close(fd)
        return board

    @property
    def slotsInUse(self) -> int:
        return int(_HEADER.unpack_from(self._memory, 0)[0])

    @slotsInUse.setter
    def slotsInUse(self, count: int) -> None:
        _HEADER.pack_into(self._memory, 0, min(count, MAX_SLOTS))

    def post(self, slot: int, pid: int, openConnections: int, postedAt: int) -> None:
        """
        Post a worker's count; C{postedAt} is now while it accepts, or 0
        once it no longer does.
        """
        _SLOT.pack_into(
            self._memory, _HEADER.size + slot * _SLOT.size, pid, openConnections, postedAt
        )

    def read(self, slot: int) -> tuple[int, int, int]:
        """
        C{(pid, open connections, posted at)} of C{slot}.
        """
        pid, count, postedAt = _SLOT.unpack_from(self._memory, _HEADER.size + slot * _SLOT.size)
        return pid, count, postedAt

    def clear(self, slot: int) -> None:
        self.post(slot, 0, 0, 0)

    def loadElsewhere(self, slot: int, freshSince: int) -> tuple[int, int] | None:
        """
        How many other workers accept and have posted since C{freshSince},
        and the open connections they hold between them; C{None} if there
        is no such worker (it is alone, or the others are stopped, hung or
        draining).
        """
        workers = connections = 0
        memory, offset, size = self._memory, _HEADER.size, _SLOT.size
        for other in range(self.slotsInUse):
            if other == slot:
                continue
            _, count, postedAt = _SLOT.unpack_from(memory, offset + other * size)
            if postedAt >= freshSince:
                workers += 1
                connections += count
        return (workers, connections) if workers else None

    def close(self) -> None:
        self._memory.close()
