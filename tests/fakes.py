"""
Test doubles for maccept's unit tests: a reactor that records the processes
it is asked to spawn, the listening sockets a pool hands down, the ports a
worker adopts, and a control channel that records what it is told.

Nothing here starts a process, binds a socket or spins a real reactor.  And
a stand-in for the kernel's CPU topology in /sys.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from twisted.internet import defer
from twisted.internet.address import IPv4Address
from twisted.internet.error import (
    ConnectionDone,
    ProcessDone,
    ProcessExitedAlready,
    ProcessTerminated,
)
from twisted.internet.interfaces import IListeningPort, IProcessTransport
from twisted.internet.task import Clock, LoopingCall
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from maccept._listening import ListeningSocket

# The parent side: processes.

#: The signal names Twisted's process transport translates to numbers.
_SIGNAL_NAMES = ("HUP", "STOP", "INT", "KILL", "TERM")


@implementer(IProcessTransport)
class FakeProcess:
    """
    The transport of one process spawned by L{ProcessMemoryReactor}, with
    the arguments of the C{spawnProcess} call that made it.

    @ivar signals: every signal sent with C{signalProcess}, in order.
    @ivar ended: whether L{end} was called; a process that ended refuses
        signals with L{ProcessExitedAlready}, as a real one does.
    """

    def __init__(
        self,
        reactor: ProcessMemoryReactor,
        pid: int,
        processProtocol: Any,
        executable: str,
        args: list[str],
        env: dict[str, str] | None,
        path: str | None,
        uid: int | None,
        gid: int | None,
        usePTY: bool,
        childFDs: dict[int, Any] | None,
    ) -> None:
        self.reactor = reactor
        self.pid: int | None = pid
        self.originalPid = pid
        self.proto = processProtocol
        self.executable = executable
        self.args = list(args)
        self.env = env
        self.path = path
        self.uid = uid
        self.gid = gid
        self.usePTY = usePTY
        self.childFDs = dict(childFDs) if childFDs is not None else None
        self.signals: list[int] = []
        self.stdinClosed = False
        self.closedChildFDs: list[int] = []
        self.written: list[tuple[int, bytes]] = []
        self.lostConnection = False
        self.ended = False
        self._heldReason: Failure | None = None

    # IProcessTransport

    def signalProcess(self, signalID: str | int) -> None:
        """
        Record the signal as the number the process gets.  Like Twisted's
        own process transport, translate only the names C{HUP}, C{STOP},
        C{INT}, C{KILL} and C{TERM}: another name would reach C{os.kill} as
        a string and fail.
        """
        if signalID in _SIGNAL_NAMES:
            signalID = getattr(signal, f"SIG{signalID}")
        if not isinstance(signalID, int):
            raise TypeError(f"os.kill() cannot send signal {signalID!r}")
        if self.ended:
            raise ProcessExitedAlready()
        self.signals.append(signalID)

    def closeStdin(self) -> None:
        self.stdinClosed = True

    def closeStdout(self) -> None:
        self.closedChildFDs.append(1)

    def closeStderr(self) -> None:
        self.closedChildFDs.append(2)

    def closeChildFD(self, descriptor: int) -> None:
        self.closedChildFDs.append(descriptor)
        if self._heldReason is not None and {1, 2} <= set(self.closedChildFDs):
            reason, self._heldReason = self._heldReason, None
            self.proto.processEnded(reason)

    def writeToChild(self, childFD: int, data: bytes) -> None:
        self.written.append((childFD, data))

    def write(self, data: bytes) -> None:
        self.written.append((0, data))

    def writeSequence(self, data: Iterable[bytes]) -> None:
        for chunk in data:
            self.write(chunk)

    def loseConnection(self) -> None:
        self.lostConnection = True

    def getPeer(self) -> Any:
        return None

    def getHost(self) -> Any:
        return None

    # Driving the process from a test.

    def output(self, childFD: int, data: bytes) -> None:
        """
        The process wrote C{data} to its descriptor C{childFD}.
        """
        self.proto.childDataReceived(childFD, data)

    def end(self, exitCode: int = 0, signal: int | None = None) -> None:
        """
        The process exited with C{exitCode}, or was killed by C{signal}:
        deliver C{processExited} and C{processEnded} as the reactor does.
        """
        if self.ended:
            raise AssertionError(f"process {self.originalPid} already ended")
        self.ended = True
        self.pid = None
        reason = exitReason(exitCode, signal)
        self.proto.processExited(reason)
        self.proto.processEnded(reason)

    def exitHoldingPipes(self, exitCode: int = 0, signal: int | None = None) -> None:
        """
        The process exited, but a child of its own holds its output pipes
        open: C{processExited} only, and C{processEnded} once the pipes are
        closed from this side (as the reactor does).
        """
        if self.ended:
            raise AssertionError(f"process {self.originalPid} already ended")
        self.ended = True
        self.pid = None
        self._heldReason = exitReason(exitCode, signal)
        self.proto.processExited(self._heldReason)


def exitReason(exitCode: int = 0, signal: int | None = None) -> Failure:
    """
    The failure a reactor reports for a process that exited with C{exitCode}
    or was killed by C{signal}.
    """
    if signal is not None:
        return Failure(ProcessTerminated(exitCode=None, signal=signal, status=signal))
    if exitCode == 0:
        return Failure(ProcessDone(status=0))
    return Failure(ProcessTerminated(exitCode=exitCode, status=exitCode << 8))


class ProcessMemoryReactor(MemoryReactorClock):
    """
    A L{MemoryReactorClock} that also records C{spawnProcess}: each call
    gets a L{FakeProcess} (pids counting up from C{firstPid}) connected to
    its process protocol the way the real reactor connects it.

    @ivar processes: every process spawned, in order.
    @ivar descriptorsAtSpawn: for each spawn, what each integer descriptor
        in C{childFDs} was at the moment of the call (see
        L{describeDescriptor}).
    """

    firstPid = 1000

    def __init__(self) -> None:
        super().__init__()
        self.processes: list[FakeProcess] = []
        self.descriptorsAtSpawn: list[dict[int, Any]] = []
        self._nextPid = self.firstPid

    def spawnProcess(
        self,
        processProtocol: Any,
        executable: str,
        args: list[str] | tuple[str, ...] = (),
        env: dict[str, str] | None = None,
        path: str | None = None,
        uid: int | None = None,
        gid: int | None = None,
        usePTY: bool = False,
        childFDs: dict[int, Any] | None = None,
    ) -> FakeProcess:
        self.descriptorsAtSpawn.append(
            {
                child: describeDescriptor(parent)
                for child, parent in (childFDs or {}).items()
                if isinstance(parent, int)
            }
        )
        process = FakeProcess(
            self,
            self._nextPid,
            processProtocol,
            executable,
            list(args),
            env,
            path,
            uid,
            gid,
            usePTY,
            childFDs,
        )
        self._nextPid += 1
        self.processes.append(process)
        processProtocol.makeConnection(process)
        return process


def pendingDelays(clock: Clock) -> list[float]:
    """
    How far in the future each pending one-off delayed call of C{clock}
    is, soonest first.  The ticks of a L{LoopingCall} are left out: they are
    always pending while it runs.
    """
    now = clock.seconds()
    return sorted(
        call.getTime() - now
        for call in clock.calls
        if call.active() and not isinstance(call.func, LoopingCall)
    )


def describeDescriptor(fd: int) -> Any:
    """
    What descriptor C{fd} is now: C{(family, type)} of a socket, C{"file"}
    for anything else that is open, C{"closed"} when nothing is open there.
    """
    try:
        os.fstat(fd)
    except OSError:
        return "closed"
    copy = os.dup(fd)
    try:
        probe = socket.socket(fileno=copy)
    except OSError:
        os.close(copy)
        return "file"
    with probe:
        return (probe.family, probe.type)


# The parent side: listening sockets.


@implementer(IListeningPort)
class FakeListeningPort:
    """
    Stands for the port a parent listens on: it has a descriptor number and
    a host address, and nothing listens.
    """

    def __init__(self, fd: int, host: Any = None) -> None:
        self.fd = fd
        self.host = host if host is not None else IPv4Address("TCP", "127.0.0.1", 7007)
        self.stopped = False

    def fileno(self) -> int:
        return self.fd

    def getHost(self) -> Any:
        return self.host

    def startListening(self) -> None:
        pass

    def stopListening(self) -> None:
        self.stopped = True


def fakeListeningSocket(
    description: str = "tcp:7007:interface=127.0.0.1",
    fd: int = 50,
    family: str = "AF_INET",
    host: Any = None,
) -> ListeningSocket:
    """
    A real L{ListeningSocket} around a L{FakeListeningPort}: the pool sees
    exactly what it sees in production, with no socket behind it.
    """
    return ListeningSocket(description=description, port=FakeListeningPort(fd, host), family=family)


# The worker side: adopted ports and the connections they accept.


class FakeServerTransport:
    """
    The transport class of a L{FakeAdoptedPort}: one instance per accepted
    connection.  C{abortConnection} only records, since a real transport
    reports C{connectionLost} later, from the reactor; a test calls
    L{lose} to deliver it.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args = args
        self.socket = FakeSocket(-1, socket.AF_UNSPEC)
        self.aborted = False
        self.lostReason: Failure | None = None

    def abortConnection(self) -> None:
        self.aborted = True

    def loseConnection(self) -> None:
        self.lose()

    def lose(self, reason: Failure | None = None) -> None:
        """
        The reactor reports that this connection is closed.
        """
        self.connectionLost(reason or Failure(ConnectionDone()))

    def connectionLost(self, reason: Failure) -> None:
        self.lostReason = reason


