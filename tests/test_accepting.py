"""
Even accept: the load board and the governor that reads it, driven by a
L{Clock} and a fake listening port.
"""

from __future__ import annotations

import fcntl
import os

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from maccept._accepting import AcceptGovernor, allowance
from maccept._board import LoadBoard, countIndex, monotonicNs


class GovernedPort:
    """
    The parts of C{tcp.Port} the governor touches.
    """

    def __init__(self) -> None:
        self.reads = 0
        self.reading = True
        self.numberAccepts = 100

    def doRead(self) -> None:
        self.reads += 1

    def startReading(self) -> None:
        self.reading = True

    def stopReading(self) -> None:
        self.reading = False


def newBoard(test: SynchronousTestCase, slots: int) -> LoadBoard:
    board, fd = LoadBoard.create()
    os.close(fd)
    board.slotsInUse = slots
    test.addCleanup(board.close)
    return board


class AllowanceTests(SynchronousTestCase):
    def test_smallAndLarge(self) -> None:
        """
        One connection of slack for small shares, an eighth for large ones.
        """
        self.assertEqual([allowance(n) for n in (0, 7, 8, 64, 800)], [1, 1, 1, 8, 100])


class BoardTests(SynchronousTestCase):
    def test_descriptorNotInherited(self) -> None:
        """
        The parent's descriptor of the board is close-on-exec: a worker gets
        it through its C{childFDs}, and nothing else the parent starts (a
        new parent, on USR2) holds it.
        """
        board, fd = LoadBoard.create()
        self.addCleanup(board.close)
        self.addCleanup(os.close, fd)
        self.assertTrue(fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC)

    def test_freshSlots(self) -> None:
        """
        The slots posted since C{freshSince}: a stale slot, or one whose
        worker no longer accepts, is left out.
        """
        board = newBoard(self, 4)
        now = monotonicNs()
        board.post(0, 100, 50, now)
        board.post(1, 101, 0, now)
        board.post(2, 102, 20, now - 10**10)
        board.post(3, 103, 999, 0)
        self.assertEqual(board.freshSlots(now - 10**9), [0, 1])

    def test_connectionsAt(self) -> None:
        """
        The counts posted in the given slots, between them.
        """
        board = newBoard(self, 3)
        for slot, count in enumerate([5, 7, 11]):
            board.post(slot, 100 + slot, count, monotonicNs())
        self.assertEqual(board.connectionsAt([countIndex(0), countIndex(2)]), (2, 16))

    def test_clearedSlotLeftOut(self) -> None:
        """
        A slot the parent has cleared (its worker exited) holds no worker,
        whatever its timestamp said before.
        """
        board = newBoard(self, 2)
        board.post(0, 100, 5, monotonicNs())
        board.post(1, 101, 7, monotonicNs())
        board.clear(1)
        self.assertEqual(board.connectionsAt([countIndex(0), countIndex(1)]), (1, 5))

    def test_postCount(self) -> None:
        """
        Posting a count changes the count alone, not the pid or the
        timestamp that says the worker is alive.
        """
        board = newBoard(self, 2)
        board.post(1, 101, 3, 12345)
        board.postCount(1, 4)
        self.assertEqual(board.read(1), (101, 4, 12345))
        self.assertEqual(board.read(0), (0, 0, 0))
        self.assertEqual(board.connectionsAt([countIndex(1)]), (1, 4))


class GovernorTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.board = newBoard(self, 3)
        self.port = GovernedPort()
        self.governor = AcceptGovernor(self.clock, self.board, 0, 100)
        self.governor.govern(self.port)  # type: ignore[arg-type]
        self.governor.start()
        self.addCleanup(self.governor.stop)

    def others(self, *counts: int) -> None:
        """
        Post the other workers' counts, and let this worker look them up.
        """
        for slot, count in enumerate(counts, start=1):
            self.board.post(slot, 100 + slot, count, monotonicNs())
        self.clock.advance(AcceptGovernor.rescanInterval)

    def pauseAhead(self) -> None:
        """
        Put this worker two connections past its ceiling, and let it try
        to accept.
        """
        self.others(8, 8)
        self.governor.connectionsChanged(12)
        self.port.doRead()

    def test_aloneAcceptsFreely(self) -> None:
        """
        A worker alone accepts as Twisted would, with no limit set.
        """
        self.port.doRead()
        self.assertEqual((self.port.reads, self.port.numberAccepts), (1, 100))

    def test_budgetFromMean(self) -> None:
        """
        A worker level with the others' mean may take the allowance and
        one more; the budget is measured against the mean, not the fewest.
        """
        self.others(0, 20)
        self.governor.connectionsChanged(10)
        self.port.doRead()
        self.assertEqual((self.port.reads, self.port.numberAccepts), (1, 2))

    def test_aheadPauses(self) -> None:
        """
        A worker ahead of its allowance does not accept: it stops reading
        the listener and starts again after C{retryDelay}.
        """
        self.others(8, 8)
        self.governor.connectionsChanged(10)
        self.port.doRead()
        self.assertEqual(self.port.reads, 0)
        self.assertFalse(self.port.reading)
        self.clock.advance(AcceptGovernor.retryDelay)
        self.assertTrue(self.port.reading)
        self.assertEqual((self.governor.pausesAhead, self.governor.pausesFull), (1, 0))

    def test_resumesEarlyOnlyWithBudget(self) -> None:
        """
        A paused worker whose count changes resumes at once only if it
        may accept again; otherwise it waits out its pause.
        """
        self.pauseAhead()
        self.governor.connectionsChanged(11)
        self.assertFalse(self.port.reading)
        self.governor.connectionsChanged(9)
        self.assertTrue(self.port.reading)

    def test_countPostedAtOnce(self) -> None:
        """
        Every change of count is posted at once for the others to read.
        """
        self.governor.connectionsChanged(7)
        self.assertEqual(self.board.read(0)[1], 7)

    def test_othersLookedUpEveryRescanInterval(self) -> None:
        """
        A worker that starts counts once this one has looked up the live
        workers again, C{rescanInterval} after it last did.
        """
        self.port.doRead()
        self.board.post(1, 101, 30, monotonicNs())
        self.governor.connectionsChanged(10)
        self.port.doRead()
        self.assertEqual(self.port.numberAccepts, 100)
        self.clock.advance(AcceptGovernor.rescanInterval)
        self.port.doRead()
        self.assertEqual(self.port.numberAccepts, 30 + allowance(30) + 1 - 10)

    def test_countsReadAtOnce(self) -> None:
        """
        Between look-ups of who is alive, the others' counts are read as
        they are now.
        """
        self.others(8, 8)
        self.governor.connectionsChanged(10)
        self.port.doRead()
        self.assertEqual(self.port.reads, 0)
        self.governor.resume()
        self.board.postCount(1, 20)
        self.port.doRead()
        self.assertEqual((self.port.reads, self.port.numberAccepts), (1, 14 + 1 + 1 - 10))

    def test_stopLeavesTheBoard(self) -> None:
        """
        A stopped governor posts that it no longer accepts, so the others
        leave it out of their mean from their next look-up.
        """
        self.others(8, 8)
        self.governor.connectionsChanged(50)
        self.governor.stop()
        self.assertEqual(self.board.freshSlots(monotonicNs() - 10**9), [1, 2])

    def test_othersLeftOut(self) -> None:
        """
        Another worker that stops is left out of the mean from this one's
        next look-up; one that exits, as soon as the parent clears its slot.
        """
        self.others(8, 30)
        self.governor.connectionsChanged(5)
        self.assertEqual(self.governor.acceptBudget(), 19 + allowance(19) + 1 - 5)
        self.board.post(2, 102, 30, 0)
        self.assertEqual(self.governor.acceptBudget(), 19 + allowance(19) + 1 - 5)
        self.clock.advance(AcceptGovernor.rescanInterval)
        self.assertEqual(self.governor.acceptBudget(), 8 + allowance(8) + 1 - 5)
        self.board.clear(1)
        self.assertIsNone(self.governor.acceptBudget())

    def test_clockSetBack(self) -> None:
        """
        A wall clock set back does not keep this worker from looking again
        at which others are alive.
        """
        self.governor.acceptBudget()
        self.clock.rightNow -= 3600
        self.board.post(1, 101, 30, monotonicNs())
        self.governor.connectionsChanged(10)
        self.assertEqual(self.governor.acceptBudget(), 30 + allowance(30) + 1 - 10)

    def test_postAlive(self) -> None:
        """
        A count posted on a change leaves the timestamp; the worker posts
        that it is alive again every C{postInterval}, so that the others go on
        counting this worker.
        """
        posted = [self.board.read(0)[2]]
        self.governor.connectionsChanged(3)
        posted.append(self.board.read(0)[2])
        before = monotonicNs()
        self.clock.advance(AcceptGovernor.postInterval)
        posted.append(self.board.read(0)[2])
        self.assertEqual(posted[0], posted[1])
        self.assertGreaterEqual(posted[2], before)
        self.assertEqual(self.board.read(0)[1], 3)

    def test_oneRetryTimer(self) -> None:
        """
        A pause that ended early leaves its timer, and the next pause
        uses it rather than setting another: it ends when that fires.
        """
        self.pauseAhead()
        self.governor.connectionsChanged(9)
        self.assertTrue(self.port.reading)
        self.clock.advance(AcceptGovernor.retryDelay / 2)
        self.governor.connectionsChanged(12)
        self.port.doRead()
        self.assertFalse(self.port.reading)
        self.assertEqual(
            len(self.clock.getDelayedCalls()), 2
        )  # the retry, the post that it is alive
        self.clock.advance(AcceptGovernor.retryDelay / 2)
        self.assertTrue(self.port.reading)
        self.assertEqual(self.governor.pausesAhead, 2)


