# -*- test-case-name: tests.test_connections -*-
"""
Counting a worker's connections and bytes at next to no cost.

Wrapping every protocol (L{twisted.protocols.policies.WrappingFactory})
would put a wrapper's calls between every read, every write and the
protocol.  Instead the adopted port is told to build its connections from a
subclass of its own transport class that reports when a connection opens
and closes, and counts what its reads and writes moved.
"""

from __future__ import annotations

import fcntl
import os
import socket
import struct
import sys
import termios
import time
from collections.abc import Callable
from errno import ENOBUFS, EWOULDBLOCK
from typing import Any

from twisted.internet.error import ConnectionLost
from twisted.internet.interfaces import IFileDescriptorReceiver, IListeningPort, ITransport
from twisted.internet.main import CONNECTION_DONE, CONNECTION_LOST
from twisted.logger import Logger
from twisted.python.failure import Failure

from maccept._tally import Tally

_log = Logger(namespace="maccept")

monotonic = time.monotonic

#: How much a worker's TCP transport asks the kernel for in one read.
READ_SIZE = 256 * 1024


def keepReadsOffMmap(size: int = READ_SIZE) -> None:
    """
    Make glibc serve C{size}-byte allocations from its heap.

    Every C{recv(size)} allocates a C{size}-byte buffer and then shrinks it
    to what came.  glibc serves an allocation above its mmap threshold
    (128 KiB until it adapts) with C{mmap} and frees it with C{munmap}, so
    each 256 KiB read would cost a mapping, two page faults and an unmap:
    18 µs for a 1 KiB message against 3 (README, Performance).  glibc
    raises the threshold to the size of the first mapped block that is
    freed, so freeing one block larger than C{size} keeps every read on
    the heap.  (A worker's imports happen to do that today; this makes it
    not a matter of luck.  Elsewhere than glibc it costs one allocation.)
    """
    block = bytes(2 * size)
    del block


class ConnectionTracker:
    """
    The open connections of one worker, what it counts of them (accepted,
    bytes, resets, bad clients) for its heartbeat, and which are idle.
    """

    def __init__(self, onChange: Callable[[int], None] | None = None) -> None:
        self.open: set[ITransport] = set()
        self.accepted = 0
        self.bytesReceived = 0
        self.bytesSent = 0
        self.idleClosed = 0
        self.proxyRejectedCount = 0
        self.handshakesFailedCount = 0
        #: Wake-ups to accept that found the connection gone to another
        #: worker: every worker's epoll wakes for each new connection.
        self.emptyWakeups = 0
        #: Calls of the accept loop that made at least one connection (a
        #: wake-up, or a draining worker's last sweep): C{accepted} over
        #: this is the mean accept batch.
        self.acceptBatches = 0
        #: Connections closed at once for want of a descriptor (EMFILE).
        self.shedding = Tally(
            _log,
            "out of file descriptors: closed {count} new connection(s) at once "
            "(raise the limit, ulimit -n / LimitNOFILE=, or lower --max-concurrent)",
        )
        #: Connections the client reset, or broke by going away while the
        #: server still wrote (ECONNRESET, EPIPE): not the server's aborts.
        #: Routine for some clients, so counted and logged at info, at
        #: most once a minute.
        self.resets = Tally(
            _log,
            "clients reset {count} connection(s) since the last such line",
            interval=60.0,
            level="info",
        )
        #: Descriptors a client passed (SCM_RIGHTS) on a UNIX connection to
        #: a protocol that takes none: closed.  Twisted logs a line for each
        #: message, which any local user could have it write without end.
        self.unwantedDescriptors = Tally(
            _log,
            "closed {count} file descriptor(s) that clients passed to a protocol"
            " that takes none, the last on {host}",
        )
        self.onChange = onChange
        self._idleWaiters: list[Callable[[], None]] = []
        #: Bytes the kernel holds to send on a transport's socket.
        self.kernelQueued: Callable[[Any], int] = kernelSendQueue

    def opened(self, transport: ITransport) -> None:
        self.accepted += 1
        self.open.add(transport)
        if self.onChange is not None:
            self.onChange(len(self.open))

    def closed(self, transport: ITransport, reason: Failure | None = None) -> None:
        if reason is not None and resetByClient(transport, reason):
            self.resets.add()
        self.open.discard(transport)
        if self.onChange is not None:
            self.onChange(len(self.open))
        if not self.open:
            waiters, self._idleWaiters = self._idleWaiters, []
            for waiter in waiters:
                waiter()

    def whenIdle(self, callback: Callable[[], None]) -> None:
        """
        Call C{callback} once no connection is open (at once if none is).
        """
        if self.open:
            self._idleWaiters.append(callback)
        else:
            callback()

    def proxyRejected(self) -> None:
        """
        A connection was dropped for a malformed PROXY protocol header.
        """
        self.proxyRejectedCount += 1

    def handshakeFailed(self) -> None:
        """
        A connection was dropped for a failed TLS handshake.
        """
        self.handshakesFailedCount += 1

    def wokeForNothing(self) -> None:
        """
        A wake-up to accept found no connection waiting.
        """
        self.emptyWakeups += 1

    def acceptedBatch(self) -> None:
        """
        A call of the accept loop made at least one connection.
        """
        self.acceptBatches += 1

    def shed(self, count: int) -> None:
        """
        C{count} connections were closed at once: no descriptor was free.
        """
        if count:
            self.shedding.add(count)

    def closeIdle(self, timeout: float, now: float | None = None) -> int:
        """
        Abort every connection on which no byte moved for C{timeout}
        seconds (a silent client holds a descriptor and a slot for
        nothing: slowloris); return how many.  Called every quarter of
        C{timeout} (every 0.1 s at least).

        Bytes the client reads move out of the kernel's send queue while
        this process sees nothing: its socket is writable again only once
        a good part of a full buffer has drained, so a client reading a
        large answer slowly would look silent.  So a connection quiet for
        a quarter of the timeout has that queue looked at on each call,
        and one whose queue changed since the last look (taken while it
        was as quiet) counts as active.
        """
        now = time.monotonic() if now is None else now
        cutoff = now - timeout
        quiet = now - timeout / 4
        idle = []
        for transport in self.open:
            t: Any = transport
            if t.lastActive > quiet or getattr(t, "_aborting", False):
                continue
            queued = self.kernelQueued(t)
            last: tuple[int, float] | None = getattr(t, "kernelSample", None)
            t.kernelSample = (queued, now)
            if last is not None and last[1] >= t.lastActive and last[0] != queued:
                t.lastActive = now  # the kernel sent, or the client acknowledged
            elif t.lastActive <= cutoff:
                # A closing connection counts too: one whose client never
                # reads what is left to send would hold its descriptor for
                # ever.
                idle.append(t)
        for t in idle:
            t.abortConnection()
        self.idleClosed += len(idle)
        return len(idle)

    def closeAll(self) -> None:
        """
        Close every open connection now, dropping unsent data.
        """
        for transport in list(self.open):
            transport.abortConnection()  # type: ignore[attr-defined]


