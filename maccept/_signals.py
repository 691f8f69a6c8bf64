# -*- test-case-name: tests.test_lifecycle,tests.test_parent -*-
"""
The parent's signal handlers.

Installed once the reactor runs, over Twisted's own SIGTERM and SIGINT
handlers: Twisted's re-raise the signal after shutdown, so twistd would
exit "killed by SIGTERM" even after a clean, graceful stop.
"""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Callable, Iterator, Mapping
from typing import Any

#: The parent's signals, which a worker ignores when they reach it too: a
#: terminal's Ctrl-C, Ctrl-\ or hang-up goes to the whole process group,
#: and C{systemctl kill -s HUP} to every process of the unit.  (By default
#: HUP, INT, QUIT and USR2 would end the worker, TTIN and TTOU suspend it.)
PARENT_SIGNALS = (
    signal.SIGINT,
    signal.SIGQUIT,
    signal.SIGHUP,
    signal.SIGUSR2,
    signal.SIGTTIN,
    signal.SIGTTOU,
)


#: Blocked while a worker is spawned: the parent's signals, and SIGTERM,
#: whose default action would end a worker not yet able to drain, so that
#: the pool would count a crash (and back off) where it was asked to go.
SPAWN_BLOCKED = (*PARENT_SIGNALS, signal.SIGTERM)

#: Blocked while a new parent is spawned (USR2), until it has its handlers
#: (L{installHandlers}): by default any of these would end or suspend it,
#: and the upgrade with it, and a group's HUP (C{systemctl kill}, a
#: terminal's hang-up) or a C{kill -HUP} at the pidfile it has just
#: written can come in that second.  USR1 too: twistd's log rotation.
UPGRADE_BLOCKED = (*SPAWN_BLOCKED, signal.SIGUSR1)


@contextlib.contextmanager
def spawnSignalsBlocked(blocked: tuple[signal.Signals, ...] = SPAWN_BLOCKED) -> Iterator[None]:
    """
    Block C{blocked} while a worker (or a new parent) is spawned: the child
    inherits the mask through fork and exec (Twisted resets only
    dispositions), and so is not ended or suspended by one that comes
    before it has its own handlers; it takes what came meanwhile once they
    are in place.  The parent gets what came meanwhile when it unblocks.
    """
    before = signal.pthread_sigmask(signal.SIG_BLOCK, blocked)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, before)


def installHandlers(reactor: Any, handlers: Mapping[signal.Signals, Callable[[], object]]) -> None:
    """
    Run each handler in the reactor thread when its signal arrives; then
    take those that came while they were blocked (a new parent is started
    with L{UPGRADE_BLOCKED} blocked).
    """
    for signum, handler in handlers.items():
        signal.signal(signum, _inReactor(reactor, handler))
    signal.pthread_sigmask(signal.SIG_UNBLOCK, UPGRADE_BLOCKED)


def _inReactor(reactor: Any, handler: Callable[[], object]) -> Callable[[int, Any], None]:
    def onSignal(signum: int, frame: Any) -> None:
        reactor.callFromThread(handler)

    return onSignal