class FakeSocket:
    """
    The C{socket} attribute of a L{FakeAdoptedPort} or L{FakeServerTransport}:
    records the options set on it.
    """

    def __init__(self, fileno: int, family: int) -> None:
        self._fileno = fileno
        self.family = family
        self.closed = False
        self.options: dict[tuple[int, int], Any] = {}

    def fileno(self) -> int:
        return self._fileno

    def setsockopt(self, level: int, option: int, value: Any) -> None:
        self.options[(level, option)] = value

    def close(self) -> None:
        self.closed = True


@implementer(IListeningPort)
class FakeAdoptedPort:
    """
    What L{WorkerMemoryReactor.adoptStreamPort} returns: enough of
    C{tcp.Port} / C{unix.Port} for a worker to track its connections and
    release the port.  L{accept} plays the reactor accepting a connection.
    """

    transport: type[Any] = FakeServerTransport
    #: Whether a drain sweeps this port (C{tcp.Port} sets it while it listens).
    connected = False
    numberAccepts = 100

    def __init__(self, fileno: int, addressFamily: int, factory: Any) -> None:
        self.fd = fileno
        self.addressFamily = addressFamily
        self.factory = factory
        self.socket = FakeSocket(fileno, addressFamily)
        self.reading = True
        self.stopListeningCalled = False

    def accept(self) -> FakeServerTransport:
        """
        Accept one connection, building its transport as the port does.
        """
        transport: FakeServerTransport = self.transport()
        return transport

    def doRead(self) -> None:
        """
        Accept as C{tcp.Port.doRead} would: record how many it may take.
        """
        self.sweeps = [*getattr(self, "sweeps", []), self.numberAccepts]

    def stopReading(self) -> None:
        self.reading = False

    def startReading(self) -> None:
        self.reading = True

    def startListening(self) -> None:
        pass

    def stopListening(self) -> None:
        self.stopListeningCalled = True

    def getHost(self) -> Any:
        return IPv4Address("TCP", "0.0.0.0", 1234)


