# -*- test-case-name: tests.test_worker -*-
"""
A worker process: adopt the parent's listening sockets, accept, serve.

Run by the parent as C{python -m maccept._worker SPEC}.  The worker talks to
its parent only over the control socket at L{CONTROL_FD}; when that closes
the parent is gone and the worker exits.
"""

from __future__ import annotations

import contextlib
import ctypes
import faulthandler
import os
import signal
import socket
import sys
from collections.abc import Callable, Iterator
from typing import Any

from twisted.internet import defer, tcp
from twisted.internet.interfaces import IListeningPort, IProtocolFactory
from twisted.internet.protocol import Factory
from twisted.internet.task import LoopingCall
from twisted.logger import Logger, globalLogBeginner
from twisted.protocols import amp
from twisted.python.failure import Failure

from maccept._accepting import AcceptGovernor
from maccept._acceptloop import acceptQuickly
from maccept._adopting import adopt, release
from maccept._affinity import pinTo
from maccept._board import LoadBoard
from maccept._builtins import DatagramEcho
from maccept._connections import ConnectionTracker, queuedBytes, trackConnections
from maccept._lag import LagMeter
from maccept._logforward import ForwardingObserver
from maccept._procfs import childrenOf
from maccept._protocols import ProtocolSpecError, resolveProtocol
from maccept._signals import PARENT_SIGNALS, UPGRADE_BLOCKED
from maccept._titles import setTitle
from maccept._wire import (
    CONTROL_FD,
    Drain,
    Farewell,
    Heartbeat,
    LogEvent,
    QuietAMP,
    ReplaceMe,
    WorkerFailed,
    WorkerReady,
    WorkerSpec,
)
from maccept.interfaces import IWorkerLifecycle

#: Exit status of a worker that could not start.
EXIT_START_FAILED = 3

_PR_SET_PDEATHSIG = 1

#: How many queued connections a draining worker accepts in its last sweep.
_SWEEP = 10000


def _describe(failure: Failure) -> str:
    if failure.check(ProtocolSpecError):
        # maccept's own check of what --protocol names: its words suffice.
        return f"--protocol: {failure.getErrorMessage()}"
    return f"{type(failure.value).__name__}: {failure.getErrorMessage()}"


