# -*- test-case-name: tests.test_accepting -*-
"""
The load board: a page of shared memory where every worker posts how many
connections it holds, so that each can see whether it is ahead of the
others before it accepts another one.

The parent creates the page (an anonymous C{memfd}) and hands it to every
worker as one more descriptor.  Each worker writes only its own slot; the
parent writes the header, and clears a slot when its worker has exited and
before it hands the slot to a new one.  No lock is taken: a count is one
aligned word, and a torn read of a slot's timestamp costs at most a reader's
view of who is alive until it looks again (10 ms, see
L{AcceptGovernor.rescanInterval}).
"""

from __future__ import annotations

import mmap
import os
import struct
import time

#: Header: how many slots are in use (the parent raises it as it spawns,
#: and lowers it as the highest slots are freed).
_HEADER = struct.Struct("=I")
#: Slot: pid, open connections, last post while accepting (monotonic ns; 0 = not accepting).
_SLOT = struct.Struct("=iIq")
#: Where the count sits in a slot: after the pid, 32-bit aligned, so that
#: it can be written as one word (see L{LoadBoard.postCount}).
_COUNT_OFFSET = 4

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

    A worker posts its count on every connection it opens or closes, and
    reads the others' before every accept: under churn that is several
    times per connection, so those two touch 32-bit words through a
    C{memoryview} rather than packing and unpacking whole slots.  The
    timestamps that say who is alive change four times a second, and each
    worker reads them every 10 ms (L{freshSlots}).
    """

    def __init__(self, memory: mmap.mmap) -> None:
        self._memory = memory
        self._words = memoryview(memory).cast("I")

    @classmethod
    def create(cls) -> tuple[LoadBoard, int]:
        """
        Make a new, zeroed board; return it and the descriptor to hand on.
        """
        fd = os.memfd_create("maccept-board", os.MFD_CLOEXEC)  # workers get it by childFDs
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
        Post a worker's whole slot; C{postedAt} is now while it accepts, or
        0 once it no longer does.
        """
        _SLOT.pack_into(
            self._memory, _HEADER.size + slot * _SLOT.size, pid, openConnections, postedAt
        )

    def postCount(self, slot: int, openConnections: int) -> None:
        """
        Post only a worker's count, leaving its pid and timestamp.
        """
        self._words[countIndex(slot)] = openConnections

    def read(self, slot: int) -> tuple[int, int, int]:
        """
        C{(pid, open connections, posted at)} of C{slot}.
        """
        pid, count, postedAt = _SLOT.unpack_from(self._memory, _HEADER.size + slot * _SLOT.size)
        return pid, count, postedAt

    def clear(self, slot: int) -> None:
        self.post(slot, 0, 0, 0)

    def freshSlots(self, freshSince: int) -> list[int]:
        """
        The slots posted since C{freshSince}: the workers that accept (not
        stopped, hung or draining).
        """
        memory, offset, size = self._memory, _HEADER.size, _SLOT.size
        return [
            slot
            for slot in range(self.slotsInUse)
            if _SLOT.unpack_from(memory, offset + slot * size)[2] >= freshSince
        ]

    def connectionsAt(self, indices: list[int]) -> tuple[int, int]:
        """
        How many of the slots whose counts are at C{indices} (from
        L{countIndex}) still hold a worker, and the open connections they
        post between them.  A slot the parent has cleared (its worker
        exited) is left out at once, without waiting for its timestamp to
        go stale.
        """
        words = self._words
        # The pid is the word before the count.
        counts = [words[index] for index in indices if words[index - 1]]
        return len(counts), sum(counts)

    def close(self) -> None:
        self._words.release()
        self._memory.close()


def countIndex(slot: int) -> int:
    """
    Where C{slot}'s count is, in 32-bit words from the start of the page.
    """
    return (_HEADER.size + slot * _SLOT.size + _COUNT_OFFSET) // 4
