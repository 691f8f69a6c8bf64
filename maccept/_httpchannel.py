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
head must come whole within L{SmallRequestsChannel.headDeadline}; and a
client that leaves L{SmallRequestsChannel.maxUnreadBytes} of answers unread
is dropped.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.protocol import connectionDone
from twisted.logger import Logger
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

    #: Seconds from a connection, or from the last answer, to a whole
    #: request head.
    headDeadline = 10.0
    #: Answers a client may leave unread, with more pipelined requests
    #: waiting, before it is dropped.
    maxUnreadBytes = 1024 * 1024

    _headTimer: Any = None
    #: Dropped or refused: nothing more the client sends is read.
    _ignoring = False

    def connectionMade(self) -> None:
        super().connectionMade()
        self._awaitHead()

    def _awaitHead(self) -> None:
        self._stopHeadTimer()
        self._headTimer = self.callLater(self.headDeadline, self._headTooSlow)

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

    def _requestsWaiting(self) -> bool:
        """
        Whether more of the client's requests are read and wait their turn.
        """
        unparsed: Any = getattr(self, "_buffer", None)  # LineReceiver's
        return bool(self._dataBuffer or unparsed)

    def allHeadersReceived(self) -> None:
        self._stopHeadTimer()
        if self.length != 0:  # a Content-Length above 0, or chunked (None)
            self._refuseBody()
            return
        super().allHeadersReceived()

    def _refuseBody(self) -> None:
        """
        Answer 413 and close: reading the body would cost a temporary file
        as large as the client likes, for pages that take none.
        """
        self._ignoreTheRest()
        dropped.add(
            peer=self.transport.getPeer() if self.transport else None,
            why="a request with a body (only GET and HEAD without one are served)",
        )
        self.transport.write(  # type: ignore[union-attr]
            b"HTTP/1.1 413 Content Too Large\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"
        )
        self.loseConnection()

    def rawDataReceived(self, data: bytes) -> None:
        if not self._ignoring:
            super().rawDataReceived(data)

    def lineReceived(self, line: bytes) -> None:
        if not self._ignoring:
            super().lineReceived(line)

    def requestDone(self, request: Any) -> None:
        unread = queuedBytes(self.transport) if self._requestsWaiting() else None
        if unread is not None and unread > self.maxUnreadBytes:
            # Pipelined requests, answered into the buffer one after another
            # in one turn, and more of them waiting: stop before the answers
            # fill the memory.  (One large answer alone is written out as
            # the client reads it.)
            self.persistent = False
            super().requestDone(request)
            self._drop(f"{unread} bytes of answers unread")
            return
        if self.persistent:
            self._awaitHead()
        super().requestDone(request)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._stopHeadTimer()
        super().connectionLost(reason)