class Worker:
    """
    The life of one worker: start, serve, drain, exit.

    @ivar exitCode: the status the process exits with once the reactor stops.
    """

    log = Logger()

    def __init__(self, reactor: Any, spec: WorkerSpec) -> None:
        self.reactor = reactor
        self.spec = spec
        self.tracker = ConnectionTracker(onChange=self._connectionsChanged)
        self.governor: AcceptGovernor | None = None
        self.factory: IProtocolFactory | None = None
        self.ports: list[IListeningPort] = []
        #: Each port's accept loop with no governor around it.
        self._acceptLoops: dict[IListeningPort, Callable[[], None]] = {}
        #: UDP ports: served by RFC 862 echo, whatever --protocol says.
        self.datagramPorts: list[Any] = []
        self.control: amp.AMP | None = None
        self.exitCode = 0
        self.draining = False
        #: Whether the start hook has finished and the ports accept.
        self.accepting = False
        #: The start (adoption, then the start hook): cancelled by a drain.
        self._starting: defer.Deferred[None] = defer.succeed(None)
        self._drainTimeout = 0.0
        self._drainFinishing = False
        self._askedForReplacement = False
        self._heartbeat = LoopingCall(self.sendHeartbeat)
        self._heartbeat.clock = reactor
        self._idleReaper = LoopingCall(self.closeIdle)
        self._idleReaper.clock = reactor
        self.lag = LagMeter(reactor)

    # Starting.

    def start(self) -> defer.Deferred[None]:
        """
        Build the protocol factory, adopt every listener, run the start hook,
        then accept and tell the parent we are ready; or tell it why not and
        exit.
        """
        d = defer.maybeDeferred(self._adoptAll)
        d.addCallback(lambda _: self._hook("workerStarting", self.reactor))
        d.addCallback(lambda _: self._startAccepting())
        d.addErrback(self._startFailed)
        self._starting = d
        return d

    def _adoptAll(self) -> None:
        with _workingIn(self.spec.optionsDirectory):
            self.factory = resolveProtocol(self.spec.protocol, self.spec.protocolOptions)()
        board, slot = None, 0
        if self.spec.board is not None:
            board, slot = LoadBoard.attach(self.spec.board.fd), self.spec.board.slot
        if board is not None or self.spec.maxConcurrent is not None:
            self.governor = AcceptGovernor(
                self.reactor, board, slot, os.getpid(), self.spec.maxConcurrent
            )
        echoPorts: set[int] = set()  # each UDP echo refuses all their datagrams
        for handle in self.spec.listeners:
            if handle.kind == "datagram":
                # The largest datagram, not Twisted's 8192: RFC 862 echoes
                # it whole.
                datagramPort = self.reactor.adoptDatagramPort(
                    handle.fd, handle.addressFamily, DatagramEcho(self.tracker, echoPorts), 65535
                )
                datagramPort.stopReading()
                self.datagramPorts.append(datagramPort)
                os.close(handle.fd)
                continue
            port = adopt(
                self.reactor,
                handle,
                self.factory,
                self.tracker.proxyRejected,
                self.tracker.handshakeFailed,
            )
            # Accept nothing before the start hook has run.
            port.stopReading()  # type: ignore[attr-defined]
            if isinstance(port, tcp.Port):
                self._acceptLoops[port] = acceptQuickly(
                    port, self.tracker.shed, self._wokeForNothing, self.tracker.acceptedBatch
                )
            trackConnections(port, self.tracker)
            if self.governor is not None:
                self.governor.govern(port)
            self.ports.append(port)
            os.close(handle.fd)

    def _startAccepting(self) -> None:
        if self.draining:
            # Asked to drain while the start hook ran: serve nothing, and
            # let go of any port adopted since.
            self._releasePorts()
            self._finishDraining()
            return
        self.accepting = True
        for port in [*self.ports, *self.datagramPorts]:
            port.startReading()
        if self.governor is not None:
            self.governor.start()
        self._heartbeat.start(self.spec.heartbeatInterval, now=False)
        if self.spec.idleTimeout > 0:
            # A connection is closed between 1 and 1.25 timeouts after its
            # last byte (for timeouts of 0.4 s and more).
            self._idleReaper.start(max(0.1, self.spec.idleTimeout / 4), now=False)
        self.lag.start()
        self._call(WorkerReady, pid=os.getpid())

    def _startFailed(self, failure: Failure) -> None:
        if self.draining:
            # Told to go while it started: its start hook was cancelled
            # (or failed meanwhile), and it leaves as a drained worker.
            if not failure.check(defer.CancelledError):
                self.log.failure("the start hook failed as the worker drained", failure)
            self._startAccepting()
            return
        if failure.check(ProtocolSpecError):
            # Its message names the problem and where: no traceback.
            self.log.error(
                "worker {number} could not start: {why}",
                number=self.spec.number,
                why=_describe(failure),
            )
        else:
            self.log.failure("worker {number} could not start", failure, number=self.spec.number)
        d = self._call(WorkerFailed, reason=_describe(failure))
        d.addBoth(lambda _: self.exit(EXIT_START_FAILED))

    # Serving.

    def _connectionsChanged(self, count: int) -> None:
        if self.governor is not None:
            self.governor.connectionsChanged(count)
        limit = self.spec.recycleAfter
        if limit is not None and self.tracker.accepted >= limit and not self._askedForReplacement:
            self._askedForReplacement = True
            self._call(ReplaceMe, reason=f"accepted {self.tracker.accepted} connections")

    def _wokeForNothing(self) -> None:
        # A draining worker's sweep of the backlog was not woken by anything.
        if not self.draining:
            self.tracker.wokeForNothing()

    def closeIdle(self) -> None:
        """
        Close the connections that stayed silent for C{--idle-timeout}.
        """
        try:
            closed = self.tracker.closeIdle(self.spec.idleTimeout)
        except Exception:
            # Never let one bad transport stop the reaper for good.
            self.log.failure("closing idle connections failed")
            return
        if closed:
            self.log.info(
                "closed {count} connection(s) silent for {timeout}s",
                count=closed,
                timeout=self.spec.idleTimeout,
            )

    def stats(self) -> dict[str, Any]:
        """
        The counters the parent folds into its metrics (see L{STATS}).
        """
        tracker = self.tracker
        governor = self.governor
        return {
            "accepted": tracker.accepted,
            "open": len(tracker.open),
            "bytesReceived": tracker.bytesReceived,
            "bytesSent": tracker.bytesSent,
            "idleClosed": tracker.idleClosed,
            "proxyRejected": tracker.proxyRejectedCount,
            "handshakesFailed": tracker.handshakesFailedCount,
            "shed": tracker.shedding.total,
            "resets": tracker.resets.total,
            "acceptPausesAhead": governor.pausesAhead if governor else 0,
            "acceptPausesFull": governor.pausesFull if governor else 0,
            "emptyWakeups": tracker.emptyWakeups,
            "acceptBatches": tracker.acceptBatches,
            "lag": self.lag.worstSinceLastAsked(),
        }

    def sendHeartbeat(self) -> None:
        self._call(Heartbeat, **self.stats())
        if isinstance(self.control, WorkerControl):
            self.control.forwarder.reportDropped()

    # Draining.

    def terminate(self) -> None:
        """
        SIGTERM sent to this worker alone: ask the parent for a replacement
        first, so that the pool takes the exit for a recycling rather than
        a crash (and restarts at once, without a crash's back-off), then
        drain.
        """
        if not self.draining:
            self._call(ReplaceMe, reason="it received SIGTERM", signalled=True)
        self.drain(self.spec.gracefulTimeout)

    def drain(self, timeout: float) -> None:
        """
        Stop accepting (after taking whatever already waits in the backlog),
        let open connections finish, then exit when none is left or when
        C{timeout} seconds have passed.

        Before the start hook has finished the factory may not serve yet:
        the ports close without a sweep, and the drain goes on once the
        hook is done.
        """
        if self.draining:
            return
        self.draining = True
        self._drainTimeout = timeout
        if self.governor is not None:
            self.governor.stop()
        if self.accepting:
            for port in self.ports:
                self._sweep(port)
        self._releasePorts()
        if not self.accepting:
            # Nothing served yet: the start is cut short (the hook's
            # Deferred cancelled), not waited for.
            self.log.info("draining before the start hook has finished: cancelling it")
            try:
                self._starting.cancel()
            except Exception:
                # A canceller of the hook's own that raises: drain without
                # waiting for the hook, which may never end now.
                self.log.failure("cancelling the start hook failed")
                self._finishDraining()
            return
        self._finishDraining()

    def _releasePorts(self) -> None:
        for port in [*self.ports, *self.datagramPorts]:
            release(port)

    def _finishDraining(self) -> None:
        if self._drainFinishing:
            return  # a start hook that ended after all, its drain begun
        self._drainFinishing = True
        self.log.info(
            "draining {count} open connections (at most {timeout}s)",
            count=len(self.tracker.open),
            timeout=f"{self._drainTimeout:g}",
        )
        hook = defer.maybeDeferred(self._hook, "workerDraining")
        hook.addErrback(lambda f: self.log.failure("workerDraining hook failed", f))
        deadline = self.reactor.callLater(self._drainTimeout, self._drainTimedOut)
        self.tracker.whenIdle(lambda: self._drained(deadline))

    def _sweep(self, port: Any) -> None:
        """
        Accept every connection already queued on C{port}, so that the last
        worker to close the socket does not reset them.
        """
        if not getattr(port, "connected", False):
            return
        limit = _SWEEP
        if self.spec.maxConcurrent is not None:
            # Never beyond --max-concurrent, not even on the way out.
            limit = self.spec.maxConcurrent - len(self.tracker.open)
        if limit <= 0:
            return
        port.numberAccepts = limit
        acceptLoop = self._acceptLoops.get(port)
        if acceptLoop is None:
            type(port).doRead(port)
        else:
            acceptLoop()

    def _drained(self, deadline: Any) -> None:
        if deadline.active():
            deadline.cancel()
        d = defer.maybeDeferred(self._hook, "workerStopping")
        d.addErrback(lambda f: self.log.failure("workerStopping hook failed", f))
        d.addBoth(lambda _: self.exit(0))

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
        """
        Send the parent our last counters, then stop the reactor.
        """
        self.exitCode = code
        if self._heartbeat.running:
            self._heartbeat.stop()
        if self._idleReaper.running:
            self._idleReaper.stop()
        self.lag.stop()
        self._stopFactories()
        farewell = self._call(Farewell, **self.stats())
        timeout = self.reactor.callLater(self.farewellTimeout, farewell.cancel)
        farewell.addBoth(lambda _: self._stopReactor(timeout))

    farewellTimeout = 2.0

    def _stopFactories(self) -> None:
        """
        Tell each port's factory that it stops (C{stopFactory}, once its
        last port does), as C{stopListening} would: releasing a port only
        closes this worker's copy of the socket (L{release}).  Once, as the
        worker leaves: after its connections and its C{workerStopping}
        hook, or, with the parent gone, before the reactor drops what is
        still open, the order twistd keeps.
        """
        if self.governor is not None:
            # No resuming of a released port as the last connections close.
            self.governor.stop()
        # Released first if they still accept (the parent gone): else the
        # reactor's shutdown would stop the factory a second time.
        self._releasePorts()
        ports, self.ports = self.ports, []
        for port in ports:
            try:
                port.factory.doStop()  # type: ignore[attr-defined]
            except Exception:
                self.log.failure("stopFactory failed")

    def _stopReactor(self, timeout: Any) -> None:
        if timeout.active():
            timeout.cancel()
        if self.reactor.running:
            self.reactor.stop()

    # Helpers.

    def _hook(self, name: str, *args: Any) -> Any:
        if self.factory is not None and IWorkerLifecycle.providedBy(self.factory):
            return getattr(self.factory, name)(*args)
        if callable(getattr(self.factory, name, None)):
            # Written as a hook, but not declared one: say so, or the
            # author wonders why it never runs.
            self.log.warn(
                "the factory has a {name} method but does not provide IWorkerLifecycle"
                " (@implementer(IWorkerLifecycle) on its class): not run",
                name=name,
            )
        return None

    def _call(self, command: type[amp.Command], **arguments: Any) -> defer.Deferred[Any]:
        """
        Send C{command} to the parent; a lost channel is not an error here
        (L{parentGone} deals with it).
        """
        if self.control is None or self.control.transport is None:
            return defer.succeed(None)
        try:
            result = self.control.callRemote(command, **arguments)
        except Exception:
            return defer.succeed(None)
        return result if result is not None else defer.succeed(None)