def kernelSendQueue(transport: Any) -> int:
    """
    How many bytes the kernel holds to send on C{transport}'s socket, not
    yet sent or not yet acknowledged (C{SIOCOUTQ}); 0 where it cannot tell
    (a transport with no socket, one already closed).
    """
    try:
        answer = fcntl.ioctl(transport.socket.fileno(), termios.TIOCOUTQ, b"\0\0\0\0")
    except (AttributeError, OSError, ValueError):
        return 0
    queued: int = struct.unpack("i", answer)[0]
    return queued


def queuedBytes(transport: Any) -> int | None:
    """
    How many bytes C{transport} holds that the kernel has not taken yet;
    C{None} where it cannot tell (a wrapper's, such as TLS's).
    """
    try:
        return len(transport.dataBuffer) + transport._tempDataLen  # type: ignore[no-any-return]
    except AttributeError:
        return None


def resetByClient(transport: Any, reason: Failure) -> bool:
    """
    Whether the client reset C{transport}, or went away, before the server
    was done with it.

    Exactly C{ConnectionLost}: its subclass C{ConnectionAborted} is the
    server's own C{abortConnection} (the idle timeout, a drain's end, a bad
    header).  And not while the server was closing with nothing left to
    send: a client that closes at once after its last message (TLS's
    close_notify, say) may reset a connection the server is closing, and
    Twisted, no longer reading, reports that as lost; nothing was.
    """
    if type(reason.value) is not ConnectionLost:
        return False
    return not (transport.disconnecting and queuedBytes(transport) == 0)


