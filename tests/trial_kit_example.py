"""
The testing kit under trial, as a user's trial suite would use it.  Run by
C{tests/test_testing_kit.py} through C{python -m twisted.trial}, since
trial's asynchronous C{TestCase} spins the reactor itself.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import defer
from twisted.trial.unittest import TestCase

from maccept.testing import PoolStartError, startPool
from tests.test_testing_kit import echo


class TrialStyleTests(TestCase):
    @defer.inlineCallbacks
    def test_startPool(self) -> Any:
        """
        Under trial: start, echo, stop in cleanup; no dirty reactor.
        """
        pool = yield startPool(workers=1)
        self.addCleanup(pool.stop)
        received = yield echo(pool, b"trial")
        self.assertEqual(received, b"trial")
        self.assertEqual(len(pool.pids), 1)

    @defer.inlineCallbacks
    def test_startFailure(self) -> Any:
        """
        A pool whose workers cannot start fails with L{PoolStartError}
        carrying the worker's error, and leaves no process.
        """
        d = startPool(protocol="tests.sample_protocols:failsInWorker")
        error = yield self.assertFailure(d, PoolStartError)
        self.assertIn("boom in worker start-up", str(error))
