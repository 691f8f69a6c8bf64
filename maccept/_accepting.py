# -*- test-case-name: tests.test_accepting -*-
"""
Even accept: a worker takes a connection only while it holds no more than
its share.

Left alone, every worker's epoll wakes for each new connection and
C{tcp.Port.doRead} accepts up to a hundred at a time, so whichever worker
runs first takes a whole burst (256 connections on 4 workers of the plain
recipe once landed as 1, 1, 43 and 211).  The
governor runs before each C{doRead}: it compares this worker's open
connections with the mean held by the other live, accepting workers (from
the L{LoadBoard}), lets it accept only as many as keep it within a small
allowance above that, and otherwise stops reading the listener for a
moment, so that the kernel wakes the others instead.

The mean, not the fewest: under connection churn every worker's count
swings, and the fewest of seven swinging counts sits well below their
mean, so comparing with it kept most workers paused: 80k connections a
second at 8 workers against 129k greedy; the mean gave 100k (README.rst,
Even load).  A burst of long-lived connections still lands within a few
percent: a worker that lags pulls the mean down until it has caught up.

The same governor enforces C{--max-concurrent}: at the limit a worker stops
reading the listener until one of its connections closes, so connections
wait in the kernel's backlog rather than being accepted and dropped.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.interfaces import IDelayedCall, IListeningPort
from twisted.internet.task import LoopingCall

from maccept._board import LoadBoard, countIndex, monotonicNs


def allowance(share: int) -> int:
    """
    How far ahead of the others' mean (rounded down) a worker may get,
    besides one connection more: one when counts are small, an eighth of
    the mean when they are large.
    """
    return max(1, share // 8)


class AcceptGovernor:
    """
    Decides, before each accept, whether this worker takes the next
    connections, and posts its own count for the others.

    Under churn this runs several times per connection, on every worker,
    so it does as little as it can there: it posts only its count, reads
    only the others' counts (which workers are alive it looks up every
    C{rescanInterval}), and leaves a pending retry timer to fire rather
    than cancel it (README, Even load).

    @ivar freshness: seconds after which another worker's post no longer
        counts (it is hung, stopped or gone).
    """

    freshness = 1.0
    #: How often a worker posts that it is alive.
    postInterval = 0.25
    #: How often a worker looks again at which others are alive: one that
    #: starts counts within this, one that stops within this of its stop,
    #: one that hangs within C{freshness} and this; one that exits is left
    #: out as soon as the parent clears its slot.
    rescanInterval = 0.01
    #: How long a worker that got ahead stops reading the listener, at
    #: most.  Short: in a burst every worker gets ahead by a step in turn,
    #: and with 5 ms the last of 256 connections was served 29 to 40 ms
    #: after the last connect, against 0.6 to 3.3 ms with Twisted's own
    #: loop; with 1 ms, 0.7 to 3.8 ms, the balance and the CPU per churned
    #: connection the same (README, Even load).
    retryDelay = 0.001

    def __init__(
        self,
        reactor: Any,
        board: LoadBoard | None,
        slot: int,
        pid: int,
        maxConcurrent: int | None = None,
    ) -> None:
        self.reactor = reactor
        self.board = board
        self.maxConcurrent = maxConcurrent
        self.slot = slot
        self.pid = pid
        self.openConnections = 0
        self.ports: list[IListeningPort] = []
        self.paused = False
        #: Times this worker stopped reading its listeners because it was
        #: ahead of the others (C{--balance even})...
        self.pausesAhead = 0
        #: ... or at C{--max-concurrent}.
        self.pausesFull = 0
        self._accepting = False
        #: Where on the board the counts of the other live workers are.
        self._others: list[int] = []
        self._rescanAt = 0.0
        self._retry: IDelayedCall | None = None
        self._poster = LoopingCall(self.postAlive)
        self._poster.clock = reactor

    def govern(self, port: IListeningPort) -> None:
        """
        Put C{port}'s accepts under this governor.
        """
        self.ports.append(port)
        port.doRead = self._governed(port.doRead, port)  # type: ignore[attr-defined]

    def _governed(self, doRead: Callable[[], None], port: Any) -> Callable[[], None]:
        def governedDoRead() -> None:
            budget = self.acceptBudget()
            if budget == 0:
                # At the limit only a closing connection makes room: no retry.
                self.pause(retry=not self.full)
                return
            if budget is not None:
                port.numberAccepts = budget
            doRead()

        return governedDoRead

    def acceptBudget(self) -> int | None:
        """
        How many connections this worker may accept now: C{None} for no
        limit (no other worker accepts, and no C{maxConcurrent}), else 0 or
        more.
        """
        budget = None
        if self.board is not None:
            now = self.reactor.seconds()
            # Also when the clock has been set back, which would otherwise
            # keep an old view of who is alive for as long as the step.
            if now >= self._rescanAt or now < self._rescanAt - self.rescanInterval:
                self._rescan(self.board, now)
            workers, connections = self.board.connectionsAt(self._others)
            if workers:
                share = connections // workers
                budget = max(0, share + allowance(share) + 1 - self.openConnections)
        if self.maxConcurrent is not None:
            room = max(0, self.maxConcurrent - self.openConnections)
            budget = room if budget is None else min(budget, room)
        return budget

    @property
    def full(self) -> bool:
        """
        Whether this worker holds C{maxConcurrent} connections.
        """
        return self.maxConcurrent is not None and self.openConnections >= self.maxConcurrent

    def start(self) -> None:
        self._accepting = True
        self._poster.start(self.postInterval, now=True)

    def stop(self) -> None:
        """
        Stop accepting for good: tell the others to leave us out.
        """
        self._accepting = False
        if self._poster.running:
            self._poster.stop()
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
        self._retry = None
        self.postAlive()

    def connectionsChanged(self, count: int) -> None:
        """
        Post the new count; a paused worker resumes early once it may
        accept again.
        """
        self.openConnections = count
        if self.board is not None:
            self.board.postCount(self.slot, count)
        if self.paused and self._accepting:
            if self.acceptBudget() != 0:
                self.resume()
            elif not self.full and self._retry is None:
                # Paused at the limit, now only ahead of the others: retry.
                self._retry = self.reactor.callLater(self.retryDelay, self._retryNow)

    def postAlive(self) -> None:
        """
        Post this worker's whole slot: alive and accepting, or no longer.
        """
        if self.board is None:
            return
        postedAt = monotonicNs() if self._accepting else 0
        self.board.post(self.slot, self.pid, self.openConnections, postedAt)

    def _rescan(self, board: LoadBoard, now: float) -> None:
        """
        Look up where the counts of the other live workers are.
        """
        self._rescanAt = now + self.rescanInterval
        freshSince = monotonicNs() - int(self.freshness * 1e9)
        self._others = [
            countIndex(other) for other in board.freshSlots(freshSince) if other != self.slot
        ]

    def pause(self, retry: bool = True) -> None:
        """
        Stop reading the listeners: for at most C{retryDelay}, or with
        C{retry} false until a connection closes.
        """
        if self.paused:
            return
        self.paused = True
        if self.full:
            self.pausesFull += 1
        else:
            self.pausesAhead += 1
        for port in self.ports:
            port.stopReading()  # type: ignore[attr-defined]
        if retry and self._retry is None:
            # A timer left from an earlier pause that ended early ends this
            # one sooner: cheaper than a cancel and a new timer each time.
            self._retry = self.reactor.callLater(self.retryDelay, self._retryNow)

    def _retryNow(self) -> None:
        """
        The retry timer fired: accept again, unless at C{maxConcurrent}
        (the timer may be left from an earlier pause that was only ahead),
        where only a closing connection makes room.
        """
        self._retry = None
        if not self.full:
            self.resume()

    def resume(self) -> None:
        """
        Read the listeners again (not once stopped for good).
        """
        if not self.paused or not self._accepting:
            return
        self.paused = False
        for port in self.ports:
            port.startReading()  # type: ignore[attr-defined]
