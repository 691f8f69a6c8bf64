# -*- test-case-name: tests.test_lag -*-
"""
Tests for L{maccept._lag}.
"""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from maccept._lag import LagMeter


class LagMeterTests(SynchronousTestCase):
    def test_onTime(self) -> None:
        """
        A reactor that runs every call when it is due shows no lag.
        """
        clock = Clock()
        meter = LagMeter(clock)
        meter.start()
        clock.pump([meter.interval] * 8)
        self.assertEqual(meter.worstSinceLastAsked(), 0.0)

    def test_worstSinceLastAsked(self) -> None:
        """
        The meter reports the latest a call ran since it was last asked,
        and asking starts the count again.
        """
        clock = Clock()
        meter = LagMeter(clock)
        meter.start()
        clock.advance(meter.interval + 0.5)
        clock.advance(meter.interval + 0.1)
        self.assertAlmostEqual(meter.worstSinceLastAsked(), 0.5)
        clock.advance(meter.interval + 0.2)
        self.assertAlmostEqual(meter.worstSinceLastAsked(), 0.2)

    def test_stop(self) -> None:
        """
        A stopped meter leaves no call behind, and stopping twice is harmless.
        """
        clock = Clock()
        meter = LagMeter(clock)
        meter.start()
        meter.stop()
        meter.stop()
        self.assertEqual(clock.getDelayedCalls(), [])
