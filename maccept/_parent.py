# -*- test-case-name: tests.test_parent -*-
"""
The parent process as a service: its listening sockets and its pool, and
the signals that steer them.
"""

from __future__ import annotations

import signal
from typing import Any

from twisted.application.service import MultiService, Service
from twisted.internet import defer
from twisted.logger import Logger

from maccept._listening import ListeningSocket
from maccept._pool import WorkerPool
from maccept._signals import installHandlers


class ListenersService(Service):
    """
    Owns the parent's listening sockets and closes them when it stops.
    """

    def __init__(self, listeners: list[ListeningSocket]) -> None:
        self.listeners = listeners

    def stopService(self) -> defer.Deferred[Any]:
        super().stopService()
        return defer.gatherResults([listener.close() for listener in self.listeners])


class MacceptService(MultiService):
    """
    The parent: its listeners, then its pool.  Stopping drains the pool
    first and closes the listeners once every worker is gone.
    """

    log = Logger()

    def __init__(self, reactor: Any, listeners: ListenersService, pool: WorkerPool) -> None:
        super().__init__()
        self.reactor = reactor
        self.listeners = listeners
        self.pool = pool
        self.stopRequested = False
        listeners.setServiceParent(self)
        pool.setServiceParent(self)

    def startService(self) -> None:
        super().startService()
        self.reactor.callWhenRunning(
            installHandlers,
            self.reactor,
            {signal.SIGTERM: self.requestStop, signal.SIGINT: self.requestStop},
        )

    def requestStop(self) -> None:
        """
        The first request stops gracefully; a second one kills the workers.
        """
        if self.stopRequested:
            self.log.warn("second stop request: killing every worker now")
            self.pool.killAll()
            return
        self.stopRequested = True
        self.log.info("stopping: draining every worker")
        self.reactor.stop()

    def stopService(self) -> defer.Deferred[Any]:
        Service.stopService(self)
        d = defer.maybeDeferred(self.pool.stopService)
        d.addBoth(lambda _: self.listeners.stopService())
        return d
