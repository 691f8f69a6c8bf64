"""
The reactor a worker runs (C{--worker-reactor}).

C{fast}, the default: Twisted's epoll reactor, less one wrapper per event,
and a direct path for the commonest event, a descriptor that is readable.

C{EPollReactor.doPoll} runs every read and write inside
C{log.callWithLogger}, which sets a legacy logging context (the
selectable's C{logPrefix}) through three more Python calls and a dict copy
per event.  In a worker that context is never seen: every log event is
forwarded to the parent and tagged there with the worker's own system.  So
the worker dispatches events directly, and still logs (rather than lets
escape) anything a handler raises, as C{callWithLogger} did.
"""

from __future__ import annotations

import errno
from typing import Any

from twisted.internet import epollreactor
from twisted.internet.epollreactor import EPOLLERR, EPOLLIN
from twisted.internet.main import CONNECTION_LOST, installReactor
from twisted.python import log


class WorkerReactor(epollreactor.EPollReactor):
    def doPoll(self, timeout: float | None) -> None:
        if timeout is None:
            timeout = -1
        try:
            events = self._poller.poll(timeout, len(self._selectables))
        except OSError as err:
            if err.errno == errno.EINTR:
                return
            raise
        doReadOrWrite = self._doReadOrWrite
        selectables = self._selectables
        for fd, event in events:
            selectable: Any = selectables.get(fd)
            if selectable is None:
                continue
            try:
                if event == EPOLLIN:
                    # The common case, a readable connection or listener:
                    # what _doReadOrWrite does for it, less its checks for
                    # hang-ups, writability and a closed descriptor (which
                    # the selectable's own read reports).
                    # (Every maccept and Twisted selectable stops reading
                    # before it closes, so none is here with a closed fd.)
                    try:
                        why = selectable.doRead()
                    except BaseException as e:  # as _doReadOrWrite: log, drop
                        why = e
                        log.err()
                    if why:
                        self._disconnectSelectable(selectable, why, True)
                elif event & EPOLLERR and not event & EPOLLIN:
                    # An error, a reset most often.  Twisted's _doReadOrWrite
                    # calls a hang-up without EPOLLIN a clean close when the
                    # descriptor is being read, and a reset can come so while
                    # the kernel is still taking it in (tcp_poll reads the
                    # socket's state without a lock): the protocol, and the
                    # reset count, would take it for a clean close (README,
                    # The per-message path).
                    self._disconnectSelectable(selectable, CONNECTION_LOST, False)
                else:
                    doReadOrWrite(selectable, fd, event)
            except KeyboardInterrupt:
                raise
            except BaseException:
                log.err()

    doIteration = doPoll


#: The names C{--worker-reactor} takes.
WORKER_REACTORS = ("fast", "epoll", "asyncio")


def install(name: str = "fast") -> Any:
    """
    Install the reactor called C{name} as the global reactor, and return it.

    C{epoll} is Twisted's own; C{asyncio} is Twisted's asyncio reactor,
    on uvloop's event loop where uvloop is installed.
    """
    if name == "fast":
        reactor: Any = WorkerReactor()
        installReactor(reactor)
        return reactor
    if name == "epoll":
        epollreactor.install()
    elif name == "asyncio":
        import asyncio

        from twisted.internet import asyncioreactor

        try:
            import uvloop

            loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
        except ImportError:
            loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        asyncioreactor.install(loop)
    else:
        raise ValueError(f"unknown reactor {name!r}")
    from twisted.internet import reactor as installed

    return installed
