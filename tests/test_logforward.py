"""
Worker logs in the parent: events as JSON over AMP, re-emitted with the
worker's tag; buffered until the channel is up; stdout and stderr as lines.
"""

from __future__ import annotations

import io
import sys
from typing import cast

from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.address import IPv4Address
from twisted.logger import (
    ILogObserver,
    LogEvent,
    Logger,
    LogLevel,
    capturedLogs,
    eventAsJSON,
    eventFromJSON,
    formatEvent,
)
from twisted.protocols import amp
from twisted.trial.unittest import SynchronousTestCase

from maccept._logforward import (
    ForwardingObserver,
    LineLogger,
    encodeEvent,
    reemit,
    workerSystem,
)
from maccept._wire import MAX_VALUE_LENGTH

SYSTEM = workerSystem(3, 4242)


def logged(emit: str, format: str, **fields: object) -> LogEvent:
    """
    The event a L{Logger} in namespace C{app.db} makes with C{emit}.
    """
    events: list[LogEvent] = []
    log = Logger(namespace="app.db", observer=cast(ILogObserver, events.append))
    getattr(log, emit)(format, **fields)
    [event] = events
    return event


def roundTrip(event: LogEvent) -> LogEvent:
    """
    Encode C{event} in the worker and re-emit it in the parent.
    """
    published: list[LogEvent] = []
    reemit(encodeEvent(event), SYSTEM, published.append)
    [result] = published
    return result


def fitsInAmp(text: str) -> bool:
    """
    Whether C{text} can travel as the value of one AMP argument.
    """
    try:
        amp.AmpBox(event=text.encode("utf-8")).serialize()
    except amp.TooLong:
        return False
    return True


class RoundTripTests(SynchronousTestCase):
    def test_systemTag(self) -> None:
        """
        A worker's tag names its number and pid.
        """
        self.assertEqual(workerSystem(3, 4242), "worker 3 pid 4242")

    def test_levelFormatNamespace(self) -> None:
        """
        A forwarded event keeps its level, namespace, time and format fields,
        and is tagged with the worker's system.
        """
        event = logged("warn", "query {query} took {ms}ms", query="select 1", ms=12)
        result = roundTrip(event)
        self.assertIs(result["log_level"], LogLevel.warn)
        self.assertEqual(result["log_namespace"], "app.db")
        self.assertEqual(result["log_time"], event["log_time"])
        self.assertEqual((result["query"], result["ms"]), ("select 1", 12))
        self.assertEqual(formatEvent(result), "query select 1 took 12ms")
        self.assertEqual(result["log_system"], SYSTEM)

    def test_unserialisableFields(self) -> None:
        """
        A field JSON cannot carry still formats as it did in the worker.
        """
        peer = IPv4Address("TCP", "10.0.0.7", 51234)
        event = logged("info", "connection from {peer}", peer=peer)
        self.assertEqual(formatEvent(roundTrip(event)), formatEvent(event))

    def test_failure(self) -> None:
        """
        A logged failure arrives at its level with its message, and the
        whole traceback as text: the exception's type, its message (which
        Twisted's JSON would lose) and the frames.
        """
        events: list[LogEvent] = []
        log = Logger(namespace="app.db", observer=cast(ILogObserver, events.append))
        try:
            1 / 0  # noqa: B018
        except ZeroDivisionError:
            log.failure("query {query} failed", query="select 1")
        result = roundTrip(events[0])
        self.assertIs(result["log_level"], LogLevel.critical)
        text = formatEvent(result)
        self.assertTrue(text.startswith("query select 1 failed\nTraceback"), text)
        self.assertIn("test_failure", text)
        self.assertTrue(text.endswith("ZeroDivisionError: division by zero"), text)

    def test_formatThatDoesNotFormat(self) -> None:
        """
        An event whose format names a field it lacks (an f-string with
        braces in it, say) still arrives, saying so, as twistd would print
        it.
        """
        event = logged("error", "bad fmt {nope}")
        result = roundTrip(event)
        self.assertIs(result["log_level"], LogLevel.error)
        self.assertIn("Unable to format event", formatEvent(result))
        self.assertIn("bad fmt {nope}", formatEvent(result))

    def test_hugeFailureKeepsItsEnd(self) -> None:
        """
        A failure too big for one AMP value is cut in the middle: the start
        and the exception at the end of the traceback are kept.
        """
        events: list[LogEvent] = []
        log = Logger(namespace="app.db", observer=cast(ILogObserver, events.append))
        try:
            raise ValueError("the reason " + "x" * (MAX_VALUE_LENGTH * 2))
        except ValueError:
            log.failure("handler failed")
        text = encodeEvent(events[0])
        self.assertTrue(fitsInAmp(text))
        formatted = formatEvent(roundTrip(events[0]))
        self.assertTrue(formatted.startswith("handler failed\nTraceback"), formatted[:80])
        self.assertIn("[... truncated ...]", formatted)
        self.assertTrue(formatted.endswith("x" * 20), formatted[-80:])

    def test_reemitToGlobalPublisher(self) -> None:
        """
        By default a forwarded event is published to the global log.
        """
        event = logged("info", "hello from {who}", who="worker")
        with capturedLogs() as events:
            reemit(encodeEvent(event), SYSTEM)
        [result] = [e for e in events if e.get("who") == "worker"]
        self.assertEqual(result["log_system"], SYSTEM)

    def test_smallEventUnchanged(self) -> None:
        """
        An event that fits is sent whole, not flattened.
        """
        event = logged("info", "{a} and {b}", a="x", b=[1, 2])
        self.assertEqual(eventFromJSON(encodeEvent(event))["b"], [1, 2])


