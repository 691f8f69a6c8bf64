# -*- test-case-name: tests.test_wire -*-
"""
The wire between the parent and a worker.

Two things cross it: the L{WorkerSpec}, handed to the worker once as its
only command-line argument, and the AMP commands below, which run over a
private UNIX socket pair (the worker's descriptor L{CONTROL_FD}).  Nothing
else of the parent's reaches a worker.
"""

from __future__ import annotations

import json
import socket
from dataclasses import asdict, dataclass, field
from typing import Any

from twisted.protocols import amp
from twisted.python.failure import Failure


class QuietAMP(amp.AMP):
    """
    AMP, less the line it logs as each connection opens and closes: one per
    worker started (twice, parent and worker) and one per C{maccept-ctl}
    call, routine all, would bury the lines that matter.
    """

    def makeConnection(self, transport: Any) -> None:
        amp.BinaryBoxProtocol.makeConnection(self, transport)

    def connectionLost(self, reason: Failure) -> None:  # type: ignore[override]
        amp.BinaryBoxProtocol.connectionLost(self, reason)
        self.transport = None


#: The worker's end of its control socket pair.
CONTROL_FD = 3

#: The first descriptor number at which a worker finds its listening sockets.
FIRST_LISTENER_FD = 4

_FAMILIES = {
    "AF_INET": socket.AF_INET,
    "AF_INET6": socket.AF_INET6,
    "AF_UNIX": socket.AF_UNIX,
}


@dataclass(frozen=True)
class ListenerHandle:
    """
    What a worker needs to adopt one listening socket: where it is, what
    family it is, and the description it came from (for logs and for the
    wrapping that a description may ask for).
    """

    fd: int
    family: str
    description: str
    #: C{stream} (TCP, UNIX) or C{datagram} (UDP).
    kind: str = "stream"

    @property
    def addressFamily(self) -> socket.AddressFamily:
        return _FAMILIES[self.family]


@dataclass(frozen=True)
class BoardHandle:
    """
    Where a worker finds the load board (L{maccept._board}) and which slot
    of it is its own.
    """

    fd: int
    slot: int


@dataclass(frozen=True)
class WorkerSpec:
    """
    Everything a worker is told at start-up.  Serialised as one JSON
    command-line argument so that C{ps} shows what a worker is.
    """

    number: int
    protocol: str
    parentPid: int
    listeners: tuple[ListenerHandle, ...] = field(default_factory=tuple)
    board: BoardHandle | None = None
    #: Seconds a drain may take when the worker itself gets SIGTERM.
    gracefulTimeout: float = 30.0
    #: Seconds between heartbeats (the parent's watchdog listens for them).
    heartbeatInterval: float = 1.0
    #: Ask to be replaced after accepting this many connections (None: never).
    recycleAfter: int | None = None
    #: Stop accepting at this many open connections (None: no limit).
    maxConcurrent: int | None = None
    #: Close connections silent for this many seconds (0: never).
    idleTimeout: float = 0.0
    #: The reactor to run (see L{maccept._reactor.WORKER_REACTORS}).
    reactor: str = "fast"
    #: C{--protocol-option} values, for a protocol plugin.
    protocolOptions: tuple[str, ...] = ()
    #: The directory the parent checked them in (where the command was
    #: given): a relative path in them means the same in a worker, which
    #: starts in twistd's C{--rundir}.
    optionsDirectory: str | None = None
    #: The CPU to run on (C{--cpu-affinity}; None: wherever the parent may).
    cpu: int | None = None

    def toArgument(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def fromArgument(cls, text: str) -> WorkerSpec:
        raw = json.loads(text)
        listeners = tuple(ListenerHandle(**each) for each in raw.pop("listeners"))
        board = raw.pop("board", None)
        protocolOptions = tuple(raw.pop("protocolOptions", ()))
        return cls(
            listeners=listeners,
            board=BoardHandle(**board) if board else None,
            protocolOptions=protocolOptions,
            **raw,
        )


# Worker to parent.


class WorkerReady(amp.Command):
    """
    The worker has adopted every listening socket and accepts connections.
    """

    arguments = [(b"pid", amp.Integer())]
    response = []


class WorkerFailed(amp.Command):
    """
    The worker could not start; C{reason} is one line naming why.
    """

    arguments = [(b"reason", amp.Unicode())]
    response = []


class LogEvent(amp.Command):
    """
    One L{twisted.logger} event from the worker, as JSON
    (L{twisted.logger.eventAsJSON}).
    """

    arguments = [(b"event", amp.Unicode())]
    requiresAnswer = False


#: A worker's counters since it started, and its reactor's worst lag (in
#: seconds) since the previous report.
STATS = [
    (b"accepted", amp.Integer()),
    (b"open", amp.Integer()),
    (b"bytesReceived", amp.Integer()),
    (b"bytesSent", amp.Integer()),
    (b"idleClosed", amp.Integer()),
    (b"proxyRejected", amp.Integer()),
    # Optional: a worker of older code (a reload after a rollback) does not
    # send it.
    (b"handshakesFailed", amp.Integer(optional=True)),
    (b"shed", amp.Integer(optional=True)),
    (b"acceptPausesAhead", amp.Integer(optional=True)),
    (b"acceptPausesFull", amp.Integer(optional=True)),
    (b"emptyWakeups", amp.Integer(optional=True)),
    (b"acceptBatches", amp.Integer(optional=True)),
    (b"resets", amp.Integer(optional=True)),
    (b"lag", amp.Float()),
]

#: Those of L{STATS} that only grow (all but the open connections and the
#: lag): the pool sums them over every worker there ever was.
COUNTERS = tuple(name.decode() for name, _ in STATS if name not in (b"open", b"lag"))


class Heartbeat(amp.Command):
    """
    The worker's reactor is turning; with its counters so far.
    """

    arguments = STATS
    requiresAnswer = False


class Farewell(amp.Command):
    """
    The worker's last counters, sent just before it exits; it waits for the
    answer so that the parent folds every connection and byte into its
    totals.
    """

    arguments = STATS
    response = []


class ReplaceMe(amp.Command):
    """
    The worker asks to be replaced (it reached C{--max-connections}); it
    keeps serving until the parent tells it to drain.  C{signalled}: it
    received SIGTERM and drains already.
    """

    arguments = [(b"reason", amp.Unicode()), (b"signalled", amp.Boolean(optional=True))]
    requiresAnswer = False


# Parent to worker.


class Drain(amp.Command):
    """
    Stop accepting now, finish the open connections, then exit.  Connections
    still open after C{timeout} seconds are closed.
    """

    arguments = [(b"timeout", amp.Float())]
    response = []


#: The largest value AMP carries in one argument.
MAX_VALUE_LENGTH = amp.MAX_VALUE_LENGTH