class WorkerControl(QuietAMP):
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
        self.forwarder.attach(
            lambda text: self.callRemote(LogEvent, event=text),
            lambda: queuedBytes(self.transport) or 0,
        )

    @Drain.responder
    def drain(self, timeout: float) -> dict[str, Any]:
        self.worker.drain(timeout)
        return {}

    def connectionLost(self, reason: Failure) -> None:  # type: ignore[override]
        self.forwarder.detach()
        super().connectionLost(reason)
        self.worker.parentGone()


@contextlib.contextmanager
def _workingIn(directory: str | None) -> Iterator[None]:
    """
    Run the block in C{directory}, then go back to the worker's own (twistd's
    C{--rundir}); in the worker's own if C{directory} is gone.
    """
    here = os.getcwd()
    if directory is not None:
        with contextlib.suppress(OSError):
            os.chdir(directory)
    try:
        yield
    finally:
        os.chdir(here)


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


def _ignoreSignalsWhileLeaving() -> None:
    """
    Ignore SIGTERM once the reactor has stopped: there is nothing left to
    drain, and as the interpreter finalizes it puts back the default
    action of a signal with a Python handler, which ends the process, so a
    second TERM arriving then would turn a clean exit into a death by
    signal, counted as a crash.  (SIGUSR1 still dumps the stacks, of the
    threads the interpreter waits for too: see L{_handleSignals}.)
    """
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _handleSignals(reactor: Any, worker: Worker) -> None:
    """
    The parent decides what the workers do, so they ignore its signals
    (L{PARENT_SIGNALS}).  SIGTERM sent to one worker has it replaced and
    drained; SIGUSR1 dumps every thread's stack to stderr (into the
    parent's log), even while the reactor is blocked.  The parent started
    the worker with these blocked (L{SPAWN_BLOCKED}), so one that came
    while the worker started up is taken now, by these handlers; a new
    parent (USR2) that had not yet unblocked its own (L{UPGRADE_BLOCKED})
    passed SIGUSR1 on blocked too.
    """
    for parentSignal in PARENT_SIGNALS:
        signal.signal(parentSignal, signal.SIG_IGN)
    signal.signal(
        signal.SIGTERM,
        lambda *_: reactor.callFromThread(worker.terminate),
    )
    # Ignored first, so that what faulthandler puts back as the
    # interpreter finalizes is "ignore", not the default that ends the
    # process; until then (threads it waits for included) it dumps.
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, UPGRADE_BLOCKED)