class TooBigTests(SynchronousTestCase):
    def assertFlattened(self, event: LogEvent, start: str) -> None:
        text = encodeEvent(event)
        self.assertLess(len(text.encode("utf-8")), MAX_VALUE_LENGTH)
        self.assertTrue(fitsInAmp(text))
        result = roundTrip(event)
        self.assertIs(result["log_level"], LogLevel.error)
        self.assertEqual(result["log_namespace"], "app.db")
        self.assertEqual(result["log_system"], SYSTEM)
        formatted = formatEvent(result)
        self.assertTrue(formatted.startswith(start), formatted[:80])
        self.assertIn("\n[... truncated ...]\n", formatted)

    def test_tooBigIsTruncated(self) -> None:
        """
        An event too big for one AMP value is flattened to its text, cut in
        the middle, marked as truncated, and keeps its level and namespace.
        """
        event = logged("error", "dump: {data}", data="x" * (MAX_VALUE_LENGTH * 2))
        self.assertFalse(fitsInAmp(eventAsJSON(event)))
        self.assertFlattened(event, "dump: xxxx")

    def test_tooBigNonAsciiIsTruncated(self) -> None:
        """
        The same holds for text that JSON escapes (each non-ASCII character
        takes six bytes or more once encoded).
        """
        event = logged("error", "dump: {data}", data="\u00e9" * MAX_VALUE_LENGTH)
        self.assertFlattened(event, "dump: \u00e9\u00e9")


