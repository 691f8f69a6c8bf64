# -*- test-case-name: tests.test_pool -*-
"""
Starting one worker process, for the pool.

A worker gets stdio, its control socket, the listening sockets and the
load board, and no other descriptor of the parent's: everything it is
told travels in one L{WorkerSpec} on its command line.
"""

from __future__ import annotations

import errno
import os
import random
import socket
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from twisted.internet.protocol import Factory

from maccept._affinity import cpuForWorker
from maccept._board import MAX_SLOTS, LoadBoard
from maccept._listening import ListeningSocket
from maccept._signals import spawnSignalsBlocked
from maccept._watchdog import beatInterval
from maccept._wire import CONTROL_FD, FIRST_LISTENER_FD, BoardHandle, WorkerSpec
from maccept._workerprocess import ParentControl, WorkerProcess

if TYPE_CHECKING:
    from maccept._pool import PoolSettings


#: C{-m} puts the current directory first on C{sys.path}, where the parent
#: has its own first entry: twistd's directory, or the current directory
#: only when it was started as C{python -m twisted}.  A C{maccept/} or any
#: module of a dependency's name in the directory maccept was started from
#: would shadow the installed one in the workers only (a checkout pulled
#: but not installed, say, would run its new worker code on HUP).  C{-P}
#: (Python 3.11 on) leaves it out, and L{workerEnvironment} puts the
#: parent's first entry in its place, so that a worker imports what the
#: parent would.
SAFE_PATH = ("-P",) if sys.version_info >= (3, 11) else ()


#: The parent's first path entry, read as it loads maccept: before twistd
#: changes into its --rundir, which would make C{""} (the current
#: directory) another directory.
_PATH_HEAD = os.path.abspath(sys.path[0]) if sys.path else None


def absolutePythonPath(raw: str | None) -> str:
    """
    C{PYTHONPATH} with its relative entries made absolute, here: C{.}, or
    an empty one, which Python reads as the current directory too
    (C{export PYTHONPATH=/x:$PYTHONPATH} with none set gives C{/x:}).
    """
    if not raw:
        return ""
    return os.pathsep.join(os.path.abspath(entry) for entry in raw.split(os.pathsep))


#: C{PYTHONPATH} as the parent read it, made absolute before the same
#: change of directory.
_PYTHONPATH = absolutePythonPath(os.environ.get("PYTHONPATH"))


def workerEnvironment() -> dict[str, str]:
    """
    The parent's environment, with the first entry of the parent's
    C{sys.path} first on C{PYTHONPATH}, and C{PYTHONPATH}'s entries as the
    parent found them (a worker starts in twistd's C{--rundir}).
    """
    environment = os.environ.copy()
    entries = [entry for entry in (_PATH_HEAD, _PYTHONPATH) if entry]
    if entries:
        environment["PYTHONPATH"] = os.pathsep.join(entries)
    return environment


class WorkerLauncher:
    """
    Start worker processes, each with its descriptors and its slot on the
    load board (if the pool balances), and free the slot once it is gone.
    """

    def __init__(
        self,
        reactor: Any,
        listeners: Sequence[ListeningSocket],
        settings: PoolSettings,
        board: tuple[LoadBoard, int] | None,
        executable: str,
        rng: random.Random,
    ) -> None:
        self.reactor = reactor
        self.listeners = listeners
        self.settings = settings
        self.board: LoadBoard | None = None
        self._boardFd: int | None = None
        if board is not None:
            self.board, self._boardFd = board
        self.executable = executable
        self.rng = rng
        #: The board slot of every worker alive, starting or draining.
        self.boardSlots: dict[WorkerProcess, int] = {}

    def workerSpec(
        self, number: int, boardSlot: int | None = None
    ) -> tuple[WorkerSpec, dict[int, Any]]:
        """
        What worker C{number} is told, and the descriptors it gets besides
        its control socket (which L{launch} adds): stdio, one per listener,
        then the load board; nothing else.
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
        settings = self.settings
        recycleAfter = None
        if settings.maxConnections is not None:
            jitter = self.rng.randint(0, settings.maxConnectionsJitter)
            recycleAfter = settings.maxConnections + jitter
        spec = WorkerSpec(
            number=number,
            protocol=settings.protocol,
            protocolOptions=settings.protocolOptions,
            optionsDirectory=settings.optionsDirectory,
            parentPid=os.getpid(),
            listeners=tuple(handles),
            board=board,
            gracefulTimeout=settings.gracefulTimeout,
            heartbeatInterval=beatInterval(settings.watchdogTimeout),
            recycleAfter=recycleAfter,
            maxConcurrent=settings.maxConcurrent,
            idleTimeout=settings.idleTimeout,
            reactor=settings.reactor,
            cpu=cpuForWorker(number, settings.cpus),
        )
        return spec, childFDs

    def launch(self, worker: WorkerProcess) -> None:
        """
        Start C{worker}'s process and connect its control channel.  A
        process that runs but cannot be connected is killed: it ends as a
        crash, and is restarted as one.

        @raise OSError: no process could be started (out of descriptors,
            processes, memory or board slots); nothing is left taken.
        """
        spec, childFDs = self.workerSpec(worker.number, self._takeBoardSlot(worker))
        try:
            parentEnd, childEnd = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        except OSError:
            self.freeBoardSlot(worker)
            raise
        try:
            childFDs[CONTROL_FD] = childEnd.fileno()
            try:
                with spawnSignalsBlocked():
                    self.reactor.spawnProcess(
                        worker,
                        self.executable,
                        [self.executable, *SAFE_PATH, "-m", "maccept._worker", spec.toArgument()],
                        env=workerEnvironment(),
                        childFDs=childFDs,
                    )
            except OSError:
                self.freeBoardSlot(worker)
                raise
            try:
                self.reactor.adoptStreamConnection(
                    parentEnd.fileno(),
                    socket.AF_UNIX,
                    Factory.forProtocol(lambda: ParentControl(worker)),
                )
            except OSError as e:
                worker.failureReason = f"no control channel: {e}"
                worker.signal("KILL")
        finally:
            parentEnd.close()
            childEnd.close()

    def _takeBoardSlot(self, worker: WorkerProcess) -> int | None:
        """
        Give C{worker} the lowest free slot on the load board.
        """
        if self.board is None:
            return None
        taken = set(self.boardSlots.values())
        slot = next((n for n in range(MAX_SLOTS) if n not in taken), None)
        if slot is None:
            # Reloads in a row of a pool near MAX_WORKERS, its old workers
            # still draining: as for any worker that cannot start now.
            raise OSError(errno.ENOSPC, f"all {MAX_SLOTS} load board slots are taken")
        self.boardSlots[worker] = slot
        self.board.clear(slot)
        self.board.slotsInUse = max(self.board.slotsInUse, slot + 1)
        return slot

    def freeBoardSlot(self, worker: WorkerProcess) -> None:
        """
        C{worker} is gone (or never started): its slot is free, and cleared
        so that no one counts it.
        """
        slot = self.boardSlots.pop(worker, None)
        if self.board is not None and slot is not None:
            self.board.clear(slot)
            self.board.slotsInUse = max(self.boardSlots.values(), default=-1) + 1
