"""
A tally: every event counted, at most one log line an interval.
"""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.logger import Logger, capturedLogs, formatEvent
from twisted.trial.unittest import SynchronousTestCase

from maccept._tally import Tally


class TallyTests(SynchronousTestCase):
    def test_oneLineAnInterval(self) -> None:
        """
        The first event is logged at once; those within the interval after
        it only counted, and the next line says how many came since.
        """
        clock = Clock()
        tally = Tally(Logger(), "{count} dropped, the last from {peer}", 10.0, clock.seconds)
        with capturedLogs() as events:
            tally.add(peer="a")
            tally.add(3, peer="b")
            clock.advance(9.9)
            tally.add(peer="c")
            clock.advance(0.1)
            tally.add(peer="d")
        self.assertEqual(
            [formatEvent(e) for e in events],
            ["1 dropped, the last from a", "5 dropped, the last from d"],
        )
        self.assertEqual((tally.total, tally.unlogged), (6, 0))
