# -*- test-case-name: tests.test_pool -*-
"""
The parent's side: a supervised pool of worker processes.

The pool spawns each worker with the listening sockets and its control
socket as its only descriptors beyond stdio, follows each worker through
its states, replaces workers that die (backing off when they die young, as
L{twisted.runner.procmon} does), and drains them all when it stops.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import sys
from collections.abc import Callable, Sequence
from enum import Enum
from typing import Any

from twisted.application.service import Service
from twisted.internet import defer, error
from twisted.internet.protocol import Factory, ProcessProtocol
from twisted.logger import Logger
from twisted.protocols import amp
from twisted.python.failure import Failure

from maccept._board import MAX_SLOTS, LoadBoard
from maccept._listening import ListeningSocket
from maccept._logforward import LineLogger, reemit, workerSystem
from maccept._wire import (
    CONTROL_FD,
    FIRST_LISTENER_FD,
    BoardHandle,
    Drain,
    LogEvent,
    WorkerFailed,
    WorkerReady,
    WorkerSpec,
)


class WorkerState(Enum):
    STARTING = "starting"
    READY = "ready"
    STOPPING = "stopping"
    STOPPED = "stopped"


#: Every transition a worker makes: (state, event) -> next state.  An event
#: not listed for a state leaves it where it is.
TRANSITIONS: dict[tuple[WorkerState, str], WorkerState] = {
    (WorkerState.STARTING, "ready"): WorkerState.READY,
    (WorkerState.STARTING, "stop"): WorkerState.STOPPING,
    (WorkerState.STARTING, "exit"): WorkerState.STOPPED,
    (WorkerState.READY, "stop"): WorkerState.STOPPING,
    (WorkerState.READY, "exit"): WorkerState.STOPPED,
    (WorkerState.STOPPING, "exit"): WorkerState.STOPPED,
}


def describeExit(reason: Failure) -> str:
    """
    Say how a process ended: C{exit code 3}, C{signal 9 (SIGKILL)}.
    """
    value = reason.value
    if isinstance(value, error.ProcessTerminated) and value.signal is not None:
        try:
            name = signal.Signals(value.signal).name
        except ValueError:
            name = "unknown"
        return f"signal {value.signal} ({name})"
    code = getattr(value, "exitCode", None)
    return f"exit code {code if code is not None else 0}"


class WorkerProcess(ProcessProtocol):
    """
    One worker process, as the parent sees it.
    """

    log = Logger()

    def __init__(self, pool: WorkerPool, number: int, startedAt: float) -> None:
        self.pool = pool
        self.number = number
        self.startedAt = startedAt
        self.state = WorkerState.STARTING
        self.pid: int | None = None
        self.control: amp.AMP | None = None
        self.failureReason: str | None = None
        self.exitDescription: str | None = None
        self._killCall: Any = None
        self._stdout = LineLogger(lambda line: self._emitLine(line, "info"))
        self._stderr = LineLogger(lambda line: self._emitLine(line, "warn"))

    @property
    def system(self) -> str:
        return workerSystem(self.number, self.pid or 0)

    def handle(self, event: str) -> WorkerState:
        """
        Move to the state C{event} leads to from here (see L{TRANSITIONS}).
        """
        self.state = TRANSITIONS.get((self.state, event), self.state)
        return self.state

    def connectionMade(self) -> None:
        self.pid = self.transport.pid  # type: ignore[union-attr]
        self.transport.closeStdin()  # type: ignore[union-attr]

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        if childFD == 1:
            self._stdout.dataReceived(data)
        elif childFD == 2:
            self._stderr.dataReceived(data)

    def _emitLine(self, line: str, level: str) -> None:
        getattr(self.log, level)("{line}", line=line, log_system=self.system)

    def ready(self) -> None:
        if self.handle("ready") is WorkerState.READY:
            self.pool.workerReady(self)

    def failed(self, reason: str) -> None:
        self.failureReason = reason

    def stop(self, timeout: float, killAfter: float) -> None:
        """
        Ask the worker to drain within C{timeout} seconds; kill it if it is
        still alive C{killAfter} seconds later.
        """
        if self.handle("stop") is not WorkerState.STOPPING or self._killCall is not None:
            return
        if self.control is not None and self.control.transport is not None:
            self.control.callRemote(Drain, timeout=timeout).addErrback(lambda _: None)
        else:
            self.signal("TERM")
        self._killCall = self.pool.reactor.callLater(timeout + killAfter, self.signal, "KILL")

    def signal(self, name: str) -> None:
        with contextlib.suppress(error.ProcessExitedAlready):
            self.transport.signalProcess(name)  # type: ignore[union-attr]

    def processEnded(self, reason: Failure) -> None:
        self._stdout.flush()
        self._stderr.flush()
        if self._killCall is not None and self._killCall.active():
            self._killCall.cancel()
        self.exitDescription = describeExit(reason)
        self.handle("exit")
        self.pool.workerEnded(self)


class ParentControl(amp.AMP):
    """
    The parent's end of one worker's control channel.
    """

    def __init__(self, worker: WorkerProcess) -> None:
        super().__init__()
        self.worker = worker

    def connectionMade(self) -> None:
        super().connectionMade()
        self.worker.control = self

    @WorkerReady.responder
    def workerReady(self, pid: int) -> dict[str, Any]:
        self.worker.ready()
        return {}

    @WorkerFailed.responder
    def workerFailed(self, reason: str) -> dict[str, Any]:
        self.worker.failed(reason)
        return {}

    @LogEvent.responder
    def logEvent(self, event: str) -> dict[str, Any]:
        reemit(event, self.worker.system)
        return {}


class _Slot:
    """
    A place in the pool that one worker at a time fills, with the restart
    delay that the deaths of its previous occupants earned.
    """

    def __init__(self, number: int, delay: float) -> None:
        self.number = number
        self.delay = delay
        self.worker: WorkerProcess | None = None
        self.restartCall: Any = None


class WorkerPool(Service):
    """
    Keep C{size} workers accepting on C{listeners}.

    Restart policy, as in L{twisted.runner.procmon.ProcessMonitor}: a worker
    that lived at least C{threshold} seconds is replaced at once; one that
    died younger is replaced after C{delay}, which doubles with each young
    death from C{minRestartDelay} up to C{maxRestartDelay}.

    @ivar onFatal: called with one line when the pool cannot start at all:
        a worker failed before any worker was ever ready, or none was ready
        within C{startTimeout} seconds.
    """

    log = Logger()

    threshold = 1.0
    minRestartDelay = 1.0
    maxRestartDelay = 60.0
    startTimeout = 10.0
    killTime = 5.0
    gracefulTimeout = 30.0

    def __init__(
        self,
        reactor: Any,
        listeners: Sequence[ListeningSocket],
        protocol: str,
        size: int,
        onFatal: Callable[[str], None],
        executable: str = sys.executable,
        balance: bool = True,
    ) -> None:
        self.reactor = reactor
        self.listeners = list(listeners)
        self.protocol = protocol
        self.size = size
        self.onFatal = onFatal
        self.executable = executable
        self.slots = [_Slot(n, self.minRestartDelay) for n in range(1, size + 1)]
        self.everReady = False
        self.board: LoadBoard | None = None
        self._boardFd: int | None = None
        if balance:
            self.board, self._boardFd = LoadBoard.create()
        self._boardSlots: dict[WorkerProcess, int] = {}
        self._startTimeoutCall: Any = None
        self._stopped: defer.Deferred[None] | None = None

    @property
    def workers(self) -> list[WorkerProcess]:
        return [slot.worker for slot in self.slots if slot.worker is not None]

    def startService(self) -> None:
        super().startService()
        for slot in self.slots:
            self._spawn(slot)
        self._startTimeoutCall = self.reactor.callLater(self.startTimeout, self._startTimedOut)

    def stopService(self) -> defer.Deferred[None]:
        """
        Drain every worker; fire once all have exited.
        """
        super().stopService()
        if self._startTimeoutCall is not None and self._startTimeoutCall.active():
            self._startTimeoutCall.cancel()
        for slot in self.slots:
            if slot.restartCall is not None and slot.restartCall.active():
                slot.restartCall.cancel()
        self._stopped = defer.Deferred()
        for worker in self.workers:
            worker.stop(self.gracefulTimeout, self.killTime)
        self._checkStopped()
        return self._stopped

    def killAll(self) -> None:
        """
        Kill every worker now, open connections and all.
        """
        for worker in self.workers:
            worker.signal("KILL")

    def _checkStopped(self) -> None:
        if self._stopped is not None and not self.workers and not self._stopped.called:
            self._stopped.callback(None)

    def workerSpec(
        self, number: int, boardSlot: int | None = None
    ) -> tuple[WorkerSpec, dict[int, Any]]:
        """
        What worker C{number} is told, and the descriptors it gets: stdio,
        then its control socket, then one per listener, then the load board;
        nothing else.
        """
        childFDs: dict[int, Any] = {0: "w", 1: "r", 2: "r"}
        handles = []
        fd = FIRST_LISTENER_FD
        for listener in self.listeners:
            childFDs[fd] = listener.fileno()
            handles.append(listener.handleAt(fd))
            fd += 1
        board = None
        if self._boardFd is not None and boardSlot is not None:
            childFDs[fd] = self._boardFd
            board = BoardHandle(fd=fd, slot=boardSlot)
        spec = WorkerSpec(
            number=number,
            protocol=self.protocol,
            parentPid=os.getpid(),
            listeners=tuple(handles),
            board=board,
        )
        return spec, childFDs

    def _takeBoardSlot(self, worker: WorkerProcess) -> int | None:
        """
        Give C{worker} the lowest free slot on the load board.
        """
        if self.board is None:
            return None
        taken = set(self._boardSlots.values())
        slot = next(n for n in range(MAX_SLOTS) if n not in taken)
        self._boardSlots[worker] = slot
        self.board.clear(slot)
        self.board.slotsInUse = max(self.board.slotsInUse, slot + 1)
        return slot

    def _freeBoardSlot(self, worker: WorkerProcess) -> None:
        slot = self._boardSlots.pop(worker, None)
        if self.board is not None and slot is not None:
            self.board.clear(slot)
            self.board.slotsInUse = max(self._boardSlots.values(), default=-1) + 1

    def _spawn(self, slot: _Slot) -> None:
        slot.restartCall = None
        worker = WorkerProcess(self, slot.number, self.reactor.seconds())
        spec, childFDs = self.workerSpec(slot.number, self._takeBoardSlot(worker))
        parentEnd, childEnd = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            childFDs[CONTROL_FD] = childEnd.fileno()
            self.reactor.spawnProcess(
                worker,
                self.executable,
                [self.executable, "-m", "maccept._worker", spec.toArgument()],
                env=os.environ.copy(),
                childFDs=childFDs,
            )
            self.reactor.adoptStreamConnection(
                parentEnd.fileno(),
                socket.AF_UNIX,
                Factory.forProtocol(lambda: ParentControl(worker)),
            )
        finally:
            parentEnd.close()
            childEnd.close()
        slot.worker = worker
        self.log.info("started worker {number} (pid {pid})", number=slot.number, pid=worker.pid)

    def workerReady(self, worker: WorkerProcess) -> None:
        self.log.info("worker {number} (pid {pid}) ready", number=worker.number, pid=worker.pid)
        if not self.everReady and all(w.state is WorkerState.READY for w in self.workers):
            self.everReady = True
            if self._startTimeoutCall is not None and self._startTimeoutCall.active():
                self._startTimeoutCall.cancel()
            self.log.info(
                "all {count} workers ready on {listen}",
                count=len(self.workers),
                listen=" ".join(listener.address for listener in self.listeners),
            )

    def workerEnded(self, worker: WorkerProcess) -> None:
        self._freeBoardSlot(worker)
        slot = self.slots[worker.number - 1]
        if slot.worker is worker:
            slot.worker = None
        why = worker.exitDescription
        if worker.failureReason:
            why = f"{why}: {worker.failureReason}"
        if not self.running:
            self.log.info(
                "worker {number} (pid {pid}) exited, {why}",
                number=worker.number,
                pid=worker.pid,
                why=why,
            )
            self._checkStopped()
            return
        self.log.warn(
            "worker {number} (pid {pid}) died, {why}", number=worker.number, pid=worker.pid, why=why
        )
        if not self.everReady:
            self._fatal(
                f"worker {worker.number} failed to start: "
                f"{worker.failureReason or worker.exitDescription}"
            )
            return
        self._scheduleRestart(slot, self.reactor.seconds() - worker.startedAt)

    def _scheduleRestart(self, slot: _Slot, lifetime: float) -> None:
        if lifetime < self.threshold:
            delay = slot.delay
            slot.delay = min(slot.delay * 2, self.maxRestartDelay)
        else:
            delay = 0.0
            slot.delay = self.minRestartDelay
        if delay:
            self.log.warn(
                "worker {number} died young: restarting in {delay:.0f}s",
                number=slot.number,
                delay=delay,
            )
        slot.restartCall = self.reactor.callLater(delay, self._spawn, slot)

    def _startTimedOut(self) -> None:
        if not self.everReady:
            self._fatal(f"no worker became ready within {self.startTimeout:.0f}s")

    def _fatal(self, message: str) -> None:
        if self._startTimeoutCall is not None and self._startTimeoutCall.active():
            self._startTimeoutCall.cancel()
        self.everReady = True  # report once
        self.log.critical("{message}", message=message)
        self.onFatal(message)
