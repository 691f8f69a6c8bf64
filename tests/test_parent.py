"""
The parent service's stop requests (SIGTERM, SIGINT, C{maccept-ctl stop}).
"""

from __future__ import annotations

import signal
from typing import Any

from twisted.internet.error import ReactorNotRunning
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase

from maccept._parent import SAME_STOP_WINDOW, MacceptService
from maccept._states import PoolState
from maccept._tap import _onFatal


class RecordingPool:
    def __init__(self) -> None:
        self.killed = 0
        self.state = PoolState.RUNNING

    def killAll(self) -> None:
        self.killed += 1

    def announceStop(self) -> None:
        self.stopAnnounced = True

    def reload(self) -> None:
        pass

    def handOver(self) -> None:
        self.handedOver = True

    def scaleUp(self) -> None:
        pass

    def scaleDown(self) -> None:
        pass


class StoppingReactor(MemoryReactorClock):
    """
    As Twisted's reactor: C{running} until the shutdown's triggers have
    run, C{stop()} refused once the shutdown began.
    """

    def __init__(self) -> None:
        super().__init__()
        self.running = True
        self.stops = 0
        self.stopped = False

    def stop(self) -> None:
        if self.stopped:
            raise ReactorNotRunning("stop() on a reactor already stopping")
        self.stopped = True
        self.stops += 1
        for trigger, args, kwargs in self.triggers.get("before", {}).get("shutdown", []):
            trigger(*args, **kwargs)


class RecordingUpgrade:
    takenOver = False

    def __init__(self) -> None:
        self.abandoned = 0

    def abandon(self) -> None:
        self.abandoned += 1

    def start(self) -> None:
        pass