def trackConnections(port: IListeningPort, tracker: ConnectionTracker) -> None:
    """
    Make C{port} report each connection it accepts to C{tracker}, and turn
    off Nagle's algorithm on TCP connections: a protocol that answers in
    several writes (an echo of a message larger than one read) would
    otherwise wait for the client's delayed ACK, 40 ms at a time.

    Must be called before the port accepts its first connection.
    """
    base: type[Any] = port.transport  # type: ignore[attr-defined]
    listener = port.socket  # type: ignore[attr-defined]
    isTCP = listener.family in (socket.AF_INET, socket.AF_INET6)
    noDelayInherited = False
    if isTCP:
        keepReadsOffMmap()
        noDelayInherited = _noDelayOnListener(listener)

    class TrackedTransport(base):  # type: ignore[misc]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            #: When a byte last moved either way (monotonic seconds).
            self.lastActive = monotonic()
            if isTCP and not noDelayInherited:
                self.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            tracker.opened(self)

        def connectionLost(self, reason: Failure) -> None:
            tracker.closed(self, reason)
            super().connectionLost(reason)

        # Byte counts: one addition per read and per write.

        if isTCP:
            #: Reads of up to 256 KiB, as asyncio's, not Twisted's 64 KiB
            #: (C{bufferSize}): a 256 KiB echo then costs a third less CPU
            #: (fewer reads and sends), and small messages cost the same
            #: while the buffer comes from the heap (L{keepReadsOffMmap};
            #: README, Performance).  Not C{bufferSize} itself: Twisted also
            #: pauses a streaming producer once that much output is queued,
            #: and that should stay 64 KiB per connection.
            readSize = READ_SIZE
            #: A write-through's send failed on a reset (see L{_sendTCP}).
            sendFailed = False

            def doRead(self) -> Any:
                # tcp.Connection.doRead and _dataReceived in one call, with
                # the count: this runs for every message a client sends.
                try:
                    data = self.socket.recv(self.readSize)
                except OSError as e:
                    return None if e.args[0] == EWOULDBLOCK else CONNECTION_LOST
                if not data:
                    # A reset that a write-through's send took (L{_sendTCP})
                    # leaves only this end of file for the read to find.
                    return CONNECTION_LOST if self.sendFailed else CONNECTION_DONE
                tracker.bytesReceived += len(data)
                self.lastActive = monotonic()
                self.protocol.dataReceived(data)
                return None

            def write(self, data: bytes) -> None:
                # Write-through: with nothing queued, send now rather than
                # queue and wait a reactor turn for writability (two
                # epoll_ctl calls and a loop iteration per response).  What
                # the kernel does not take, and every write behind it, is
                # queued as usual, so order and producer pausing are
                # unchanged; an error is left for the queued write to
                # report, as Twisted would.  (TCP only: on a UNIX socket a
                # descriptor passed after a write must travel with that
                # write's bytes, so its writes stay queued.)
                if (
                    type(data) is bytes
                    and data
                    and not self.dataBuffer
                    and not self._tempDataLen
                    and self.connected
                    and not self.disconnecting
                    and not self._writeDisconnected
                    and not self._aborting
                    and not self.TLS
                    # A pull producer is asked for more only from doWrite.
                    and (self.producer is None or self.streamingProducer)
                ):
                    written = _sendTCP(self, data)
                    if written:
                        tracker.bytesSent += written
                        self.lastActive = monotonic()
                        if written == len(data):
                            return
                        data = data[written:]
                super().write(data)

        else:
            # UNIX: its doRead (recvmsg, for passed descriptors) stays.
            def _dataReceived(self, data: bytes | None) -> Any:
                if data:
                    tracker.bytesReceived += len(data)
                    self.lastActive = monotonic()
                return super()._dataReceived(data)

            def _ancillaryLevelSOLSOCKETTypeSCMRIGHTS(self, cmsgData: bytes) -> None:
                if IFileDescriptorReceiver.providedBy(self.protocol):
                    super()._ancillaryLevelSOLSOCKETTypeSCMRIGHTS(cmsgData)
                    return
                count = len(cmsgData) // 4
                descriptors = struct.unpack(f"{count}i", cmsgData[: count * 4])
                for fd in descriptors:
                    os.close(fd)
                path = self.getHost().name
                shown = os.fsdecode(path) if isinstance(path, bytes) else path
                tracker.unwantedDescriptors.add(len(descriptors), host=shown)

        def writeSomeData(self, data: bytes) -> Any:
            written = super().writeSomeData(data)
            if isinstance(written, int) and written:
                tracker.bytesSent += written
                self.lastActive = monotonic()
            return written

    TrackedTransport.__name__ = f"Tracked{base.__name__}"
    port.transport = TrackedTransport  # type: ignore[attr-defined]


def _noDelayOnListener(listener: Any) -> bool:
    """
    Set C{TCP_NODELAY} on a listening socket; say whether the connections
    it accepts get it from there.  Linux copies the option into every
    accepted socket, which saves a system call per connection; elsewhere
    each connection sets it itself.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        listener.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError:
        return False
    return True


def _sendTCP(transport: Any, data: bytes) -> int:
    """
    Send on a TCP socket directly (Linux takes what fits, so Twisted's
    C{SEND_LIMIT} slice and C{untilConcludes} add nothing here).
    """
    try:
        sent: int = transport.socket.send(data)
    except OSError as e:
        # (Python retries EINTR itself.)
        if e.errno not in (EWOULDBLOCK, ENOBUFS):
            # The kernel hands a reset (ECONNRESET, EPIPE) over once, here;
            # the bytes stay queued for Twisted's write to fail on, but a
            # read may come first, and it would find a clean end of file.
            transport.sendFailed = True
        return 0
    return sent
