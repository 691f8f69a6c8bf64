# -*- test-case-name: tests.test_lag -*-
"""
How late a worker's reactor runs: the C{lag} each heartbeat reports, and
C{maccept_worker_reactor_lag_seconds} shows.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.interfaces import IDelayedCall


class LagMeter:
    """
    How late the reactor runs a call it was asked to run C{interval}
    seconds from now: a blocked or overloaded reactor shows up here long
    before the watchdog fires.
    """

    interval = 0.25

    def __init__(self, reactor: Any) -> None:
        self.reactor = reactor
        self.worst = 0.0
        self._call: IDelayedCall | None = None

    def start(self) -> None:
        self._call = self.reactor.callLater(self.interval, self._tick, self.reactor.seconds())

    def _tick(self, scheduledAt: float) -> None:
        late = self.reactor.seconds() - scheduledAt - self.interval
        self.worst = max(self.worst, late)
        self.start()

    def worstSinceLastAsked(self) -> float:
        worst, self.worst = self.worst, 0.0
        return max(0.0, worst)

    def stop(self) -> None:
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None
