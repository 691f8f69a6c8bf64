# -*- test-case-name: tests.test_tally -*-
"""
Counting what a bad client or a full process makes happen, in the log at
most once an interval: one line per event would let anyone who can
connect, or forge a datagram, flood the log (error lines are never
dropped on their way to the parent).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

from twisted.logger import Logger


class Tally:
    """
    Adds up events and logs a line about them, with how many came since
    the last line, at most every C{interval} seconds.

    @ivar total: every event counted, for metrics.
    """

    def __init__(
        self,
        log: Logger,
        line: str,
        interval: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
        level: str = "warn",
    ) -> None:
        self.log = log
        self.line = line
        #: The log level of its lines: C{warn}, or C{info} for what is
        #: routine but worth seeing.
        self.level = level
        self.interval = interval
        self.clock = clock
        self.total = 0
        self.unlogged = 0
        self._lastLine = -math.inf

    def add(self, count: int = 1, **fields: Any) -> None:
        """
        Count C{count} events; C{fields} fill the line (with C{count}).
        """
        self.total += count
        self.unlogged += count
        now = self.clock()
        if now - self._lastLine < self.interval:
            return
        self._lastLine = now
        getattr(self.log, self.level)(self.line, count=self.unlogged, **fields)
        self.unlogged = 0
