# -*- test-case-name: tests.test_logforward -*-
"""
Worker logs in the parent's log.

A worker's L{twisted.logger} events travel as JSON over its control channel
and are re-emitted in the parent with the worker's number and pid as their
system, levels and failures kept.  Whatever a worker writes to its stdout or
stderr (a traceback from an interpreter that dies before its reactor runs,
for one) is captured line by line.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Callable
from typing import Any

from twisted.logger import (
    ILogObserver,
    Logger,
    LogLevel,
    eventAsJSON,
    eventFromJSON,
    formatEvent,
    globalLogPublisher,
)
from zope.interface import implementer

from maccept._wire import MAX_VALUE_LENGTH

_log = Logger()


def workerSystem(number: int, pid: int) -> str:
    """
    The tag a worker's lines carry in the parent's log.
    """
    return f"worker {number} pid {pid}"


def encodeEvent(event: dict[str, Any]) -> str:
    """
    Serialise C{event}.  Sent as text instead: a failure (Twisted's JSON
    keeps its type but not its message, so the whole traceback goes), an
    event whose format does not format (the text says so, as twistd would
    write it), and one that would not fit in an AMP value (cut in the
    middle, keeping the end, where a traceback names the error).
    """
    failure = event.get("log_failure")
    if failure is None:
        try:
            text = eventAsJSON(event)
        except Exception:
            text = ""
        if text and len(text.encode("utf-8")) < MAX_VALUE_LENGTH:
            return text
        whole = formatEvent(event) or ""
    else:
        whole = (formatEvent(event) or "") + "\n" + _traceback(failure)
    # JSON may spend up to 12 bytes on one character: halve until it fits.
    # Each try builds a fresh event, since eventAsJSON records its flattened
    # fields in place.
    keep = MAX_VALUE_LENGTH // 8
    while True:
        if len(whole) > keep:
            half = keep // 2
            cut = whole[:half] + "\n[... truncated ...]\n" + whole[len(whole) - half :]
        else:
            cut = whole
        flat = {
            "log_level": event.get("log_level", LogLevel.info),
            "log_namespace": event.get("log_namespace", "maccept"),
            "log_time": event.get("log_time"),
            "log_format": "{text}",
            "text": cut,
        }
        text = eventAsJSON(flat)
        if len(text.encode("utf-8")) < MAX_VALUE_LENGTH or keep == 0:
            return text
        keep //= 2


def _traceback(failure: Any) -> str:
    try:
        return str(failure.getTraceback()).rstrip("\n")
    except Exception:
        return repr(failure)


def reemit(
    text: str, system: str, publish: Callable[[dict[str, Any]], None] = globalLogPublisher
) -> None:
    """
    Publish a forwarded event in this process, tagged with C{system}.
    """
    event = eventFromJSON(text)
    event["log_system"] = system
    publish(event)


@implementer(ILogObserver)
class ForwardingObserver:
    """
    The worker's log observer: sends each event to the parent with C{send}
    once a channel is attached, keeps events until then, and falls back to
    stderr when there is no parent to send to.
    """

    #: Bytes queued to the parent beyond which events are dropped (and
    #: counted): a worker that logs faster than the parent can write must
    #: not grow without bound, nor hold its heartbeats back for ever.
    maxQueued = 4 * 2**20

    def __init__(self, limit: int = 1000) -> None:
        self._send: Callable[[str], None] | None = None
        #: The channel to the parent closed: nothing more can be sent.
        self._detached = False
        self._queued: Callable[[], int] = lambda: 0
        self._pending: list[str] = []
        self._limit = limit
        self.dropped = 0

    def attach(self, send: Callable[[str], None], queued: Callable[[], int] | None = None) -> None:
        """
        Send events with C{send} from now on; C{queued} says how many bytes
        wait to go to the parent.
        """
        self._send = send
        self._queued = queued or (lambda: 0)
        pending, self._pending = self._pending, []
        for text in pending:
            send(text)

    def detach(self) -> None:
        """
        The channel closed (the parent went, or the worker exits): events
        from now on go to stderr, which the parent, if any, still reads.
        """
        self._send = None
        self._detached = True

    def __call__(self, event: dict[str, Any]) -> None:
        if self._send is not None:
            # Errors always go: there are few of them, and they matter.
            important = event.get("log_level") in (LogLevel.error, LogLevel.critical)
            if self._queued() > self.maxQueued and not important:
                self.dropped += 1
                return
            self.reportDropped(event.get("log_time"))
            self._send(encodeEvent(event))
            return
        if not self._detached and len(self._pending) < self._limit:
            self._pending.append(encodeEvent(event))
            return
        with contextlib.suppress(OSError, ValueError):  # no reader, or closed
            sys.stderr.write((formatEvent(event) or "") + "\n")
            sys.stderr.flush()

    def reportDropped(self, when: float | None = None) -> None:
        """
        Say how many events were dropped, if any and if there is room (also
        from the worker's heartbeat, so that a worker that goes quiet
        still says it).
        """
        if not self.dropped or self._send is None or self._queued() > self.maxQueued:
            return
        notice = {
            "log_level": LogLevel.warn,
            "log_namespace": "maccept",
            "log_time": when if when is not None else time.time(),
            "log_format": (
                "dropped {count} log events: more than 4 MiB of them waited to reach the parent"
            ),
            "count": self.dropped,
        }
        self.dropped = 0
        self._send(eventAsJSON(notice))


class LineLogger:
    """
    Split a stream of bytes into lines and log each one.
    """

    maxLength = 16384

    def __init__(self, emit: Callable[[str], None]) -> None:
        self._emit = emit
        self._buffer = b""

    def dataReceived(self, data: bytes) -> None:
        lines = (self._buffer + data).split(b"\n")
        self._buffer = lines.pop()
        if len(self._buffer) > self.maxLength:
            lines.append(self._buffer)
            self._buffer = b""
        for line in lines:
            self._emit(line.rstrip(b"\r").decode("utf-8", "replace"))

    def flush(self) -> None:
        if self._buffer:
            self._emit(self._buffer.decode("utf-8", "replace"))
            self._buffer = b""
