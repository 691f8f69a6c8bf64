# -*- test-case-name: tests.test_worker -*-
"""
A worker process: adopt the parent's listening sockets, accept, serve.

Run by the parent as C{python -m maccept._worker SPEC}.  The worker talks to
its parent only over the control socket at L{CONTROL_FD}; when that closes
the parent is gone and the worker exits.
"""

from __future__ import annotations

import ctypes
import faulthandler
import os
import signal
import socket
import sys
from typing import Any

from twisted.internet.interfaces import IListeningPort
from twisted.internet.protocol import Factory
from twisted.logger import Logger, globalLogBeginner
from twisted.protocols import amp
from twisted.python.failure import Failure

from maccept._accepting import AcceptGovernor
from maccept._board import LoadBoard
from maccept._connections import ConnectionTracker, trackConnections
from maccept._listening import adopt, release
from maccept._logforward import ForwardingObserver
from maccept._protocols import resolveProtocol
from maccept._wire import CONTROL_FD, Drain, LogEvent, WorkerFailed, WorkerReady, WorkerSpec

#: Exit status of a worker that could not start.
EXIT_START_FAILED = 3

_PR_SET_PDEATHSIG = 1


class Worker:
    """
    The life of one worker: start, serve, drain, exit.

    @ivar exitCode: the status the process exits with once the reactor stops.
    """

    log = Logger()

    def __init__(self, reactor: Any, spec: WorkerSpec) -> None:
        self.reactor = reactor
        self.spec = spec
        self.tracker = ConnectionTracker()
        self.governor: AcceptGovernor | None = None
        self.ports: list[IListeningPort] = []
        self.control: amp.AMP | None = None
        self.exitCode = 0
        self._stopping = False

    def start(self) -> None:
        """
        Build the protocol factory, adopt every listener, then tell the
        parent we are ready; or tell it why not and exit.
        """
        assert self.control is not None
        try:
            factory = resolveProtocol(self.spec.protocol)()
            if self.spec.board is not None:
                board = LoadBoard.attach(self.spec.board.fd)
                self.governor = AcceptGovernor(
                    self.reactor, board, self.spec.board.slot, os.getpid()
                )
                self.tracker.onChange = self.governor.connectionsChanged
            for handle in self.spec.listeners:
                port = adopt(self.reactor, handle, factory)
                trackConnections(port, self.tracker)
                if self.governor is not None:
                    self.governor.govern(port)
                self.ports.append(port)
                os.close(handle.fd)
            if self.governor is not None:
                self.governor.start()
        except Exception:
            failure = Failure()
            self.log.failure("worker {number} could not start", failure, number=self.spec.number)
            reason = f"{type(failure.value).__name__}: {failure.getErrorMessage()}"
            self.control.callRemote(WorkerFailed, reason=reason).addBoth(
                lambda _: self.exit(EXIT_START_FAILED)
            )
            return
        self.control.callRemote(WorkerReady, pid=os.getpid())

    def drain(self, timeout: float) -> None:
        """
        Stop accepting, let open connections finish, exit when none is left
        or when C{timeout} seconds have passed.
        """
        if self._stopping:
            return
        self._stopping = True
        if self.governor is not None:
            self.governor.stop()
        for port in self.ports:
            release(port)
        self.log.info("draining {count} open connections", count=len(self.tracker.open))
        deadline = self.reactor.callLater(timeout, self._drainTimedOut)
        self.tracker.whenIdle(lambda: self._drained(deadline))

    def _drained(self, deadline: Any) -> None:
        if deadline.active():
            deadline.cancel()
        self.exit(0)

    def _drainTimedOut(self) -> None:
        self.log.warn(
            "closing {count} connections still open at the drain deadline",
            count=len(self.tracker.open),
        )
        self.tracker.closeAll()

    def parentGone(self) -> None:
        """
        The control channel closed: nobody supervises us any more, so stop
        at once rather than linger as an orphan.
        """
        if self.reactor.running:
            self.exit(0)

    def exit(self, code: int) -> None:
        self.exitCode = code
        if self.reactor.running:
            self.reactor.stop()


class WorkerControl(amp.AMP):
    """
    The worker's end of the control channel.
    """

    def __init__(self, worker: Worker, forwarder: ForwardingObserver) -> None:
        super().__init__()
        self.worker = worker
        self.forwarder = forwarder

    def connectionMade(self) -> None:
        super().connectionMade()
        self.worker.control = self
        self.forwarder.attach(lambda text: self.callRemote(LogEvent, event=text))

    @Drain.responder
    def drain(self, timeout: float) -> dict[str, Any]:
        self.worker.drain(timeout)
        return {}

    def connectionLost(self, reason: Failure) -> None:  # type: ignore[override]
        self.forwarder.detach()
        super().connectionLost(reason)
        self.worker.parentGone()


def _dieWithParent(parentPid: int) -> None:
    """
    Ask the kernel to kill us when the parent dies (Linux), and catch the
    case where it already has.
    """
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        pass
    if os.getppid() != parentPid:
        sys.exit(0)


def _handleSignals(reactor: Any, worker: Worker) -> None:
    """
    A terminal's Ctrl-C reaches the whole process group: the parent decides
    what the workers do, so they ignore SIGINT.  SIGTERM sent to one worker
    drains it; SIGUSR1 dumps every thread's stack to stderr (into the
    parent's log), even while the reactor is blocked.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, lambda *_: reactor.callFromThread(worker.drain, 30.0))
    faulthandler.register(signal.SIGUSR1, all_threads=True)


def main(argv: list[str]) -> int:
    spec = WorkerSpec.fromArgument(argv[1])
    _dieWithParent(spec.parentPid)
    faulthandler.enable()

    from twisted.internet import reactor

    forwarder = ForwardingObserver()
    globalLogBeginner.beginLoggingTo([forwarder], redirectStandardIO=False)
    worker = Worker(reactor, spec)

    reactor.adoptStreamConnection(  # type: ignore[attr-defined]
        CONTROL_FD,
        socket.AF_UNIX,
        Factory.forProtocol(lambda: WorkerControl(worker, forwarder)),
    )
    os.close(CONTROL_FD)
    reactor.callWhenRunning(_handleSignals, reactor, worker)
    reactor.callWhenRunning(worker.start)
    reactor.run()
    forwarder.detach()
    return worker.exitCode


if __name__ == "__main__":
    sys.exit(main(sys.argv))
