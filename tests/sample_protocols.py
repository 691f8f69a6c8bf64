"""
Protocols for the integration tests, named on the command line as
C{tests.sample_protocols:NAME}.
"""

from __future__ import annotations

import os
import subprocess
import sys

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from zope.interface import implementer

from maccept._builtins import Echo
from maccept.interfaces import IWorkerLifecycle


def failsInWorker() -> Factory:
    """
    The parent only checks that this is callable; every worker calls it
    and fails, as a worker whose start-up code is broken does.
    """
    raise RuntimeError("boom in worker start-up")


class Chatty(Protocol):
    """
    Logs through twisted.logger, prints to stdout and stderr, then echoes;
    sending C{crash} raises in C{dataReceived}.
    """

    log = Logger()

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.log.warn("chatty connection from {peer}", peer=str(self.transport.getPeer()))
        print("chatty says hello on stdout", flush=True)
        print("chatty says hello on stderr", file=sys.stderr, flush=True)

    def dataReceived(self, data: bytes) -> None:
        if data.startswith(b"crash"):
            raise ValueError("chatty was asked to crash")
        assert self.transport is not None
        self.transport.write(data)


def jsonLogObserver() -> object:
    """
    A twistd C{--logger} that writes the usual text to stdout and JSON
    events to the file named by C{MACCEPT_TEST_JSON_LOG}, so tests can read
    levels and systems.
    """
    import os

    from twisted.logger import jsonFileLogObserver, textFileLogObserver

    text = textFileLogObserver(sys.stdout)
    events = jsonFileLogObserver(open(os.environ["MACCEPT_TEST_JSON_LOG"], "a"))  # noqa: SIM115

    def observe(event: dict[str, object]) -> None:
        text(event)
        events(event)

    return observe


class Sleepy(Protocol):
    """
    Blocks its whole worker in C{dataReceived}, as a protocol that makes a
    blocking call does.
    """

    def dataReceived(self, data: bytes) -> None:
        import time

        time.sleep(3600)


class CrashesOnConnect(Protocol):
    """
    Kills its worker on every connection, after saying why on stderr.
    """

    def connectionMade(self) -> None:
        import os

        print("crashing on purpose", file=sys.stderr, flush=True)
        os._exit(7)


@implementer(IWorkerLifecycle)
class HookedEchoFactory(Factory):
    """
    Echo, with lifecycle hooks that print what they see.
    """

    protocol = Echo

    def workerStarting(self, reactor: IReactorTime) -> Deferred[None] | None:
        import os

        print(f"hook: starting in {os.getpid()}", flush=True)
        return None

    def workerDraining(self) -> None:
        print("hook: draining", flush=True)

    def workerStopping(self) -> None:
        print("hook: stopping", flush=True)


@implementer(IWorkerLifecycle)
class FailingHookFactory(HookedEchoFactory):
    def workerStarting(self, reactor: IReactorTime) -> None:
        raise RuntimeError("the database is down")


def breakableEcho() -> Factory:
    """
    Echo, until the file named by C{MACCEPT_TEST_BREAK} exists: from then
    on new workers fail to start (a broken deploy).
    """
    import os

    if os.path.exists(os.environ.get("MACCEPT_TEST_BREAK", "/nonexistent")):
        raise RuntimeError("broken deploy")
    return Factory.forProtocol(Echo)


class _Versioned(Protocol):
    version = b""

    def dataReceived(self, data: bytes) -> None:
        self.transport.write(self.version + b":" + data)  # type: ignore[union-attr]


def versionedEcho() -> Factory:
    """
    Echo behind the version its worker read as it started, from the file
    named by C{MACCEPT_TEST_VERSION}: code deployed, then reloaded.
    """
    with open(os.environ["MACCEPT_TEST_VERSION"], "rb") as version:
        protocol = type("Versioned", (_Versioned,), {"version": version.read()})
    return Factory.forProtocol(protocol)


@implementer(IWorkerLifecycle)
class SlowToStartFactory(HookedEchoFactory):
    """
    Echo, whose workers take a minute to start while the file named by
    C{MACCEPT_TEST_SLOW} exists (a new parent caught mid-start).
    """

    def workerStarting(self, reactor: IReactorTime) -> Deferred[None] | None:
        import os

        from twisted.internet.task import deferLater

        if os.path.exists(os.environ.get("MACCEPT_TEST_SLOW", "/nonexistent")):
            print("hook: starting slowly", flush=True)
            return deferLater(reactor, 60, lambda: None)
        return None


_hoard: list[bytearray] = []


class Hog(Protocol):
    """
    Grows its worker by 100 MiB for every message, as a leak would.
    """

    def dataReceived(self, data: bytes) -> None:
        _hoard.append(bytearray(100 * 2**20))
        assert self.transport is not None
        self.transport.write(data)


class SpawnsThenDies(Protocol):
    """
    Starts a child that inherits the worker's output pipes (as
    C{subprocess.Popen} does), says the child's pid, then dies at once.
    """

    def dataReceived(self, data: bytes) -> None:
        child = subprocess.Popen(["sleep", "60"])
        assert self.transport is not None
        self.transport.write(f"{child.pid}\n".encode())
        from twisted.internet import reactor

        reactor.callLater(0.2, os._exit, 3)


class SpawnsChild(Protocol):
    """
    Starts a child that outlives the connection and the worker (as a
    protocol that runs a command and forgets it would), and says its pid.
    """

    def dataReceived(self, data: bytes) -> None:
        child = subprocess.Popen(["sleep", "60"])
        assert self.transport is not None
        self.transport.write(f"{child.pid}\n".encode())


class ThreadKeepsAlive(Factory):
    """
    Echo, from a factory that starts a thread (not a daemon) that outlives
    the reactor: the worker's process cannot exit until it ends.
    """

    protocol = Echo

    def startFactory(self) -> None:
        import threading
        import time

        threading.Thread(target=time.sleep, args=(60,), name="lingering").start()


class PeerReporter(Protocol):
    """
    Says who it thinks the client is (C{getPeer()} in C{connectionMade}),
    then echoes.
    """

    def connectionMade(self) -> None:
        peer = self.transport.getPeer()  # type: ignore[union-attr]
        self.transport.write(f"{peer.host} {peer.port}\n".encode())  # type: ignore[union-attr]

    def dataReceived(self, data: bytes) -> None:
        self.transport.write(data)  # type: ignore[union-attr]


def peerReporter() -> Factory:
    return Factory.forProtocol(PeerReporter)


@implementer(IWorkerLifecycle)
class HalfHookedFactory(Factory):  # type: ignore[misc]  # half of it, on purpose
    """
    Declares the worker's hooks but writes only one of them.
    """

    protocol = Echo

    def workerStarting(self, reactor: IReactorTime) -> None:
        pass


half_hooked = HalfHookedFactory()


def makesHalfHooked() -> Factory:
    return HalfHookedFactory()