class MaxConcurrentTests(SynchronousTestCase):
    """
    C{--max-concurrent}, with no board (C{--balance greedy}) and with one.
    """

    def governed(self, board: LoadBoard | None = None) -> tuple[AcceptGovernor, GovernedPort]:
        self.clock = Clock()
        port = GovernedPort()
        governor = AcceptGovernor(self.clock, board, 0, 100, maxConcurrent=3)
        governor.govern(port)  # type: ignore[arg-type]
        governor.start()
        self.addCleanup(governor.stop)
        return governor, port

    def governedBesideAnIdleWorker(
        self,
    ) -> tuple[LoadBoard, AcceptGovernor, GovernedPort]:
        """
        A governed worker, and on the board one other with no connections.
        """
        board = newBoard(self, 2)
        board.post(1, 101, 0, monotonicNs())
        governor, port = self.governed(board)
        return board, governor, port

    def test_budgetIsTheRoomLeft(self) -> None:
        """
        Below the limit a worker may accept as many as fit.
        """
        governor, port = self.governed()
        governor.connectionsChanged(1)
        port.doRead()
        self.assertEqual((port.reads, port.numberAccepts), (1, 2))

    def test_fullPausesUntilAConnectionCloses(self) -> None:
        """
        At the limit the worker stops reading the listener with no retry
        timer, and reads again as soon as a connection closes.
        """
        governor, port = self.governed()
        governor.connectionsChanged(3)
        port.doRead()
        self.assertEqual(port.reads, 0)
        self.clock.advance(10)
        self.assertFalse(port.reading)
        governor.connectionsChanged(2)
        self.assertTrue(port.reading)
        self.assertEqual((governor.pausesAhead, governor.pausesFull), (0, 1))

    def test_fullThenAheadRetries(self) -> None:
        """
        A worker paused at the limit that, once below it, is still ahead of
        the others' mean goes back to retrying, so it is never stuck.
        """
        board, governor, port = self.governedBesideAnIdleWorker()
        governor.connectionsChanged(3)
        port.doRead()
        governor.connectionsChanged(2)
        self.assertFalse(port.reading)
        board.post(1, 101, 3, monotonicNs())
        self.clock.advance(AcceptGovernor.retryDelay)
        self.assertTrue(port.reading)

    def test_retryLeftFromAheadWaitsWhileFull(self) -> None:
        """
        A retry timer left from a pause that ended early does not wake the
        worker once it has accepted up to the limit and paused there: only
        a closing connection does.
        """
        board, governor, port = self.governedBesideAnIdleWorker()
        governor.connectionsChanged(2)
        port.doRead()
        governor.connectionsChanged(1)
        self.assertTrue(port.reading)
        board.postCount(1, 3)
        port.doRead()
        governor.connectionsChanged(2)
        governor.connectionsChanged(3)
        port.doRead()
        self.assertEqual((governor.pausesAhead, governor.pausesFull), (1, 1))
        self.clock.advance(AcceptGovernor.retryDelay)
        self.assertFalse(port.reading)
        governor.connectionsChanged(2)
        self.assertTrue(port.reading)