class WorkerMemoryReactor(MemoryReactorClock):
    """
    A L{MemoryReactorClock} whose C{adoptStreamPort} accepts every family
    (L{MemoryReactor}'s refuses C{AF_UNIX}) and returns L{FakeAdoptedPort}s,
    recorded in C{adoptedPorts} and C{ports}.
    """

    def __init__(self) -> None:
        super().__init__()
        self.ports: list[FakeAdoptedPort] = []

    def adoptStreamPort(self, fileno: int, addressFamily: int, factory: Any) -> FakeAdoptedPort:
        self.adoptedPorts.append((fileno, addressFamily, factory))
        port = FakeAdoptedPort(fileno, addressFamily, factory)
        self.ports.append(port)
        factory.doStart()  # as a real port's startListening does
        return port


def realDescriptor(case: SynchronousTestCase) -> int:
    """
    A descriptor of a real socket for code that will C{os.close} it.  The
    test closes it afterwards only if it is still that socket's (the number
    may have been closed and reused by then).
    """
    original = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    case.addCleanup(original.close)
    fd = os.dup(original.fileno())
    inode = os.fstat(fd).st_ino

    def closeIfStillOurs() -> None:
        with contextlib.suppress(OSError):
            if os.fstat(fd).st_ino == inode:
                os.close(fd)

    case.addCleanup(closeIfStillOurs)
    return fd


# Both sides: the control channel.


@dataclass
class FakeControl:
    """
    Stands for either end of the AMP control channel: C{callRemote} records
    each command and its arguments.  With C{autoAnswer}, every call succeeds
    at once; otherwise each call's L{defer.Deferred} waits in C{answers}.

    @ivar transport: not L{None} while the channel counts as connected.
    """

    autoAnswer: bool = True
    transport: Any = field(default_factory=object)
    calls: list[tuple[Any, dict[str, Any]]] = field(default_factory=list)
    answers: list[defer.Deferred[Any]] = field(default_factory=list)

    def callRemote(self, command: Any, **arguments: Any) -> defer.Deferred[Any]:
        self.calls.append((command, arguments))
        if self.autoAnswer:
            return defer.succeed({})
        answer: defer.Deferred[Any] = defer.Deferred()
        self.answers.append(answer)
        return answer

    def answerAll(self) -> None:
        """
        Answer every call still waiting, in order, including calls made
        while answering.
        """
        while self.answers:
            self.answers.pop(0).callback({})

    def commands(self) -> list[Any]:
        """
        The command classes called, in order.
        """
        return [command for command, _ in self.calls]


def fakeSysCpus(test: SynchronousTestCase, siblings: dict[int, str]) -> Path:
    """
    A stand-in for C{/sys/devices/system/cpu}, removed after C{test}: each
    CPU's C{topology/thread_siblings_list} holds the text given for it.
    """
    root = Path(tempfile.mkdtemp(prefix="maccept-sys-"))
    test.addCleanup(shutil.rmtree, root, True)
    for cpu, text in siblings.items():
        topology = root / f"cpu{cpu}" / "topology"
        topology.mkdir(parents=True)
        (topology / "thread_siblings_list").write_text(text + "\n")
    return root