class ForwardingObserverTests(SynchronousTestCase):
    def events(self, count: int) -> list[LogEvent]:
        return [logged("info", "event {n}", n=n) for n in range(count)]

    def test_buffersUntilAttached(self) -> None:
        """
        Events logged before the channel is attached are sent, in order,
        when it is; later ones are sent at once.
        """
        observer = ForwardingObserver()
        first, second, third = self.events(3)
        observer(first)
        observer(second)
        sent: list[str] = []
        observer.attach(sent.append)
        self.assertEqual(sent, [encodeEvent(first), encodeEvent(second)])
        observer(third)
        self.assertEqual(sent[2:], [encodeEvent(third)])

    def test_dropsWhileTheParentIsBehind(self) -> None:
        """
        While more than C{maxQueued} bytes wait to go to the parent, events
        are dropped and counted; the next one sent is preceded by a warning
        saying how many were lost.
        """
        observer = ForwardingObserver()
        queued = [0]
        sent: list[str] = []
        observer.attach(sent.append, lambda: queued[0])
        events = self.events(5)
        observer(events[0])
        queued[0] = observer.maxQueued + 1
        observer(events[1])
        observer(events[2])
        self.assertEqual((len(sent), observer.dropped), (1, 2))
        queued[0] = 0
        observer(events[3])
        notice = eventFromJSON(sent[1])
        self.assertIs(notice["log_level"], LogLevel.warn)
        self.assertEqual(
            formatEvent(notice),
            "dropped 2 log events: more than 4 MiB of them waited to reach the parent",
        )
        self.assertEqual((sent[2], observer.dropped), (encodeEvent(events[3]), 0))

    def test_errorsNeverDropped(self) -> None:
        """
        Errors go even while the parent is behind; a heartbeat reports what
        was dropped once there is room, though nothing else is logged.
        """
        observer = ForwardingObserver()
        queued = [observer.maxQueued + 1]
        sent: list[str] = []
        observer.attach(sent.append, lambda: queued[0])
        observer(logged("info", "chatter"))
        error = logged("error", "disk full")
        observer(error)
        self.assertEqual((sent, observer.dropped), ([encodeEvent(error)], 1))
        observer.reportDropped()
        self.assertEqual(len(sent), 1)
        queued[0] = 0
        observer.reportDropped()
        self.assertEqual(
            formatEvent(eventFromJSON(sent[1])),
            "dropped 1 log events: more than 4 MiB of them waited to reach the parent",
        )

    def test_stderrAfterDetach(self) -> None:
        """
        After a detach (the parent's channel closed, or the worker exits),
        events are written to stderr, which the parent still reads, instead
        of waiting for an attach that will not come.
        """
        stderr = io.StringIO()
        self.patch(sys, "stderr", stderr)
        observer = ForwardingObserver()
        sent: list[str] = []
        observer.attach(sent.append)
        observer.detach()
        [event] = self.events(1)
        observer(event)
        self.assertEqual((sent, stderr.getvalue()), ([], "event 0\n"))
        stderr.close()  # a closed stream, or a pipe with no reader: nothing raised
        observer(event)

    def test_stderrBeyondLimit(self) -> None:
        """
        Beyond its limit the buffer is not grown: further events are
        written to stderr as text instead, and are not sent later.
        """
        stderr = io.StringIO()
        self.patch(sys, "stderr", stderr)
        observer = ForwardingObserver(limit=2)
        events = self.events(4)
        for event in events:
            observer(event)
        self.assertEqual(stderr.getvalue(), "event 2\nevent 3\n")
        sent: list[str] = []
        observer.attach(sent.append)
        self.assertEqual(sent, [encodeEvent(e) for e in events[:2]])


class LineLoggerTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.lines: list[str] = []
        self.logger = LineLogger(self.lines.append)

    def test_splitsAcrossChunks(self) -> None:
        """
        Lines are emitted whole, however the bytes were split, with the
        carriage return of a CRLF ending removed.
        """
        for chunk in [b"hel", b"lo\r", b"\nwor", b"ld\n\nlast"]:
            self.logger.dataReceived(chunk)
        self.assertEqual(self.lines, ["hello", "world", ""])

    def test_flushTail(self) -> None:
        """
        C{flush} emits an unterminated last line, once.
        """
        self.logger.dataReceived(b"done\npartial")
        self.logger.flush()
        self.logger.flush()
        self.assertEqual(self.lines, ["done", "partial"])

    def test_flushNothing(self) -> None:
        """
        With nothing pending, C{flush} emits nothing.
        """
        self.logger.dataReceived(b"done\n")
        self.logger.flush()
        self.assertEqual(self.lines, ["done"])

    def test_undecodableBytes(self) -> None:
        """
        Bytes that are not UTF-8 are replaced, not fatal; a character split
        across chunks is decoded whole.
        """
        snowman = "\u2603".encode()
        self.logger.dataReceived(b"\xff " + snowman[:1])
        self.logger.dataReceived(snowman[1:] + b"\n")
        self.assertEqual(self.lines, ["\ufffd \u2603"])

    def test_overlongLineEmitted(self) -> None:
        """
        A line longer than C{maxLength} with no newline in sight is emitted
        rather than buffered without bound.
        """
        self.logger.maxLength = 10
        self.logger.dataReceived(b"x" * 11)
        self.assertEqual(self.lines, ["x" * 11])
        self.logger.flush()
        self.assertEqual(self.lines, ["x" * 11])

    @given(st.lists(st.binary(max_size=64)))
    def test_anySplit(self, chunks: list[bytes]) -> None:
        """
        Whatever the chunks, the lines emitted after a flush are those of
        the whole output.
        """
        lines: list[str] = []
        logger = LineLogger(lines.append)
        for chunk in chunks:
            logger.dataReceived(chunk)
        logger.flush()
        *complete, tail = b"".join(chunks).split(b"\n")
        expected = [line.rstrip(b"\r").decode("utf-8", "replace") for line in complete]
        if tail:
            expected.append(tail.decode("utf-8", "replace"))
        self.assertEqual(lines, expected)
