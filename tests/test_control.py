"""
The control socket's answers (what C{maccept-ctl} asks), on a fake pool.
"""

from __future__ import annotations

from maccept._control import ControlError, ControlProtocol, controlFactory
from maccept._pool import WorkerPool
from maccept._states import PoolState
from tests.test_pool import PoolTestCase


class ControlTests(PoolTestCase):
    def connect(self, pool: WorkerPool, stops: list[int]) -> ControlProtocol:
        def stop() -> bool:
            stops.append(1)
            return len(stops) == 1

        factory = controlFactory(pool, stop)
        protocol = factory.buildProtocol(None)
        assert isinstance(protocol, ControlProtocol)
        return protocol

    def test_stopRefused(self) -> None:
        """
        A stop the service refuses (one is asked for already: see
        L{MacceptService.stopFromControl}) is an error answer.
        """
        pool = self.readyPool(1)
        stops: list[int] = []
        control = self.connect(pool, stops)
        control.stopPool()
        self.assertRaises(ControlError, control.stopPool)

    def test_reloadQueuedAsHUP(self) -> None:
        """
        A reload asked for during a reload is queued, as a HUP is; during
        a stop it is refused.
        """
        pool = self.readyPool(1)
        stops: list[int] = []
        control = self.connect(pool, stops)
        control.reload()
        control.reload()
        for worker in pool.ofGeneration(2):
            worker.ready()
        self.reactor.advance(0)
        self.assertIs(pool.state, PoolState.RELOADING)
        self.assertEqual(pool.pendingGeneration, 3)
        pool.stopService()
        self.assertRaises(ControlError, control.reload)
