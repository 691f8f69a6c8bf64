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
        factory = controlFactory(pool, lambda: stops.append(1))
        protocol = factory.buildProtocol(None)
        assert isinstance(protocol, ControlProtocol)
        return protocol

    def test_stopOnce(self) -> None:
        """
        A second stop, even one that comes before the reactor turns (two
        clients, a retry), is refused: it would be the second TERM, which
        kills the workers.
        """
        pool = self.readyPool(1)
        stops: list[int] = []
        control = self.connect(pool, stops)
        control.stopPool()
        self.assertRaises(ControlError, control.stopPool)
        self.reactor.advance(0)
        self.assertEqual(stops, [1])

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
