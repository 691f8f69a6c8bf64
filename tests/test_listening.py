"""
Adopting the parent's UNIX socket in a worker: the worker takes it as the
parent made it, and gives back only its own copy.
"""

from __future__ import annotations

import os
import socket
import stat
import tempfile

from twisted.internet.error import ConnectionDone
from twisted.internet.protocol import Factory, Protocol
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from maccept._adopting import AdoptedUNIXPort
from maccept._descriptions import unixPath
from maccept._reactor import WorkerReactor


class AdoptedUNIXPortTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.reactor = WorkerReactor()
        self.addCleanup(self.reactor._poller.close)
        directory = tempfile.mkdtemp()
        self.path = os.path.join(directory, "s.sock")
        # The parent's socket: its own mode and backlog.
        self.parentSocket = socket.socket(socket.AF_UNIX)
        self.addCleanup(self.parentSocket.close)
        self.parentSocket.bind(self.path)
        os.chmod(self.path, 0o600)
        self.parentSocket.listen(321)
        self.parentSocket.setblocking(False)
        factory = Factory.forProtocol(Protocol)
        factory.noisy = False
        self.port = AdoptedUNIXPort._fromListeningDescriptor(
            self.reactor, self.parentSocket.fileno(), factory
        )

    def test_leftAsTheParentMadeIt(self) -> None:
        """
        Adopting neither changes the path's mode nor listens again; the
        port accepts.
        """
        self.port.startListening()
        self.addCleanup(self.port.stopReading)
        self.assertEqual(stat.S_IMODE(os.stat(self.path).st_mode), 0o600)
        self.assertIn(self.port, self.reactor.getReaders())

    def test_lostLeavesTheSharedSocket(self) -> None:
        """
        When the worker's reactor stops with the port still accepting
        (Twisted then calls its C{connectionLost}), the path stays and the
        socket the parent and the other workers share still takes
        connections.
        """
        self.port.startListening()
        self.reactor.removeReader(self.port)
        self.port.connectionLost(Failure(ConnectionDone()))
        self.assertTrue(os.path.exists(self.path))
        with socket.socket(socket.AF_UNIX) as client:
            client.connect(self.path)
            connection, _ = self.parentSocket.accept()
            connection.close()


class UnixPathTests(SynchronousTestCase):
    def test_escapes(self) -> None:
        """
        A unix: path is read as Twisted's parser reads it: C{\\:} and C{\\=}
        are a colon and an equals sign in the path, C{address=} names it,
        and a description with options only names none.
        """
        cases = [
            (r"unix:/tmp/x\=y.sock", "/tmp/x=y.sock"),
            (r"unix:/tmp/a\:b.sock:mode=600", "/tmp/a:b.sock"),
            ("unix:address=/tmp/q.sock:mode=600", "/tmp/q.sock"),
            ("unix:mode=600", None),
            ("tcp:0", None),
        ]
        self.assertEqual([unixPath(d) for d, _ in cases], [path for _, path in cases])
