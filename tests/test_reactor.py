"""
The worker's default reactor dispatches events without a logging context
each, and still logs what a handler raises rather than let it escape.
"""

from __future__ import annotations

import socket
from typing import Any

from twisted.internet.abstract import FileDescriptor
from twisted.internet.epollreactor import EPOLLERR, EPOLLHUP, EPOLLIN, EPOLLOUT
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.main import CONNECTION_DONE
from twisted.trial.unittest import SynchronousTestCase

from maccept._reactor import WorkerReactor


class Reader(FileDescriptor):
    def __init__(
        self,
        sock: socket.socket,
        reactor: WorkerReactor,
        fail: type[BaseException] | None = None,
    ) -> None:
        super().__init__(reactor)
        self.sock = sock
        self.fail = fail
        self.reads: list[bytes] = []
        self.lost: list[object] = []

    def fileno(self) -> int:
        return self.sock.fileno()

    def doRead(self) -> object:
        data = self.sock.recv(100)
        if not data:
            return CONNECTION_DONE
        self.reads.append(data)
        if self.fail is not None:
            raise self.fail("handler broke")
        return None

    def connectionLost(self, reason: object) -> None:
        self.lost.append(reason)
        super().connectionLost(reason)


class ScriptedPoller:
    """
    An epoll whose C{poll} returns the events given, for what a real socket
    cannot be made to show on demand.
    """

    def __init__(self, real: Any, events: list[tuple[int, int]]) -> None:
        self.real = real
        self.events = events

    def poll(self, timeout: float, maxevents: int) -> list[tuple[int, int]]:
        return self.events

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)


class WorkerReactorTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.reactor = WorkerReactor()
        self.addCleanup(self.reactor._poller.close)

    def pair(self, fail: type[BaseException] | None = None) -> tuple[socket.socket, Reader]:
        ours, theirs = socket.socketpair()
        self.addCleanup(ours.close)
        self.addCleanup(theirs.close)
        reader = Reader(ours, self.reactor, fail)
        self.reactor.addReader(reader)
        self.addCleanup(self.reactor.removeReader, reader)
        return theirs, reader

    def test_dispatchesReads(self) -> None:
        """
        A readable descriptor has its C{doRead} called.
        """
        peer, reader = self.pair()
        peer.sendall(b"hello")
        self.reactor.doPoll(1)
        self.assertEqual(reader.reads, [b"hello"])

    def test_failingHandlerIsLogged(self) -> None:
        """
        A handler that raises is logged; the other ready descriptors are
        still served in the same poll.
        """
        brokenPeer, broken = self.pair(fail=RuntimeError)
        finePeer, fine = self.pair()
        brokenPeer.sendall(b"a")
        finePeer.sendall(b"b")
        self.reactor.doPoll(1)
        self.assertEqual((broken.reads, fine.reads), ([b"a"], [b"b"]))
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_failingHandlerDisconnects(self) -> None:
        """
        As with Twisted's own reactors, a descriptor whose handler raised is
        disconnected with that error, and no longer read.
        """
        peer, reader = self.pair(fail=RuntimeError)
        peer.sendall(b"a")
        self.reactor.doPoll(1)
        self.flushLoggedErrors(RuntimeError)
        [reason] = reader.lost
        self.assertTrue(reason.check(RuntimeError))  # type: ignore[attr-defined]
        self.assertNotIn(reader, self.reactor.getReaders())

    def test_keyboardInterruptFromHandlerDisconnects(self) -> None:
        """
        Even a handler raising C{KeyboardInterrupt} is logged and its
        descriptor dropped, as Twisted's own dispatch does; it does not
        escape the poll.
        """
        peer, reader = self.pair(fail=KeyboardInterrupt)
        peer.sendall(b"a")
        self.reactor.doPoll(1)
        self.assertEqual(len(self.flushLoggedErrors(KeyboardInterrupt)), 1)
        [reason] = reader.lost
        self.assertTrue(reason.check(KeyboardInterrupt))  # type: ignore[attr-defined]
        self.assertNotIn(reader, self.reactor.getReaders())

    def test_readReturningReasonDisconnects(self) -> None:
        """
        A C{doRead} that returns a reason (the peer closed) has its
        descriptor disconnected with that reason, as a read, and no longer
        read; the other ready descriptors are still served.
        """
        closedPeer, closed = self.pair()
        openPeer, stillOpen = self.pair()
        closedPeer.shutdown(socket.SHUT_WR)
        openPeer.sendall(b"more")
        self.reactor.doPoll(1)
        [reason] = closed.lost
        self.assertTrue(reason.check(ConnectionDone))  # type: ignore[attr-defined]
        self.assertNotIn(closed, self.reactor.getReaders())
        self.assertEqual((stillOpen.reads, stillOpen.lost), ([b"more"], []))
        self.assertIn(stillOpen, self.reactor.getReaders())

    def scripted(self, reader: Reader, event: int) -> None:
        """
        One poll in which C{reader}'s descriptor shows C{event}.
        """
        real = self.reactor._poller
        self.reactor._poller = ScriptedPoller(real, [(reader.fileno(), event)])
        try:
            self.reactor.doPoll(0)
        finally:
            self.reactor._poller = real

    def test_errorWithoutReadableIsLost(self) -> None:
        """
        An error event without C{EPOLLIN} on a descriptor being read (a
        reset the kernel is still taking in) disconnects it as lost, not as
        the clean close Twisted's dispatch would make of it, and no longer
        reads or writes it; a hang-up alone is still a clean close.
        """
        for event, lost in [
            (EPOLLERR | EPOLLHUP, ConnectionLost),
            (EPOLLERR, ConnectionLost),
            (EPOLLERR | EPOLLOUT, ConnectionLost),
            (EPOLLHUP, ConnectionDone),
        ]:
            _peer, reader = self.pair()
            self.reactor.addWriter(reader)
            self.scripted(reader, event)
            [reason] = reader.lost
            self.assertIs(reason.type, lost)  # type: ignore[attr-defined]
            self.assertNotIn(reader, self.reactor.getReaders())
            self.assertNotIn(reader, self.reactor.getWriters())

    def test_errorWithReadableStillReads(self) -> None:
        """
        An error event that comes with C{EPOLLIN} is read first, as
        Twisted does: what the peer sent before it reset is delivered.
        """
        peer, reader = self.pair()
        peer.sendall(b"data")
        self.scripted(reader, EPOLLIN | EPOLLERR | EPOLLHUP)
        self.assertEqual((reader.reads, reader.lost), ([b"data"], []))
