# -*- test-case-name: tests.test_acceptloop -*-
"""
A leaner accept loop for an adopted stream port.

Every worker's epoll wakes for each new connection on the shared socket,
and all but one find it already taken, so the cost of a wake-up that
accepts nothing is paid W-1 times per connection.  Twisted's
C{tcp.Port.doRead} spends more on each wake-up than the accept itself: a
log-buffering context manager, a L{Logger}, a generator; and on each
connection C{socket.accept} converts the listener's family and type to
enums to build the new socket.  This loop does what C{doRead} does per
connection (build the protocol and transport, count the session, adapt
C{numberAccepts}) without those, and hands anything but "no connection
waiting" back to Twisted's own loop, whose handling of C{EPERM} and the
other accept errors it keeps.

Out of descriptors (C{EMFILE}), it sheds what waits as Twisted does (with
Twisted's reserved descriptor: accept each connection and close it, so
that clients are told at once rather than left in the backlog), but
counts the connections it sheds and leaves the log to the counter's
owner, where Twisted writes a line for each.

It also tells its owner of each wake-up that found nothing to accept, so
that what the herd of wake-ups costs shows in the metrics, and of each that
accepted at least one connection: connections per such batch is what a
wake-up's cost is spread over (small batches cost CPU: README, Even load).
"""

from __future__ import annotations

import errno
import os
import socket
from collections.abc import Callable
from typing import Any

from twisted.internet import tcp
from twisted.python import log


def acceptQuickly(
    port: Any,
    onShed: Callable[[int], None] = lambda count: None,
    onEmpty: Callable[[], None] = lambda: None,
    onBatch: Callable[[], None] = lambda: None,
) -> Callable[[], None]:
    """
    Give C{port} (a C{tcp.Port} or a subclass, listening) the lean accept
    loop in place of its C{doRead}, and return the loop (to call with no
    governor around it, as a draining worker's last sweep does).  Call
    before anything else wraps C{doRead}; the transport class is looked up
    on each accept, so C{trackConnections} may replace it afterwards.
    C{onShed} is told how many connections were closed at once for want
    of a descriptor, and C{onEmpty} called for each wake-up that found no
    connection waiting (another worker took it), and C{onBatch} for each
    call that made at least one connection (a draining worker's last sweep
    too: its connections count as accepted).
    """
    port.doRead = _leanDoRead(port, port.doRead, onShed, onEmpty, onBatch)
    return port.doRead  # type: ignore[no-any-return]


def _shed(rawAccept: Callable[[], tuple[int, Any]], limit: int) -> int:
    """
    Accept and close up to C{limit} waiting connections, with Twisted's
    reserved descriptor freed for the first; say how many.
    """
    shed = 0
    with tcp._reservedFD:
        while shed < limit:
            try:
                fd, _ = rawAccept()
            except OSError:
                break
            os.close(fd)
            shed += 1
    return shed


def _leanDoRead(
    port: Any,
    twistedDoRead: Callable[[], None],
    onShed: Callable[[int], None],
    onEmpty: Callable[[], None],
    onBatch: Callable[[], None],
) -> Callable[[], None]:
    listener: socket.socket = port.socket
    family, kind, proto = int(listener.family), int(listener.type), listener.proto
    rawAccept = listener._accept  # type: ignore[attr-defined]
    makeSocket = socket.socket
    buildAddr = port._buildAddr
    reactor = port.reactor

    def doRead() -> None:
        limit = port.numberAccepts
        accepted = 0
        firstSession = port.sessionno
        try:
            while accepted < limit:
                try:
                    fd, addr = rawAccept()
                except BlockingIOError:
                    if not accepted:
                        onEmpty()
                    break
                except OSError as e:
                    if e.errno == errno.EMFILE and tcp._reservedFD.available():
                        onShed(_shed(rawAccept, limit - accepted))
                        break
                    # A lasting error (ENFILE, ENOBUFS, ENOMEM) Twisted's
                    # loop meets again and handles as it does; a one-off
                    # (ECONNABORTED, EPERM: a connection gone before its
                    # accept) was used up here, and its loop goes on.
                    port.numberAccepts = limit - accepted
                    twistedDoRead()
                    return
                accepted += 1
                skt = makeSocket(family, kind, proto, fd)
                if type(addr) is tuple and len(addr) == 4:
                    # IPv6 (by the address: a dual-stack socket adopted as
                    # INET still gives these); as Twisted, the scope ID goes
                    # into the host.
                    host = socket.getnameinfo(addr, socket.NI_NUMERICHOST | socket.NI_NUMERICSERV)
                    addr = (host[0], *addr[1:])
                protocol = port.factory.buildProtocol(buildAddr(addr))
                if protocol is None:
                    skt.close()
                    continue
                session = port.sessionno
                port.sessionno = session + 1
                protocol.makeConnection(port.transport(skt, protocol, addr, port, session, reactor))
            # Twisted's adaptation: reaching the limit means more may be
            # waiting next time; otherwise ask for no more than came.
            if accepted == limit:
                port.numberAccepts = limit + 20
            else:
                port.numberAccepts = max(1, accepted)
        except BaseException:
            # As tcp.Port.doRead: a protocol that fails to build is logged,
            # and the port goes on accepting.
            log.deferr()
        finally:
            # Each connection made takes a session number, by this loop or
            # by Twisted's after an error; one the factory refused does not.
            if port.sessionno != firstSession:
                onBatch()

    return doRead
