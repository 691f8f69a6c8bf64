# -*- test-case-name: tests.test_control,tests.test_observability -*-
"""
The parent's control socket (C{--control PATH}): AMP over a UNIX socket
that only its owner may use, for C{maccept-ctl}.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.protocols import amp

from maccept._board import MAX_WORKERS
from maccept._connections import queuedBytes
from maccept._pool import WorkerPool
from maccept._procfs import residentBytes
from maccept._states import PoolState
from maccept._wire import QuietAMP


class ControlError(Exception):
    """
    The pool cannot do what was asked; the message says why.
    """


_ERRORS: dict[type[Exception], bytes] = {ControlError: b"CONTROL_ERROR"}


class Status(amp.Command):
    arguments = []
    response = [
        (b"state", amp.Unicode()),
        (b"size", amp.Integer()),
        # The generation serving; the last one a reload started that is ready
        # or has failed; and why the last reload failed, until one succeeds.
        (b"generation", amp.Integer(optional=True)),
        (b"lastReloadDone", amp.Integer(optional=True)),
        (b"reloadFailure", amp.Unicode(optional=True)),
        # The generation a queued reload would have started, had an upgrade
        # not dropped it.
        (b"reloadDropped", amp.Integer(optional=True)),
        (
            b"workers",
            amp.AmpList(
                [
                    (b"number", amp.Integer()),
                    (b"pid", amp.Integer()),
                    (b"state", amp.Unicode()),
                    (b"generation", amp.Integer()),
                    (b"open", amp.Integer()),
                    (b"accepted", amp.Integer()),
                    (b"rss", amp.Integer()),
                    (b"uptime", amp.Float()),
                ]
            ),
        ),
    ]


class _Count(amp.Argument):
    """
    A whole number on the wire, as C{amp.Integer}; one that is missing or
    is not a number arrives as C{None}, for the responder to refuse in one
    line (a failed C{amp.Integer} is logged with a traceback).
    """

    def fromString(self, inString: bytes) -> int | None:
        try:
            return int(inString)
        except ValueError:
            return None

    def toString(self, inObject: int) -> bytes:
        return str(int(inObject)).encode("ascii")


class Scale(amp.Command):
    arguments = [(b"workers", _Count(optional=True))]
    response = [(b"size", amp.Integer())]
    errors = _ERRORS


class Reload(amp.Command):
    arguments = []
    #: The generation that carries the reload, now or once its turn comes,
    #: and whether it waits its turn (the pool starts or reloads).
    response = [
        (b"generation", amp.Integer(optional=True)),
        (b"queued", amp.Boolean(optional=True)),
    ]
    errors = _ERRORS


class Stop(amp.Command):
    arguments = []
    response = []
    errors = _ERRORS


class ControlProtocol(QuietAMP):
    """
    One C{maccept-ctl} connection.  Anything that is not AMP closes the
    connection, is logged, and leaves the server as it was.
    """

    log = Logger()

    #: Bytes a command may take: AMP bounds each key and value, not how
    #: many pairs a box holds, and a box is kept until it ends.
    maxCommandBytes = 64 * 1024
    #: Bytes of answers a client may leave unread before its next command
    #: closes the connection: each would otherwise be kept in the parent.
    maxUnreadBytes = 1024 * 1024

    def __init__(self, pool: WorkerPool, stop: Callable[[], bool]) -> None:
        super().__init__()
        self.pool = pool
        self.stop = stop
        self._unboxed = 0

    def dataReceived(self, data: bytes) -> None:
        unread = queuedBytes(self.transport)
        if unread is not None and unread > self.maxUnreadBytes:
            self.log.warn(
                "over {limit} bytes of answers left unread on the control socket:"
                " closing that connection",
                limit=self.maxUnreadBytes,
            )
            self.transport.abortConnection()  # type: ignore[union-attr]
            return
        self._unboxed += len(data)
        if self._unboxed > self.maxCommandBytes:
            self.log.warn(
                "a command over {limit} bytes on the control socket: closing that connection",
                limit=self.maxCommandBytes,
            )
            self.transport.abortConnection()  # type: ignore[union-attr]
            return
        try:
            super().dataReceived(data)
        except Exception:
            self.garbage()

    def ampBoxReceived(self, box: amp.AmpBox) -> None:
        self._unboxed = 0
        super().ampBoxReceived(box)

    def lengthLimitExceeded(self, length: int) -> None:
        # AMP keys are at most 255 bytes: a longer "key" is not AMP at all.
        self.garbage()
        super().lengthLimitExceeded(length)

    def garbage(self) -> None:
        self.log.warn("garbage on the control socket: closing that connection")
        self.transport.abortConnection()  # type: ignore[union-attr]

    @Status.responder
    def status(self) -> dict[str, Any]:
        now = self.pool.reactor.seconds()
        workers = [
            {
                "number": w.number,
                "pid": w.pid or 0,
                "state": w.shownState.value,
                "generation": w.generation,
                "open": w.stats["open"],
                "accepted": w.stats["accepted"],
                "rss": (residentBytes(w.pid) or 0) if w.pid else 0,
                "uptime": max(0.0, now - w.startedAt),
            }
            for w in sorted(self.pool.workers, key=lambda w: (w.number, w.startedAt))
        ]
        return {
            "state": self.pool.shownState,
            "size": self.pool.size,
            "generation": self.pool.generation,
            "lastReloadDone": self.pool.lastReloadDone,
            "reloadFailure": self.pool.reloadFailure,
            "reloadDropped": self.pool.reloadDropped,
            "workers": workers,
        }

    @Scale.responder
    def scale(self, workers: int | None = None) -> dict[str, Any]:
        if workers is None:
            raise ControlError("workers must be a whole number")
        if workers < 1:
            raise ControlError(f"the pool keeps at least one worker (asked for {workers})")
        if workers > MAX_WORKERS:
            raise ControlError(f"the pool runs at most {MAX_WORKERS} workers (asked for {workers})")
        refused = self.pool.scalingRefused()
        if refused is not None:
            # Logged as TTIN and TTOU are: the parent's log tells of it too.
            self.log.warn("scaling to {workers} ignored: {why}", workers=workers, why=refused)
            raise ControlError(f"cannot scale: {refused}")
        self.pool.scaleTo(workers)
        return {"size": self.pool.size}

    @Reload.responder
    def reload(self) -> dict[str, Any]:
        # As SIGHUP: during a start or a reload, queued.
        refused = self.pool.reloadRefused()
        if refused is not None:
            self.log.warn("reload ignored: {why}", why=refused)
            raise ControlError(f"cannot reload: {refused}")
        queued = self.pool.state in (PoolState.STARTING, PoolState.RELOADING)
        return {"generation": self.pool.reload(), "queued": queued}

    @Stop.responder
    def stopPool(self) -> dict[str, Any]:
        if not self.stop():
            raise ControlError("the pool is stopping already (a second TERM kills the workers)")
        return {}


def controlFactory(pool: WorkerPool, stop: Callable[[], bool]) -> Factory[ControlProtocol]:
    """
    C{stop} stops as the first TERM does, and says whether it did: not
    once a stop is asked for (see L{MacceptService.stopFromControl}).
    """
    factory = Factory.forProtocol(lambda: ControlProtocol(pool, stop))
    factory.noisy = False
    return factory