class RequestStopTests(SynchronousTestCase):
    def service(self) -> tuple[MacceptService, StoppingReactor, RecordingPool]:
        reactor, pool = StoppingReactor(), RecordingPool()
        standIn: Any = pool
        upgrade: Any = RecordingUpgrade()
        return MacceptService(reactor, [], standIn, upgrade), reactor, pool

    def test_firstStopsSecondKills(self) -> None:
        """
        The first request stops the reactor (the pool then drains); a second
        one kills every worker.
        """
        service, reactor, pool = self.service()
        service.requestStop()
        self.assertEqual((reactor.stops, pool.killed), (1, 0))
        reactor.advance(SAME_STOP_WINDOW)
        service.requestStop()
        self.assertEqual((reactor.stops, pool.killed), (1, 1))

    def test_sameStopWithinTheWindow(self) -> None:
        """
        A request within L{SAME_STOP_WINDOW} of the first is the same one
        arriving twice (a signal to the process group, and the old parent's
        TERM to a new parent): no kill.  One after it kills.
        """
        service, reactor, pool = self.service()
        service.requestStop()
        reactor.advance(SAME_STOP_WINDOW / 2)
        service.requestStop()
        self.assertEqual((reactor.stops, pool.killed), (1, 0))
        reactor.advance(SAME_STOP_WINDOW / 2)
        service.requestStop()
        self.assertEqual((reactor.stops, pool.killed), (1, 1))

    def test_handOverIsNotTheOperatorsStop(self) -> None:
        """
        Once a new parent has taken over, the old one drains; the operator's
        next request (gunicorn's USR2, then TERM to the old parent) is not
        taken for a second one: the one after it kills.
        """
        service, reactor, pool = self.service()
        service.stopDelay = 5.0
        service.handOver()
        self.assertEqual(reactor.stops, 1)  # no --stop-delay: the new parent serves
        self.assertTrue(pool.handedOver)  # /healthz stays 200
        reactor.advance(SAME_STOP_WINDOW)
        service.requestStop()
        self.assertEqual((reactor.stops, pool.killed), (1, 0))
        reactor.advance(SAME_STOP_WINDOW)
        service.requestStop()
        self.assertEqual((reactor.stops, pool.killed), (1, 1))

    def test_quitStopsAndUsr1Ends(self) -> None:
        """
        QUIT stops gracefully, as TERM; USR1, which twistd takes only to
        rotate its --logfile, is answered with a log line when twistd has
        no handler for it (by default it would end the parent).
        """
        service = self.service()[0]
        self.assertEqual(service.signalHandlers()[signal.SIGQUIT], service.requestStop)
        self.patch(signal, "getsignal", lambda number: signal.SIG_DFL)
        self.assertIn(signal.SIGUSR1, service.signalHandlers())
        self.patch(signal, "getsignal", lambda number: print)
        self.assertNotIn(signal.SIGUSR1, service.signalHandlers())

    def test_stopsAnUpgradeUnderWay(self) -> None:
        """
        The first request also stops an upgrade under way (its new parent
        has not taken over: see L{maccept._upgrade.Upgrade.abandon}).
        """
        service, reactor, _ = self.service()
        service.requestStop()
        reactor.advance(SAME_STOP_WINDOW)
        service.requestStop()
        self.assertEqual(service.upgrade.abandoned, 1)  # type: ignore[attr-defined]

    def test_controlStopsOnce(self) -> None:
        """
        C{maccept-ctl stop} stops as the first TERM does, and is refused
        once a stop is asked for, by the control socket or a signal, even
        before the reactor has turned: it never becomes the killing second.
        """
        service, reactor, pool = self.service()
        self.assertTrue(service.stopFromControl())
        self.assertFalse(service.stopFromControl())
        self.assertEqual((reactor.stops, pool.killed), (1, 0))
        service, reactor, pool = self.service()
        service.requestStop()  # SIGTERM
        self.assertFalse(service.stopFromControl())
        self.assertEqual((reactor.stops, pool.killed), (1, 0))

    def test_stopDelay(self) -> None:
        """
        With C{--stop-delay}, a stop first tells /healthz (the pool is
        announced as stopping) and stops the reactor only after the delay;
        a second request meanwhile still kills, and a hand-over to a new
        parent does not wait.
        """
        service, reactor, pool = self.service()
        service.stopDelay = 2.0
        service.requestStop()
        self.assertEqual((reactor.stops, getattr(pool, "stopAnnounced", False)), (0, True))
        self.assertFalse(service.stopFromControl())
        reactor.advance(2.0)
        self.assertEqual(reactor.stops, 1)
        service.requestStop()
        self.assertEqual(pool.killed, 1)
        service, reactor, pool = self.service()
        service.stopDelay = 2.0
        service.handOver()
        self.assertEqual(reactor.stops, 1)

    def test_secondStopDuringDelay(self) -> None:
        """
        A second request during C{--stop-delay} kills the workers and stops
        at once: the parent must not hold the socket with none to accept.
        """
        service, reactor, pool = self.service()
        service.stopDelay = 8.0
        service.requestStop()
        reactor.advance(SAME_STOP_WINDOW)
        service.requestStop()
        self.assertEqual((reactor.stops, pool.killed), (1, 1))
        reactor.advance(8.0 - SAME_STOP_WINDOW)
        self.assertEqual(reactor.stops, 1)

    def test_afterAFailedStart(self) -> None:
        """
        After a start-up failure, which stopped the reactor already (it
        still runs while the pool drains), a stop request does not stop it
        again (Twisted raises C{ReactorNotRunning}); a second one still
        kills the workers.
        """
        service, reactor, pool = self.service()
        reactor.stop()
        service.requestStop()
        self.assertEqual(reactor.stops, 1)
        reactor.advance(SAME_STOP_WINDOW)
        service.requestStop()
        self.assertEqual(pool.killed, 1)

    def test_failedWorkerDuringDelay(self) -> None:
        """
        A failure that stops the reactor during C{--stop-delay} (a worker
        that cannot start) leaves the delayed stop nothing to do: the
        reactor, stopping already, would refuse a second C{stop()}.
        """
        service, reactor, pool = self.service()
        service.stopDelay = 2.0
        service.requestStop()
        reactor.stop()
        reactor.advance(2.0)
        self.assertEqual((reactor.stops, pool.killed), (1, 0))

    def test_fatalWhileStopping(self) -> None:
        """
        A fatal failure after an operator's stop (a worker dying as the pool
        drains) sets the exit status and leaves the stopping reactor as it
        is, instead of raising C{ReactorNotRunning}.
        """
        service, reactor, _ = self.service()
        service.requestStop()
        statuses: list[int] = []
        _onFatal(reactor, statuses.append)("worker 1 failed to start: test")
        self.assertEqual((statuses, reactor.stops), ([1], 1))

    def test_stopInTheTurnOfAFailure(self) -> None:
        """
        A stop request handled in the same reactor turn as a failure that
        stopped the reactor (whose shutdown, and so the parent's knowing
        of it, begins only at the next turn) does not raise
        C{ReactorNotRunning}.
        """
        service, reactor, _ = self.service()
        reactor.stopped = True  # stop() called; its triggers not run yet
        service.requestStop()
        self.assertEqual(reactor.stops, 0)
