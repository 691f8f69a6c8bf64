# -*- test-case-name: tests.test_lifecycle,tests.test_parent -*-
"""
The parent's signal handlers.

Installed once the reactor runs, over Twisted's own SIGTERM and SIGINT
handlers: Twisted's re-raise the signal after shutdown, so twistd would
exit "killed by SIGTERM" even after a clean, graceful stop.
"""

from __future__ import annotations

import signal
from collections.abc import Callable, Mapping
from typing import Any


def installHandlers(reactor: Any, handlers: Mapping[signal.Signals, Callable[[], None]]) -> None:
    """
    Run each handler in the reactor thread when its signal arrives.
    """
    for signum, handler in handlers.items():
        signal.signal(signum, _inReactor(reactor, handler))


def _inReactor(reactor: Any, handler: Callable[[], None]) -> Callable[[int, Any], None]:
    def onSignal(signum: int, frame: Any) -> None:
        reactor.callFromThread(handler)

    return onSignal
