# -*- test-case-name: tests.test_httpchannel -*-
"""
An HTTP channel for sites that answer GET and HEAD only: the parent's
C{/metrics} and C{/healthz}, and the C{web} plugin's files.

Twisted's own channel takes whatever a client sends: a request body of
any size (spooled to a temporary file past 100 kB), a request head sent a
byte every few seconds for as long as the client likes (its idle timeout
restarts on each byte), and any number of pipelined requests from a client
that reads no answer (each answered into the transport's buffer).  Here a
request with a body is answered 413 and the connection closed; a request
head must come whole within L{SmallRequestsChannel.headDeadline} of its
first byte; and a client that leaves L{SmallRequestsChannel.maxUnreadBytes}
of answers unread is dropped at its next request.
"""

from __future__ import annotations

from twisted.internet.interfaces import IDelayedCall
from twisted.internet.protocol import connectionDone
from twisted.logger import Logger, LogPublisher
from twisted.python.failure import Failure
from twisted.web.http import HTTPChannel

from maccept._connections import queuedBytes
from maccept._tally import Tally

_log = Logger(namespace="maccept")

#: Clients dropped for what they sent, on every such channel of the process.
dropped = Tally(_log, "dropped {count} HTTP client(s), the last from {peer}: {why}")


class SmallRequestsChannel(HTTPChannel):
    """
    L{HTTPChannel} for requests with no body, whose answers are read.
    """

    #: Seconds from the first byte of a request head to its end.  (A
    #: connection that sends nothing is the idle timeout's: a browser's or
    #: a scraper's kept-alive connection is no bad client.)
    headDeadline = 10.0
    #: Answers a client may leave unread before its next request is
    #: refused and it is dropped.
    maxUnreadBytes = 1024 * 1024
    #: Seconds a refused request's body is read and thrown away before the
    #: connection closes: closing with it unread would reset the
    #: connection, and the client might never see the answer.
    bodyLinger = 2.0

    #: Twisted's channel logs nothing but its idle time-outs, a line for
    #: each connection a scraper keeps between scrapes (Prometheus does):
    #: routine, and a client could have it write one per connection.
    _log = Logger(observer=LogPublisher())  # a publisher with no observers

    _headTimer: IDelayedCall | None = None
    _lingerTimer: IDelayedCall | None = None
    #: Dropped or refused: nothing more the client sends is read.
    _ignoring = False

    def dataReceived(self, data: bytes) -> None:
        if self._headTimer is None and not self._handlingRequest and not self._ignoring:
            self._headTimer = self.callLater(self.headDeadline, self._headTooSlow)
        super().dataReceived(data)

    def _stopHeadTimer(self) -> None:
        if self._headTimer is not None and self._headTimer.active():
            self._headTimer.cancel()
        self._headTimer = None

    def _headTooSlow(self) -> None:
        self._headTimer = None
        self._drop(f"no whole request head within {self.headDeadline:g} s")

    def _drop(self, why: str) -> None:
        dropped.add(peer=self.transport.getPeer() if self.transport else None, why=why)
        self._ignoreTheRest()
        if self.transport is not None:
            self.transport.abortConnection()  # type: ignore[attr-defined]

    def _ignoreTheRest(self) -> None:
        self._ignoring = True
        self._dataBuffer = []
        self.clearLineBuffer()  # requests read, not yet parsed

    def allHeadersReceived(self) -> None:
        self._stopHeadTimer()
        unread = queuedBytes(self.transport)
        if unread is not None and unread > self.maxUnreadBytes:
            # Requests come, pipelined, and the answers are not read: stop
            # before they fill the memory.  (One large answer alone is
            # written out as the client reads it.)
            self._drop(f"{unread} bytes of answers unread")
            return
        if self.length != 0:  # a Content-Length above 0, or chunked (None)
            self._refuseBody()
            return
        super().allHeadersReceived()

    def _refuseBody(self) -> None:
        """
        Answer 413 and close once the client has had time to read it (its
        body meanwhile read and thrown away): keeping the body would cost a
        temporary file as large as the client likes, for pages that take
        none.
        """
        self._ignoreTheRest()
        dropped.add(
            peer=self.transport.getPeer() if self.transport else None,
            why="a request with a body (only GET and HEAD without one are served)",
        )
        self.transport.write(  # type: ignore[union-attr]
            b"HTTP/1.1 413 Content Too Large\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"
        )
        self._lingerTimer = self.callLater(self.bodyLinger, self.loseConnection)

    def allContentReceived(self) -> None:
        if not self._ignoring:  # else the head was refused, or the client dropped
            super().allContentReceived()

    def rawDataReceived(self, data: bytes) -> None:
        if not self._ignoring:
            super().rawDataReceived(data)

    def lineReceived(self, line: bytes) -> None:
        if not self._ignoring:
            super().lineReceived(line)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._stopHeadTimer()
        if self._lingerTimer is not None and self._lingerTimer.active():
            self._lingerTimer.cancel()
        super().connectionLost(reason)
