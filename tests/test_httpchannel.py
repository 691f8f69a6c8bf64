# -*- test-case-name: tests.test_httpchannel -*-
"""
Tests for L{maccept._httpchannel}: what a client may not make a small site
hold (a body, a head sent for ever, answers it never reads), driven on a
Clock and an in-memory transport, and the metrics site's pages under HEAD.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import Logger, capturedLogs, formatEvent
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource
from twisted.web.server import Site

from maccept import _httpchannel
from maccept._http import _Page
from maccept._httpchannel import SmallRequestsChannel
from maccept._tally import Tally

PEER = IPv4Address("TCP", "192.0.2.7", 40000)


class Page(_Page):
    """
    A page of C{size} bytes that counts how often it was rendered.
    """

    def __init__(self, size: int = 5) -> None:
        super().__init__()
        self.body = b"x" * size
        self.rendered = 0

    def render_GET(self, request: Any) -> bytes:
        self.rendered += 1
        return self.body


class UnflushedTransport(StringTransport):
    """
    A transport that, like a real one within a reactor turn, holds all it
    was given unsent (L{maccept._connections.queuedBytes} reads these).
    """

    _tempDataLen = 0

    @property
    def dataBuffer(self) -> bytes:
        held: bytes = self.value()
        return held

    def abortConnection(self) -> None:
        self.aborted = True
        super().abortConnection()


class ChannelTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.freshTally()

    def freshTally(self) -> None:
        """
        A tally of drops of the test's own: its first drop is logged.
        """
        self.patch(_httpchannel, "dropped", Tally(Logger(), _httpchannel.dropped.line))

    def connect(self, page: Resource) -> tuple[Any, UnflushedTransport, Clock]:
        clock = Clock()
        site = Site(page, reactor=clock)
        site.protocol = SmallRequestsChannel  # type: ignore[assignment]
        channel = site.buildProtocol(PEER)
        transport = UnflushedTransport(peerAddress=PEER)
        transport.aborted = False
        channel.makeConnection(transport)
        self.addCleanup(lambda: channel.connectionLost(None) if channel.transport else None)
        return channel, transport, clock

    def test_get(self) -> None:
        """
        A GET is answered as by Twisted's own channel.
        """
        page = Page()
        channel, transport, _ = self.connect(page)
        channel.dataReceived(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 200 OK"))
        self.assertTrue(transport.value().endswith(b"xxxxx"))
        self.assertEqual(page.rendered, 1)

    def test_headWithoutBody(self) -> None:
        """
        HEAD says how long the GET's body is, sends none, and logs nothing
        (Twisted's default logs a line per HEAD for the body it dropped).
        """
        channel, transport, _ = self.connect(Page())
        with capturedLogs() as events:
            channel.dataReceived(b"HEAD / HTTP/1.1\r\nHost: x\r\n\r\n")
        head = transport.value()
        self.assertIn(b"\r\nContent-Length: 5\r\n", head)
        self.assertTrue(head.endswith(b"\r\n\r\n"))
        self.assertEqual([formatEvent(e) for e in events], [])

    def test_bodyRefused(self) -> None:
        """
        A request with a body, by length or chunked, is answered 413; the
        page is never rendered, and the body is read and thrown away (no
        temporary file for it) until the connection closes, a moment later
        so that the client reads the answer rather than a reset.
        """
        for head in [
            b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 200000000\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n",
        ]:
            self.freshTally()
            page = Page()
            channel, transport, clock = self.connect(page)
            with capturedLogs() as events:
                channel.dataReceived(head + b"y" * 300000)
                channel.dataReceived(b"y" * 300000)
            self.assertTrue(transport.value().startswith(b"HTTP/1.1 413 "), transport.value())
            self.assertFalse(transport.disconnecting)
            clock.advance(channel.bodyLinger)
            self.assertTrue(transport.disconnecting)
            self.assertEqual(page.rendered, 0)
            self.assertIsNone(getattr(channel.requests[0], "content", None))
            [line] = [formatEvent(e) for e in events]
            self.assertIn("192.0.2.7", line)
            self.assertIn("a request with a body", line)

    def test_headDeadline(self) -> None:
        """
        A request head still unfinished L{headDeadline} seconds after its
        first byte, however steadily its bytes trickle, is dropped.
        """
        channel, transport, clock = self.connect(Page())
        clock.advance(30)  # silent: the idle timeout's, not a bad client
        for _ in range(9):
            channel.dataReceived(b"G")
            clock.advance(1)
        self.assertFalse(transport.aborted)
        with capturedLogs() as events:
            clock.advance(1)
        self.assertTrue(transport.aborted)
        self.assertIn("no whole request head within 10 s", formatEvent(events[0]))

    def test_keptAliveConnectionIsNoBadClient(self) -> None:
        """
        A kept-alive connection that sends nothing after an answer is left
        to the idle timeout, quietly; its next head has the whole deadline
        from its own first byte.
        """
        channel, transport, clock = self.connect(Page())
        channel.dataReceived(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        dropsBefore = _httpchannel.dropped.total
        clock.advance(30)
        self.assertFalse(transport.aborted)
        channel.dataReceived(b"GET / HTTP/1.1\r\n")
        clock.advance(9)
        channel.dataReceived(b"Host: x\r\n\r\n")
        clock.advance(30)
        self.assertFalse(transport.aborted)
        self.assertEqual(_httpchannel.dropped.total, dropsBefore)
        self.assertEqual(transport.value().count(b"HTTP/1.1 200 OK"), 2)

    def test_idleTimeoutQuiet(self) -> None:
        """
        A kept-alive connection closed by the site's idle timeout (a
        scraper's, between scrapes) writes no line: Twisted's channel
        logged one for each.
        """
        clock = Clock()
        site = Site(Page(), reactor=clock, timeout=10)
        site.protocol = SmallRequestsChannel  # type: ignore[assignment]
        channel = site.buildProtocol(PEER)
        transport = UnflushedTransport(peerAddress=PEER)
        channel.makeConnection(transport)
        self.addCleanup(lambda: channel.connectionLost(None) if channel.transport else None)
        with capturedLogs() as events:
            channel.dataReceived(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            clock.advance(11)
        self.assertTrue(transport.disconnecting)
        self.assertEqual([formatEvent(e) for e in events], [])

    def test_unreadAnswersDropped(self) -> None:
        """
        A client that sends requests and reads no answer is dropped at the
        first request that comes once L{maxUnreadBytes} of answers wait,
        whether the requests come together or one by one, and the requests
        after are not answered.
        """
        for together in (True, False):
            self.freshTally()
            page = Page(size=100 * 1024)
            channel, transport, _ = self.connect(page)
            request = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"
            with capturedLogs() as events:
                if together:
                    channel.dataReceived(request * 40)
                else:
                    for _ in range(40):
                        channel.dataReceived(request)
            self.assertTrue(transport.aborted)
            self.assertEqual(page.rendered, 11)  # 11 answers of 100 KiB: over 1 MiB
            self.assertIn("bytes of answers unread", formatEvent(events[0]))

    def test_oneLargeAnswerKept(self) -> None:
        """
        One answer larger than L{maxUnreadBytes}, with no request after it,
        is written out as the client reads it: no drop.
        """
        page = Page(size=2 * 1024 * 1024)
        channel, transport, _ = self.connect(page)
        channel.dataReceived(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertFalse(transport.aborted)
        self.assertFalse(transport.disconnecting)
        self.assertEqual(page.rendered, 1)
