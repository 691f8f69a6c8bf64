# -*- test-case-name: tests.test_tap -*-
"""
C{twistd maccept}: build the service from the options.

The listening sockets are created here, before twistd starts logging,
daemonises or sheds privileges, so that a port in use or a privileged port
fails at once with one line, and so that a privileged port can be bound
before C{--uid} takes effect.
"""

from __future__ import annotations

import atexit
import os
import sys
from typing import Any

from twisted.application.service import IService, MultiService, Service
from twisted.internet import defer

from maccept._listening import ListenError, ListeningSocket, listen
from maccept._options import CommandLineOptions, fail
from maccept._pool import WorkerPool

Options = CommandLineOptions


class ListenersService(Service):
    """
    Owns the parent's listening sockets and closes them when the service
    stops; as the first child of the top service it stops after the pool.
    """

    def __init__(self, listeners: list[ListeningSocket]) -> None:
        self.listeners = listeners

    def stopService(self) -> defer.Deferred[Any]:
        super().stopService()
        return defer.gatherResults([listener.close() for listener in self.listeners])


class MacceptService(MultiService):
    """
    The parent: its listeners, then its pool.  Stops the pool first and
    closes the listeners once every worker is gone.
    """

    def __init__(self, listeners: ListenersService, pool: WorkerPool) -> None:
        super().__init__()
        self.listeners = listeners
        self.pool = pool
        listeners.setServiceParent(self)
        pool.setServiceParent(self)

    def stopService(self) -> defer.Deferred[Any]:
        Service.stopService(self)
        d = defer.maybeDeferred(self.pool.stopService)
        d.addBoth(lambda _: self.listeners.stopService())
        return d


def exitWithStatus(code: int) -> None:
    """
    Make the process exit with C{code} once twistd has finished.

    twistd always exits 0 after its reactor stops; an exit handler, which
    runs after twistd has removed its pid file, sets the status.
    """

    def _exit() -> None:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)

    atexit.register(_exit)


def makeService(options: CommandLineOptions) -> IService:
    from twisted.internet import reactor

    listeners: list[ListeningSocket] = []
    for description in options["listen"]:
        try:
            listeners.append(listen(reactor, description))
        except ListenError as e:
            for listener in listeners:
                listener.close()
            fail(f"--listen {description}: {e}")

    def onFatal(message: str) -> None:
        exitWithStatus(1)
        reactor.stop()

    pool = WorkerPool(
        reactor,
        listeners,
        protocol=options["protocol"],
        size=options["workers"],
        onFatal=onFatal,
    )
    return MacceptService(ListenersService(listeners), pool)
