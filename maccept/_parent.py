# -*- test-case-name: tests.test_parent -*-
"""
The parent process as a service: its listening sockets and its pool, and
the signals that steer them.
"""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Callable, Sequence
from typing import Any

from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.error import ReactorNotRunning
from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger

from maccept._listening import ListeningSocket
from maccept._pool import WorkerPool
from maccept._serviceports import ServicePort
from maccept._signals import installHandlers
from maccept._socketpath import SocketPath
from maccept._states import PoolState
from maccept._titles import setTitle
from maccept._upgrade import Upgrade

#: Seconds after a stop request in which another is taken for the same
#: one, not as the second that kills: a TERM sent to the whole process
#: group (Ctrl-C, systemd) reaches a new parent twice during an upgrade,
#: once from the sender and once from the old parent stopping it.
SAME_STOP_WINDOW = 1.0


class MacceptService(Service):
    """
    The parent: owns the listening sockets and the pool, and maps signals
    onto the pool's lifecycle.
    """

    log = Logger()

    def __init__(
        self,
        reactor: Any,
        listeners: Sequence[ListeningSocket],
        pool: WorkerPool,
        upgrade: Upgrade,
    ) -> None:
        self.reactor = reactor
        self.listeners = list(listeners)
        self.pool = pool
        self.stopRequested = False
        #: When an operator (a signal, C{maccept-ctl stop}) first asked for
        #: the stop: a hand-over to a new parent does not count.
        self._operatorStopAt: float | None = None
        #: Seconds from a stop request to the drain (C{--stop-delay}).
        self.stopDelay = 0.0
        self._delayedStop: IDelayedCall | None = None
        #: The parent's own ports (metrics, control), closed after the pool.
        self.servicePorts: list[ServicePort] = []
        #: Upgrading maccept itself on SIGUSR2 (see L{maccept._upgrade}).
        self.upgrade = upgrade
        #: The reactor's shutdown began (a failed start stops it): it stays
        #: C{running} while the pool drains, but would refuse C{stop()}.
        self._shutdownBegun = False
        reactor.addSystemEventTrigger("before", "shutdown", self._shutdownBegins)

    def _shutdownBegins(self) -> None:
        self._shutdownBegun = True

    def signalHandlers(self) -> dict[signal.Signals, Callable[[], object]]:
        """
        The signals the parent answers, as in the README's table.
        """
        handlers: dict[signal.Signals, Callable[[], object]] = {
            signal.SIGTERM: self.requestStop,
            signal.SIGINT: self.requestStop,
            # nginx's graceful stop; by default it would end the parent
            # at once, its workers with it.
            signal.SIGQUIT: self.requestStop,
            signal.SIGHUP: self.pool.reload,
            signal.SIGTTIN: self.pool.scaleUp,
            signal.SIGTTOU: self.pool.scaleDown,
            signal.SIGUSR2: self.upgrade.start,
        }
        if signal.getsignal(signal.SIGUSR1) == signal.SIG_DFL:
            # twistd rotates its --logfile on USR1; logging elsewhere, it
            # has no handler, and USR1 would end the parent at once.
            handlers[signal.SIGUSR1] = self._noLogToReopen
        return handlers

    def _noLogToReopen(self) -> None:
        self.log.info("USR1: no log file to reopen (twistd reopens only its --logfile)")

    def socketPaths(self) -> list[SocketPath]:
        """
        The paths and locks of this parent's UNIX sockets.
        """
        return SocketPath.ofOwners([*self.listeners, *self.servicePorts])

    def takeOwnership(self, adopted: bool = False) -> None:
        """
        Point the sockets' locks at this process: those it made, once twistd
        has daemonised (a new pid); with C{adopted}, those an old parent
        handed over too, once this one has taken over.
        """
        for socketPath in self.socketPaths():
            if adopted or socketPath.owned:
                socketPath.claim()

    def startService(self) -> None:
        super().startService()
        self.takeOwnership()
        addresses = " ".join(listener.description for listener in self.listeners)
        setTitle(f"maccept: master {addresses}")
        self.pool.startService()
        self.reactor.callWhenRunning(installHandlers, self.reactor, self.signalHandlers())

    def requestStop(self) -> None:
        """
        An operator's request (TERM, INT, QUIT, C{maccept-ctl stop}): the
        first stops gracefully, after C{stopDelay} seconds in which
        C{/healthz} already answers 503 and the workers go on accepting; a
        second one, L{SAME_STOP_WINDOW} or more later, kills the workers.
        """
        now, first = self.reactor.seconds(), self._operatorStopAt
        if first is None:
            self._operatorStopAt = now
            if self.stopRequested:
                self.log.info("stopping already (a new parent took over): a second request kills")
                return
        elif now - first < SAME_STOP_WINDOW:
            self.log.info(
                "stop requested again within {window:g}s: taken for the same request",
                window=SAME_STOP_WINDOW,
            )
            return
        self._stop(delay=True)

    def handOver(self) -> None:
        """
        A new parent took over: stop at once (it serves already, so no
        C{--stop-delay}), and not as an operator's request, so that the
        operator's own next one is a graceful stop's, not a kill's.
        """
        self.pool.handOver()
        if not self.stopRequested:
            self._stop(delay=False)

    def _stop(self, delay: bool) -> None:
        if self.stopRequested:
            self.log.warn("second stop request: killing every worker now")
            if self._delayedStop is not None and self._delayedStop.active():
                # Still in --stop-delay: stop now too, or the parent would
                # hold the socket with no worker to accept.
                self._delayedStop.cancel()
                self._stopNow()
            self.pool.killAll()
            return
        self.stopRequested = True
        self.upgrade.abandon()
        if self._shutdownBegun:  # a failed start stopped the reactor: the pool drains
            return
        if delay and self.stopDelay > 0:
            # A load balancer sees 503 and takes this host out while it
            # still accepts, so that no connection is refused.
            self.log.info(
                "stopping in {delay}s: /healthz answers 503, the workers accept until then",
                delay=f"{self.stopDelay:g}",
            )
            self.pool.announceStop()
            self._delayedStop = self.reactor.callLater(self.stopDelay, self._stopNow)
            return
        self._stopNow()

    def _stopNow(self) -> None:
        if self._shutdownBegun:  # meanwhile, by a failed worker
            return
        self.log.info("stopping: draining every worker")
        # A failure may have stopped the reactor earlier in this same turn:
        # its shutdown (and _shutdownBegins) starts only at the next.
        with contextlib.suppress(ReactorNotRunning):
            self.reactor.stop()

    def stopFromControl(self) -> bool:
        """
        C{maccept-ctl stop}: as the first TERM; refused (C{False}) once a
        stop is asked for, by a signal or the control socket, even in the
        same reactor turn, so that a retried or scripted stop never turns
        into the second stop that kills the workers.
        """
        if self.stopRequested or self.pool.state in (PoolState.STOPPING, PoolState.STOPPED):
            return False
        self.requestStop()  # the reactor stops a turn later: the answer goes first
        return True

    def stopService(self) -> defer.Deferred[Any]:
        """
        Drain every worker, and close the parent's copies of the sockets at
        once so that they close for good when the last worker lets go.
        """
        super().stopService()
        stopped = self.pool.stopService()
        # Stopped by a new parent that took the sockets over: its paths now,
        # and its metrics and control from now on.
        handedOver = self.upgrade.takenOver
        for listener in self.listeners:
            listener.close(handedOver)
        if handedOver:
            self._closeServicePorts(handedOver=True)
        else:
            stopped.addCallback(lambda _: self._closeServicePorts())
        # A stop taken for an older new parent's hand-over waits to be
        # sure of it: a greeting would show it was a stop of both.
        settled = self.upgrade.settled()
        stopped.addCallback(lambda _: settled)
        return stopped

    def _closeServicePorts(self, handedOver: bool = False) -> None:
        for port in self.servicePorts:
            port.close(handedOver)
