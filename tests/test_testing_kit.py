"""
The testing kit as its users write tests with it: the C{maccept_pool}
fixture under pytest-twisted, and L{startPool} under trial's asynchronous
C{TestCase} (in C{trial_kit_example.py}, run by trial).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted  # type: ignore[import-untyped]
from twisted.internet import defer, protocol, reactor
from twisted.internet.address import UNIXAddress
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.task import deferLater
from twisted.python.failure import Failure

from maccept.testing import ReloadError, RunningPool, childrenOf, startPool
from tests.server import alive, waitFor


class EchoClient(protocol.Protocol):
    """
    Sends one message, half-closes, and fires with everything echoed back.
    """

    def __init__(self, message: bytes) -> None:
        self.message = message
        self.received = b""
        self.done: defer.Deferred[bytes] = defer.Deferred()

    def connectionMade(self) -> None:
        self.transport.write(self.message)  # type: ignore[union-attr]
        self.transport.loseWriteConnection()  # type: ignore[union-attr]

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        self.done.callback(self.received)


@defer.inlineCallbacks
def echo(pool: RunningPool, message: bytes) -> Any:
    endpoint = TCP4ClientEndpoint(reactor, pool.address.host, pool.address.port)
    client = EchoClient(message)
    yield connectProtocol(endpoint, client)
    received = yield client.done
    return received


@pytest_twisted.inlineCallbacks  # type: ignore[untyped-decorator]
def test_fixtureServesAndStops(maccept_pool: Any) -> Any:
    """
    The fixture's pool listens on loopback with the workers asked for and
    echoes; stopping it leaves no worker behind.
    """
    pool = yield maccept_pool(protocol="echo", workers=2)
    assert pool.address.host == "127.0.0.1"
    assert len(pool.pids) == 2
    received = yield echo(pool, b"hello kit")
    assert received == b"hello kit"
    workers = pool.pids
    yield pool.stop()
    assert not any(alive(pid) for pid in workers)


@pytest_twisted.inlineCallbacks  # type: ignore[untyped-decorator]
def test_stopLeavesNoChildBehind(maccept_pool: Any) -> Any:
    """
    A child a worker started and left running (the protocol's own) is
    killed as the pool stops: a test leaves no process.
    """
    pool = yield maccept_pool(protocol="tests.sample_protocols:SpawnsChild")
    received = yield echo(pool, b"go")
    child = int(received.split()[0])
    assert alive(child)
    yield pool.stop()
    assert not alive(child)


@pytest_twisted.inlineCallbacks  # type: ignore[untyped-decorator]
def test_stopAfterTheParentDied(maccept_pool: Any) -> Any:
    """
    A pool whose parent was killed (by the test, say) still has what its
    workers left behind killed by C{stop}.
    """
    pool = yield maccept_pool(protocol="tests.sample_protocols:SpawnsChild")
    received = yield echo(pool, b"go")
    child = int(received.split()[0])
    os.kill(pool.pid, signal.SIGKILL)
    yield deferLater(reactor, 0.5, lambda: None)
    yield pool.stop()
    assert not alive(child)


@pytest_twisted.inlineCallbacks  # type: ignore[untyped-decorator]
def test_cancelledStartLeavesNothing() -> Any:
    """
    Cancelling a start (a test's timeout) kills the pool and fails with
    C{CancelledError} once no process of it is left.
    """
    before = set(childrenOf(os.getpid()))
    starting = startPool(workers=2)
    started = set(childrenOf(os.getpid())) - before
    assert started, "startPool spawned nothing"
    starting.cancel()
    with pytest.raises(defer.CancelledError):
        yield starting
    assert not any(alive(pid) for pid in started)


@pytest_twisted.inlineCallbacks  # type: ignore[untyped-decorator]
def test_shortGracefulTimeout(maccept_pool: Any) -> Any:
    """
    A kit's pool drains for at most 1 s, not 30, so that a failed test
    with a client still connected stops at once; a test may set its own.
    """
    for extraArgs, deadline in [
        ((), "(at most 1s)"),
        (("--graceful-timeout", "5"), "(at most 5s)"),
        (("--graceful=3",), "(at most 3s)"),
    ]:
        pool = yield maccept_pool(extraArgs=extraArgs)
        with socket.create_connection((pool.address.host, pool.address.port)) as client:
            client.sendall(b"x")
            assert client.recv(1) == b"x"
            yield pool.stop()
        assert f"draining 1 open connections {deadline}" in pool.log


@pytest.fixture
def workersAfterTeardown() -> Iterator[list[int]]:
    """
    Set up before C{maccept_pool} when named first, so torn down after it:
    checks that the pids a test put in the list are gone by then.
    """
    pids: list[int] = []
    yield pids
    assert pids and not any(alive(pid) for pid in pids)


@pytest_twisted.inlineCallbacks  # type: ignore[untyped-decorator]
def test_fixtureStopsAtTeardown(workersAfterTeardown: list[int], maccept_pool: Any) -> Any:
    """
    A pool the test leaves running is stopped by the fixture, workers and
    all.
    """
    pool = yield maccept_pool(workers=2, extraArgs=["--timeout", "10"])
    received = yield echo(pool, b"left running")
    assert received == b"left running"
    workersAfterTeardown.extend(pool.pids)


def test_trialStyle() -> None:
    """
    The same kit under trial's asynchronous C{TestCase}: its tests live in
    C{tests/trial_kit_example.py} and run under trial itself, since trial's
    C{TestCase} spins the reactor on its own.
    """
    done = subprocess.run(
        [sys.executable, "-m", "twisted.trial", "tests.trial_kit_example"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=Path(__file__).resolve().parent.parent,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "PASSED (successes=2)" in done.stdout, done.stdout


FAILING_KIT_TEST = """
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol


class Client(Protocol):
    def __init__(self):
        self.done = Deferred()

    def connectionMade(self):
        self.transport.write(b"crash")

    def connectionLost(self, reason):
        self.done.callback(None)


@pytest_twisted.inlineCallbacks
def test_crashingProtocol(maccept_pool):
    pool = yield maccept_pool(protocol="tests.sample_protocols:Chatty")
    client = Client()
    endpoint = TCP4ClientEndpoint(reactor, pool.address.host, pool.address.port)
    yield connectProtocol(endpoint, client)
    yield client.done
    assert False, "the echo never came"
"""


def test_failureShowsThePoolLog() -> None:
    """
    A test that fails shows its pool's log in its report, a worker's
    traceback included, where the test itself saw only a wrong answer.
    """
    directory = Path(tempfile.mkdtemp(prefix="maccept-kit-"))
    try:
        (directory / "test_failing.py").write_text(FAILING_KIT_TEST)
        done = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(directory)],
            capture_output=True,
            text=True,
            timeout=120,
            cwd=Path(__file__).resolve().parent.parent,
            check=False,
        )
    finally:
        shutil.rmtree(directory, True)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "maccept pool (pid " in done.stdout, done.stdout
    assert "ValueError: chatty was asked to crash" in done.stdout, done.stdout


def test_poolDiesWithTheTestProcess() -> None:
    """
    A pool whose test process dies (a runner's timeout kills it before the
    test stops the pool) stops too: no pool outlives the tests.
    """
    launcher = (
        "import os, subprocess, sys, time\n"
        "from maccept.testing import _TWISTD, TEST_PROCESS\n"
        "child = subprocess.Popen([sys.executable, '-c', _TWISTD, '-n', '--pidfile=', 'maccept',"
        " '--listen', 'tcp:0:interface=127.0.0.1', '--workers', '1'],"
        " env={**os.environ, TEST_PROCESS: str(os.getpid())},"
        " stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)\n"
        "print(child.pid, flush=True)\n"
        "time.sleep(60)\n"
    )
    test = subprocess.Popen(
        [sys.executable, "-c", launcher], stdout=subprocess.PIPE, text=True, start_new_session=True
    )
    pool = None
    try:
        assert test.stdout is not None
        pool = int(test.stdout.readline())
        test.kill()
        test.wait()
        waitFor(lambda: not alive(pool), what="the orphaned pool to stop")
    finally:
        if test.poll() is None:
            test.kill()
            test.wait()
        # The pool leads a session of its own (the kit's setsid).
        for group in (test.pid, pool):
            if group is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(group, signal.SIGKILL)


@pytest_twisted.inlineCallbacks  # type: ignore[untyped-decorator]
def test_upgradedPoolFollowed(maccept_pool: Any) -> Any:
    """
    After a USR2 upgrade the pool is the new parent's: C{pid} and C{pids}
    name it and its workers, C{stop} stops it, and no process is left.
    """
    pool = yield maccept_pool(workers=2)
    old, oldWorkers = pool.pid, pool.pids
    pool.signal(signal.SIGUSR2)
    for _ in range(300):  # a bound on a hang, not a speed requirement
        if not alive(old) and len(pool.pids) == 2:
            break
        yield deferLater(reactor, 0.1, lambda: None)
    assert not alive(old), pool.log
    new, newWorkers = pool.pid, pool.pids
    assert new != old and not set(newWorkers) & set(oldWorkers)
    received = yield echo(pool, b"upgraded")
    assert received == b"upgraded"
    yield pool.stop()
    assert not any(alive(pid) for pid in [new, *newWorkers])


def test_oneWatchForTheEnd(monkeypatch: pytest.MonkeyPatch) -> None:
    """
    However many wait for a pool's end, one watch polls its process group,
    and none is left pending once they have all fired.
    """
    from twisted.internet.task import Clock

    from maccept import testing

    clock = Clock()
    process = testing._PoolProcess(clock)
    process.pid = 2**22 + 1
    members = [1]
    monkeypatch.setattr(testing, "groupMembers", lambda pgid: members)
    process.ready.addErrback(lambda _: None)  # ended before it was ready
    ended = [process.whenEnded(), process.whenEnded()]
    process.processEnded(Failure(Exception("ended")))
    assert len(clock.getDelayedCalls()) == 1
    ended.append(process.whenEnded())
    members.clear()
    clock.advance(0.02)
    assert all(d.called for d in ended)
    assert clock.getDelayedCalls() == []


@pytest_twisted.inlineCallbacks  # type: ignore[untyped-decorator]
def test_addressesAndReloads(maccept_pool: Any, monkeypatch: pytest.MonkeyPatch) -> Any:
    """
    A pool shows every listener's address, in --listen order (or -l's;
    a path with spaces and quotes whole); C{reload}
    fires with the new generation once it serves, and fails with the
    parent's reason when a reload fails (the old workers serving on).
    """
    directory = tempfile.mkdtemp(prefix="maccept-kit-")
    path, broken = os.path.join(directory, "echo 'it' .sock"), os.path.join(directory, "broken")
    monkeypatch.setenv("MACCEPT_TEST_BREAK", broken)
    try:
        pool = yield maccept_pool(
            protocol="tests.sample_protocols:breakableEcho",
            workers=2,
            listen=["tcp:0:interface=127.0.0.1"],
            extraArgs=["-l", f"unix:{path}", "--listen=udp:0:interface=127.0.0.1"],
        )
        tcp, unix, udp = pool.addresses
        assert (tcp.type, tcp.host, tcp.port) == ("TCP", "127.0.0.1", pool.address.port)
        assert unix == UNIXAddress(path)
        assert (udp.type, udp.host) == ("UDP", "127.0.0.1") and udp.port > 0
        before = set(pool.pids)
        generation = yield pool.reload()
        assert generation == 2
        for _ in range(300):  # the old generation drains (a bound on a hang)
            if not set(pool.pids) & before:
                break
            yield deferLater(reactor, 0.1, lambda: None)
        assert not set(pool.pids) & before, pool.log
        Path(broken).touch()
        with pytest.raises(ReloadError, match=r"reload failed, keeping the old workers: .*broken"):
            yield pool.reload()
        received = yield echo(pool, b"old ones serve")
        assert received == b"old ones serve"
    finally:
        shutil.rmtree(directory, True)


@pytest_twisted.inlineCallbacks  # type: ignore[untyped-decorator]
def test_reloadedCodeAnswers(maccept_pool: Any, tmp_path: Path, monkeypatch: Any) -> Any:
    """
    Once C{reload} fires, every new connection meets the new code: the
    old workers have stopped accepting by then (they logged their drain a
    moment after the new generation was ready).
    """
    version = tmp_path / "version"
    version.write_bytes(b"v1")
    monkeypatch.setenv("MACCEPT_TEST_VERSION", str(version))
    pool = yield maccept_pool(protocol="tests.sample_protocols:versionedEcho", workers=2)
    for deployed in (b"v2", b"v3"):
        version.write_bytes(deployed)
        yield pool.reload()
        answers = []
        for _ in range(6):
            answers.append((yield echo(pool, b"q")))
        assert answers == [deployed + b":q"] * 6, pool.log


def test_addressesAsShown() -> None:
    """
    The ready line's forms: C{HOST:PORT}, C{[HOST]:PORT}, a path.
    """
    from twisted.internet.address import IPv4Address, IPv6Address

    from maccept.testing import _address

    assert _address("127.0.0.1:80") == IPv4Address("TCP", "127.0.0.1", 80)
    assert _address("[::1]:8080") == IPv6Address("TCP", "::1", 8080)
    assert _address("/tmp/a:1.sock") == UNIXAddress("/tmp/a:1.sock")


def test_reloadOutcomeFromTheLog() -> None:
    """
    A reload's end as the parent logs it: a reload queued behind a running
    one is the one that starts after the request, not the running one.
    """
    from maccept.testing import _reloadOutcome

    running = "reloading: starting generation 2\n"
    since = len(running)
    queued = "reload queued: it starts once the pool is no longer reloading\n"
    first = "reload: generation 2 alone accepts: the old workers stopped accepting\n"
    second = "reloading: starting generation 3\n"
    assert _reloadOutcome(running + queued + first, since) is None
    assert _reloadOutcome(running + queued + first + second, since) is None
    ready = "reload: generation 3 ready; draining 2\n"
    assert _reloadOutcome(running + queued + first + second + ready, since) is None
    done = running + queued + first + second + ready + "reload: generation 3 alone accepts\n"
    assert _reloadOutcome(done, since) == 3
    why = "reload failed, keeping the old workers: worker 1 died: boom"
    assert _reloadOutcome(f"{second}{why}\n", 0) == why
    # A queued reload that fails at once, before this one's old workers
    # have all stopped accepting: its failure is not this one's.
    earlier = f"{second}{ready}reloading: starting generation 4\n{why}\n"
    assert _reloadOutcome(earlier + "reload: generation 3 alone accepts\n", 0) == 3
    ignored = "reload ignored: the pool is stopping\n"
    assert _reloadOutcome(ignored, 0) == "reload ignored: the pool is stopping"
    dropped = "queued reload dropped: the upgrade starts the new code"
    assert _reloadOutcome(f"{running}{queued}{dropped}\n{first}", since) == dropped
