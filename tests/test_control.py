"""
The control socket's answers (what C{maccept-ctl} asks), on a fake pool.
"""

from __future__ import annotations

from twisted.internet.testing import StringTransport
from twisted.logger import capturedLogs, formatEvent
from twisted.protocols import amp

from maccept._control import ControlError, ControlProtocol, controlFactory
from maccept._pool import WorkerPool
from maccept._states import PoolState
from tests.test_pool import PoolTestCase


class _UnsentTransport(StringTransport):
    """
    A transport whose writes all wait unsent, as a real one's do for a
    client that reads nothing.
    """

    _tempDataLen = 0

    @property
    def dataBuffer(self) -> bytes:
        held: bytes = self.value()
        return held


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
        # Each answer names the generation that carries it (reload --wait),
        # and whether it waits its turn (maccept-ctl says "queued").
        self.assertEqual(
            [control.reload(), control.reload()],
            [{"generation": 2, "queued": False}, {"generation": 3, "queued": True}],
        )
        for worker in pool.ofGeneration(2):
            worker.ready()
        self.reactor.advance(0)
        self.assertIs(pool.state, PoolState.RELOADING)
        self.assertEqual(pool.pendingGeneration, 3)
        pool.stopService()
        self.assertRaises(ControlError, control.reload)

    def test_scaleRefusedDuringUpgrade(self) -> None:
        """
        While a new parent is being started (USR2), which was told the size
        to run, scaling is refused, by maccept-ctl and by TTIN alike, rather
        than done here and lost.
        """
        pool = self.readyPool(2)
        pool.upgrading = lambda: "an upgrade (USR2) is under way"
        control = self.connect(pool, [])
        with capturedLogs() as events, self.assertRaises(ControlError) as caught:
            control.scale(workers=4)
        self.assertIn("upgrade (USR2) is under way", str(caught.exception))
        # Logged, as TTIN and TTOU log theirs.
        self.assertIn(
            "scaling to 4 ignored: an upgrade (USR2) is under way",
            [formatEvent(event) for event in events],
        )
        pool.scaleUp()
        self.assertEqual((pool.size, len(pool.workers)), (2, 2))

    def test_reloadRefusedDuringUpgrade(self) -> None:
        """
        So is a reload, by maccept-ctl and by HUP alike: the new parent
        imports the code anew itself, and a generation started here would
        be drained as soon as it took over.
        """
        pool = self.readyPool(2)
        pool.upgrading = lambda: "an upgrade (USR2) is under way"
        control = self.connect(pool, [])
        with capturedLogs() as events:
            with self.assertRaises(ControlError) as caught:
                control.reload()
            self.assertIsNone(pool.reload())  # HUP
        self.assertEqual(str(caught.exception), "cannot reload: an upgrade (USR2) is under way")
        self.assertEqual(
            [formatEvent(event) for event in events],
            ["reload ignored: an upgrade (USR2) is under way"] * 2,
        )
        self.assertEqual((pool.state, pool.generation), (PoolState.RUNNING, 1))
        self.assertEqual(len(pool.workers), 2)

    def test_unreadAnswersCut(self) -> None:
        """
        A client that sends commands and reads none of the answers is
        closed, logged, once more than C{maxUnreadBytes} of them wait: the
        parent would keep them all.
        """
        pool = self.readyPool(1)
        control = self.connect(pool, [])
        transport = _UnsentTransport()
        control.makeConnection(transport)
        control.maxUnreadBytes = 4096
        status = amp.AmpBox(_command=b"Status", _ask=b"1").serialize()
        with capturedLogs() as events:
            for _ in range(1000):  # a bound: far more answers than the limit holds
                if transport.disconnecting:
                    break
                control.dataReceived(status)
        self.assertTrue(transport.disconnecting)
        self.assertGreater(len(transport.value()), 4096)
        self.assertEqual(
            [formatEvent(e) for e in events],
            [
                "over 4096 bytes of answers left unread on the control socket:"
                " closing that connection"
            ],
        )

    def test_endlessCommandCut(self) -> None:
        """
        A command that never ends (key/value pairs without the empty key
        that closes an AMP box) is cut off past C{maxCommandBytes}, logged:
        AMP would keep every pair.  Commands of any number, each small,
        are answered.
        """
        pool = self.readyPool(1)
        control = self.connect(pool, [])
        transport = StringTransport()
        control.makeConnection(transport)
        status = amp.AmpBox(_command=b"Status", _ask=b"1").serialize()
        for _ in range(control.maxCommandBytes // len(status) + 10):
            control.dataReceived(status)
        self.assertIn(b"_answer", transport.value())
        self.assertFalse(transport.disconnecting)
        pair = amp.AmpBox(key=b"v" * 1000).serialize()[:-2]  # without the box's end
        with capturedLogs() as events:
            for _ in range(control.maxCommandBytes // len(pair) + 2):
                control.dataReceived(pair)
        self.assertTrue(transport.disconnecting)
        self.assertIn("a command over 65536 bytes", formatEvent(events[0]))