def main(argv: list[str]) -> int:
    spec = WorkerSpec.fromArgument(argv[1])
    _dieWithParent(spec.parentPid)
    faulthandler.enable()
    setTitle(f"maccept: worker {spec.number}")

    from maccept._reactor import install

    reactor = install(spec.reactor)

    forwarder = ForwardingObserver()
    globalLogBeginner.beginLoggingTo([forwarder], redirectStandardIO=False)
    worker = Worker(reactor, spec)
    if spec.cpu is not None:
        try:
            pinTo(spec.cpu)
        except OSError as e:  # the CPU was taken away since the parent checked
            worker.log.warn(
                "--cpu-affinity: worker {number} cannot run on CPU {cpu}: {reason}; "
                "it runs where the parent may",
                number=spec.number,
                cpu=spec.cpu,
                reason=e.strerror,
            )
    reactor.adoptStreamConnection(
        CONTROL_FD,
        socket.AF_UNIX,
        Factory.forProtocol(lambda: WorkerControl(worker, forwarder)),
    )
    os.close(CONTROL_FD)
    reactor.callWhenRunning(_handleSignals, reactor, worker)
    reactor.callWhenRunning(worker.start)
    reactor.run()
    _ignoreSignalsWhileLeaving()
    forwarder.detach()
    _endChildren()
    return worker.exitCode


def _endChildren() -> None:
    """
    Send TERM to the processes the worker started and left running (its
    protocol's: a subprocess, a helper): they would outlive the server,
    hold its output pipes, and, under twistd, be no one's to stop.
    """
    left = childrenOf(os.getpid())
    for pid in left:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGTERM)
    if left:
        Worker.log.info(
            "sent TERM to the {count} process(es) it started and left running: {pids}",
            count=len(left),
            pids=" ".join(map(str, left)),
        )


if __name__ == "__main__":
    sys.exit(main(sys.argv))
