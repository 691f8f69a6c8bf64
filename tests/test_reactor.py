"""
The worker's default reactor dispatches events without a logging context
each, and still logs what a handler raises rather than let it escape.
"""

from __future__ import annotations

import socket

from twisted.internet.abstract import FileDescriptor
from twisted.trial.unittest import SynchronousTestCase

from maccept._reactor import WorkerReactor


class Reader(FileDescriptor):
    def __init__(self, sock: socket.socket, reactor: WorkerReactor, fail: bool = False) -> None:
        super().__init__(reactor)
        self.sock = sock
        self.fail = fail
        self.reads: list[bytes] = []

    def fileno(self) -> int:
        return self.sock.fileno()

    def doRead(self) -> None:
        self.reads.append(self.sock.recv(100))
        if self.fail:
            raise RuntimeError("handler broke")


class WorkerReactorTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.reactor = WorkerReactor()
        self.addCleanup(self.reactor._poller.close)

    def pair(self, fail: bool = False) -> tuple[socket.socket, Reader]:
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
        brokenPeer, broken = self.pair(fail=True)
        finePeer, fine = self.pair()
        brokenPeer.sendall(b"a")
        finePeer.sendall(b"b")
        self.reactor.doPoll(1)
        self.assertEqual((broken.reads, fine.reads), ([b"a"], [b"b"]))
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
