"""
The pieces of an upgrade that need no process: the command line that
starts twistd again, the pidfile's rename, the inherited sockets.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import tempfile
from pathlib import Path
from typing import Any

from twisted.internet.task import Clock
from twisted.logger import Logger, capturedLogs, formatEvent
from twisted.trial.unittest import SynchronousTestCase

from maccept import _sharedlog
from maccept._handover import (
    INHERIT,
    UPGRADE_FROM,
    UPGRADE_PIPE,
    UPGRADE_WORKERS,
    greetOldParent,
    inheritedListeners,
    takeOver,
    tellOldParentWhy,
    workersAfterUpgrade,
)
from maccept._sharedlog import appendToLogFiles, followRotatedLogs
from maccept._upgrade import (
    GREETING_WAIT,
    Stage,
    Upgrade,
    commandLine,
)
from tests.fakes import FakeProcess, ProcessMemoryReactor


class _RecordingSocketPath:
    removed = 0

    def remove(self) -> None:
        self.removed += 1


class _UNIXListener:
    """
    A listener on a UNIX socket whose path records its removal.
    """

    description = "unix:/run/test.sock"

    def __init__(self, socketPath: _RecordingSocketPath) -> None:
        self.socketPath = socketPath

    def fileno(self) -> int:
        return 0


def _unixListeners(socketPath: _RecordingSocketPath, count: int = 1) -> Any:
    return [_UNIXListener(socketPath)] * count


def makeUpgrade(reactor: Any, config: dict[str, Any], **hooks: Any) -> Upgrade:
    """
    An upgrade of a parent whose pool serves, with no own ports, that
    records nothing: C{hooks} replace any of its collaborators.
    """
    defaults: dict[str, Any] = {
        "isServing": lambda: True,
        "willServe": lambda: False,
        "poolSize": lambda: 0,
        "beforeStart": lambda: None,
        "onTakenOver": lambda: None,
        "servicePorts": lambda: (),
    }
    return Upgrade(reactor, [], config, **{**defaults, **hooks})


class CommandLineTests(SynchronousTestCase):
    def test_script(self) -> None:
        """
        A twistd started as a script is started again the same way.
        """
        argv = ["/venv/bin/twistd", "-n", "maccept", "--workers", "2"]
        self.assertEqual(commandLine(argv), [sys.executable, *argv])

    def test_dashC(self) -> None:
        """
        A twistd started with C{python -c} (the testing kit) gets its code
        back.
        """
        command = commandLine(["-c", "-n", "maccept"])
        self.assertEqual(command[:2], [sys.executable, "-c"])
        self.assertIn("twistd import run", command[2])
        self.assertEqual(command[3:], ["-n", "maccept"])

    def test_daemonRunsInForeground(self) -> None:
        """
        A daemon's new parent runs with C{--nodaemon}, logging where the
        daemon would have (its C{--logfile}, else twistd's default file).
        """
        argv = ["/venv/bin/twistd", "--pidfile=p", "maccept"]
        daemon = {"nodaemon": False, "logfile": None}
        self.assertEqual(
            commandLine(argv, daemon),
            [sys.executable, argv[0], "--nodaemon", "--logfile=twistd.log", *argv[1:]],
        )
        logged = {"nodaemon": False, "logfile": "/var/log/m.log"}
        self.assertEqual(
            commandLine(argv, logged), [sys.executable, argv[0], "--nodaemon", *argv[1:]]
        )
        foreground = {"nodaemon": True, "logfile": None}
        self.assertEqual(commandLine(argv, foreground), [sys.executable, *argv])

    def test_twist(self) -> None:
        """
        C{python -m twisted maccept} (twist) is started again as a module,
        so that its path starts with the current directory as this one's
        does, and without twistd's daemon options, which twist has not.
        """
        argv = ["/venv/lib/python3/site-packages/twisted/__main__.py", "maccept", "-l", "tcp:0"]
        twistConfig = {"reactor": None, "logger": None}
        self.assertEqual(
            commandLine(argv, twistConfig),
            [sys.executable, "-m", "twisted", "maccept", "-l", "tcp:0"],
        )


class PidfileTests(SynchronousTestCase):
    def test_renamedAndBack(self) -> None:
        """
        The pidfile moves aside to C{.oldbin} and back, and twistd's own
        config follows it, so twistd removes the right file at exit.
        """
        directory = tempfile.mkdtemp()
        pidfile = Path(directory, "twistd.pid")
        pidfile.write_text("123")
        config = {"pidfile": str(pidfile)}
        upgrade = makeUpgrade(Clock(), config)
        upgrade._movePidfile(".oldbin")
        self.assertEqual(config["pidfile"], f"{pidfile}.oldbin")
        self.assertFalse(pidfile.exists())
        upgrade._movePidfile("")
        self.assertEqual((config["pidfile"], pidfile.read_text()), (str(pidfile), "123"))
        os.remove(pidfile)
        os.rmdir(directory)

    def test_noPidfile(self) -> None:
        """
        Without a pidfile there is nothing to move.
        """
        config = {"pidfile": ""}
        makeUpgrade(Clock(), config)._movePidfile(".oldbin")
        self.assertEqual(config, {"pidfile": ""})


class HandOverTests(SynchronousTestCase):
    """
    The old parent's side of the hand-over: the new parent says on a pipe
    that it serves, so that a stop from anyone else is told apart.
    """

    def setUp(self) -> None:
        directory = tempfile.mkdtemp()
        self.pidfile = Path(directory, "twistd.pid")
        self.pidfile.write_text("123")
        self.addCleanup(shutil.rmtree, directory)
        self.config: dict[str, Any] = {"pidfile": str(self.pidfile), "nodaemon": True}
        self.reactor = ProcessMemoryReactor()
        self.stops: list[bool] = []
        self.upgrade = makeUpgrade(
            self.reactor, self.config, onTakenOver=lambda: self.stops.append(True)
        )

    def start(self) -> tuple[FakeProcess, int]:
        self.upgrade.start()
        process = self.reactor.processes[-1]
        assert process.env is not None and process.childFDs is not None
        old, pipe = (int(part) for part in process.env[UPGRADE_PIPE].split(":"))
        self.assertEqual(old, int(process.env[UPGRADE_FROM]))
        self.assertEqual(process.childFDs[pipe], "r")
        return process, pipe

    def test_watchdogIsTheNewParents(self) -> None:
        """
        The new parent is not given this one's WATCHDOG_PID: once it is the
        main process it feeds systemd's watchdog (WATCHDOG_USEC stays).
        """
        self.patch(os, "environ", {**os.environ, "WATCHDOG_PID": "1", "WATCHDOG_USEC": "30"})
        process, _ = self.start()
        assert process.env is not None
        self.assertNotIn("WATCHDOG_PID", process.env)
        self.assertEqual(process.env["WATCHDOG_USEC"], "30")

    def test_servingStopsThisParent(self) -> None:
        """
        "serving" on the pipe, in pieces or not, stops this parent; the
        pidfile stays with the new parent when this one exits.
        """
        process, pipe = self.start()
        process.output(pipe, b"hello\nserv")
        self.assertEqual(self.stops, [])
        process.output(pipe, b"ing\n")
        self.assertTrue(self.upgrade.takenOver)
        self.assertEqual(self.stops, [True])
        with capturedLogs() as events:
            process.end(0)
        self.assertEqual(self.config["pidfile"], f"{self.pidfile}.oldbin")
        self.assertNotIn("upgrade failed", " ".join(formatEvent(e) for e in events))

    def test_failureWhileReloading(self) -> None:
        """
        A new parent that exits before it serves failed, whatever this
        parent's pool is doing meanwhile (a reload, say): the pidfile comes
        back, and the failure is logged.
        """
        process, pipe = self.start()
        self.upgrade.isServing = lambda: False  # HUP after USR2: reloading
        process.output(pipe, b"hello\n")
        with capturedLogs() as events:
            process.end(1)
        self.assertEqual(self.config["pidfile"], str(self.pidfile))
        self.assertTrue(self.pidfile.exists())
        self.assertIn("upgrade failed", " ".join(formatEvent(e) for e in events))
        self.assertFalse(self.upgrade.takenOver)

    def test_failureSaysWhy(self) -> None:
        """
        A new parent that gives up (its command line refused) says why on
        the pipe, and the old parent's log line carries it: a daemon's
        standard error, where it also goes, is lost.
        """
        process, pipe = self.start()
        process.output(pipe, b"hello\nerror --protocol: importing module 'app' failed\n")
        with capturedLogs() as events:
            process.end(2)
        [line] = [formatEvent(e) for e in events if "upgrade failed" in formatEvent(e)]
        self.assertTrue(line.endswith(": --protocol: importing module 'app' failed"), line)

    def test_queuedWhileThePoolStartsOrReloads(self) -> None:
        """
        A USR2 while the pool starts or reloads waits for it to serve, as a
        HUP does, instead of being dropped; two make one upgrade.
        """
        serving = [False]
        self.upgrade.isServing = lambda: serving[0]
        self.upgrade.willServe = lambda: True
        with capturedLogs() as events:
            self.upgrade.start()
            self.upgrade.start()
        self.assertEqual(self.reactor.processes, [])
        queued = [e for e in events if "upgrade queued" in formatEvent(e)]
        self.assertEqual(len(queued), 1)
        serving[0] = True
        started: list[bool] = []
        self.upgrade.beforeStart = lambda: started.append(True)
        self.upgrade.poolServes()
        self.reactor.advance(0)
        self.assertEqual((len(self.reactor.processes), started), (1, [True]))
        self.upgrade.poolServes()
        self.reactor.advance(0)
        self.assertEqual(len(self.reactor.processes), 1)

    def test_outOfDescriptors(self) -> None:
        """
        An upgrade that cannot copy the sockets' descriptors (out of them)
        fails in one line, closes the copies it made, starts nothing, and
        leaves a queued reload queued.
        """
        copies: list[int] = []
        realDup = os.dup

        def dup(fd: int) -> int:
            if copies:
                raise OSError(24, "Too many open files")
            copies.append(realDup(fd))
            return copies[-1]

        self.patch(os, "dup", dup)
        started: list[bool] = []
        self.upgrade.beforeStart = lambda: started.append(True)
        self.upgrade.listeners = _unixListeners(_RecordingSocketPath(), 2)
        with capturedLogs() as events:
            self.upgrade.start()
        self.assertEqual((self.reactor.processes, started), ([], []))
        self.assertRaises(OSError, os.fstat, copies[0])
        self.assertIs(self.upgrade.stage, Stage.IDLE)
        self.assertEqual(self.config["pidfile"], str(self.pidfile))
        self.assertEqual(
            [formatEvent(e) for e in events],
            ["upgrade failed: cannot hand the sockets over: [Errno 24] Too many open files"],
        )

    def test_queuedThenStopped(self) -> None:
        """
        A stop forgets a queued upgrade; a USR2 while the pool stops is
        ignored, and logged.
        """
        self.upgrade.isServing = lambda: False
        self.upgrade.willServe = lambda: True
        self.upgrade.start()
        self.upgrade.isServing = lambda: True
        self.upgrade.poolServes()
        self.upgrade.abandon()  # in the same turn: the start is scheduled
        self.reactor.advance(0)
        self.assertEqual(self.reactor.processes, [])
        with capturedLogs() as events:
            self.upgrade.start()  # USR2 during a stop (--stop-delay)
        self.assertEqual(self.reactor.processes, [])
        self.assertIn("upgrade ignored: this parent is stopping", formatEvent(events[0]))
        upgrade = makeUpgrade(self.reactor, self.config, isServing=lambda: False)
        with capturedLogs() as events:
            upgrade.start()
        self.assertIn("upgrade ignored: the pool is not serving", formatEvent(events[0]))

    def test_stopBeforeHandOver(self) -> None:
        """
        Asked to stop before the new parent serves, this parent stops that
        one too and takes the pidfile back; that one's exit is no failure.
        """
        process, pipe = self.start()
        process.output(pipe, b"hello\n")
        self.upgrade.abandon()
        self.assertEqual(process.signals, [signal.SIGTERM])
        self.assertFalse(self.upgrade.takenOver)
        with capturedLogs() as events:
            process.end(signal=signal.SIGTERM)
        self.assertEqual(self.config["pidfile"], str(self.pidfile))
        self.assertNotIn("upgrade failed", " ".join(formatEvent(e) for e in events))
        self.assertEqual(self.stops, [])

    def test_stopFromOlderCode(self) -> None:
        """
        A new parent that never greeted runs older code, which hands over
        with SIGTERM: a stop then is that hand-over (a rollback works).
        """
        process, _ = self.start()
        self.upgrade.abandon()
        self.assertEqual(process.signals, [])
        self.assertTrue(self.upgrade.takenOver)
        self.assertEqual(self.config["pidfile"], f"{self.pidfile}.oldbin")

    def test_greetingAfterStop(self) -> None:
        """
        A greeting after a stop taken for that hand-over shows the stop was
        someone's: the new parent is stopped too.
        """
        process, pipe = self.start()
        self.upgrade.abandon()
        process.output(pipe, b"hello\n")
        self.assertEqual(process.signals, [signal.SIGTERM])
        self.assertIs(self.upgrade.stage, Stage.ABANDONED)
        self.assertFalse(self.upgrade.takenOver)

    def test_endedBeforeGreeting(self) -> None:
        """
        A new parent that ends before it greets, after a stop taken for its
        hand-over, took nothing over: the stop was of both (a group TERM).
        This parent takes the pidfile and the sockets' paths back.  One that
        ends after the greeting's wait (older code that served) leaves the
        hand-over as it was.
        """
        path = _RecordingSocketPath()
        self.upgrade.listeners = _unixListeners(path)
        process, _ = self.start()
        self.upgrade.abandon()
        self.reactor.advance(GREETING_WAIT / 2)
        process.end(signal=signal.SIGTERM)
        self.assertIs(self.upgrade.stage, Stage.IDLE)
        self.assertFalse(self.upgrade.takenOver)
        self.assertEqual((path.removed, self.config["pidfile"]), (1, str(self.pidfile)))
        self.upgrade = makeUpgrade(self.reactor, self.config)
        self.upgrade.listeners = _unixListeners(path)
        process, _ = self.start()
        self.upgrade.abandon()
        self.reactor.advance(GREETING_WAIT)
        process.end()
        self.assertTrue(self.upgrade.takenOver)
        self.assertEqual(path.removed, 1)

    def test_settledOnceKnown(self) -> None:
        """
        A parent whose stop was taken for the hand-over of a new parent that
        has not greeted may exit only once that is settled: a greeting (the
        new parent is stopped too), its exit, or the greeting's wait.
        """
        fired: list[str] = []
        process, pipe = self.start()
        self.assertTrue(self.upgrade.settled().called)
        self.upgrade.abandon()
        self.upgrade.settled().addCallback(lambda _: fired.append("greeted"))
        self.assertEqual(fired, [])
        process.output(pipe, b"hello\n")
        self.assertEqual(fired, ["greeted"])
        process.end(signal=signal.SIGTERM)
        # Another parent's upgrade (a stopped one starts none).
        self.upgrade = makeUpgrade(self.reactor, self.config)
        process, _ = self.start()
        self.upgrade.abandon()
        self.upgrade.settled().addCallback(lambda _: fired.append("waited"))
        self.reactor.advance(GREETING_WAIT)
        self.assertEqual(fired, ["greeted", "waited"])
        self.assertTrue(self.upgrade.takenOver)

    def test_servingAfterStop(self) -> None:
        """
        "serving" written just as this parent, stopped, stopped the new one
        changes nothing: no second stop (which would kill the workers), no
        hand-over.
        """
        process, pipe = self.start()
        process.output(pipe, b"hello\n")
        self.upgrade.abandon()
        process.output(pipe, b"serving\n")
        self.assertEqual(self.stops, [])
        self.assertFalse(self.upgrade.takenOver)
        process.end(signal=signal.SIGTERM)
        self.assertEqual(self.config["pidfile"], str(self.pidfile))


class NewParentTests(SynchronousTestCase):
    """
    The new parent's side: a greeting as it starts, "serving" once its
    workers all accept.
    """

    def setUp(self) -> None:
        self.killed: list[tuple[int, int]] = []
        self.patch(os, "kill", lambda pid, sig: self.killed.append((pid, sig)))

    def test_saysItServes(self) -> None:
        """
        Both lines go on the pipe, which is then closed; no signal is sent,
        and the upgrade's variables are forgotten.
        """
        readEnd, writeEnd = os.pipe()
        self.addCleanup(os.close, readEnd)
        old = str(os.getppid())  # the old parent started this one
        environ = {UPGRADE_FROM: old, UPGRADE_PIPE: f"{old}:{writeEnd}"}
        greetOldParent(environ)
        takeOver(environ, Logger())
        self.assertEqual(os.read(readEnd, 100), b"hello\nserving\n")
        self.assertRaises(OSError, os.fstat, writeEnd)
        self.assertEqual((environ, self.killed), ({}, []))

    def test_saysWhyItGivesUp(self) -> None:
        """
        A new parent that exits on an error writes it on the pipe, on one
        line; no pipe (no upgrade), nothing is written.
        """
        readEnd, writeEnd = os.pipe()
        self.addCleanup(os.close, readEnd)
        self.addCleanup(os.close, writeEnd)
        old = str(os.getppid())
        tellOldParentWhy("--listen x:\nbad", {UPGRADE_FROM: old, UPGRADE_PIPE: f"{old}:{writeEnd}"})
        tellOldParentWhy("no upgrade", {})
        self.assertEqual(os.read(readEnd, 100), b"error --listen x: bad\n")

    def test_signalsOlderCode(self) -> None:
        """
        An old parent that offered no pipe is sent SIGTERM; so is one whose
        environment passed on a pipe offered to another, earlier parent (a
        parent of older code keeps the variable it was given).  A process
        that is not the old parent's child (one of the new parent's workers,
        which inherit the variables but not the descriptor, a new parent
        whose old one has gone, or a stray variable) writes nothing, and
        signals nothing: the pid may be another process's.
        """
        readEnd, writeEnd = os.pipe()
        self.addCleanup(os.close, readEnd)
        self.addCleanup(os.close, writeEnd)
        old = os.getppid()
        for environ in [
            {UPGRADE_FROM: str(old)},
            {UPGRADE_FROM: str(old), UPGRADE_PIPE: f"1717:{writeEnd}"},
            {UPGRADE_FROM: "1717", UPGRADE_PIPE: f"1717:{writeEnd}"},
            # A stray variable naming a process that did not start this one.
            {UPGRADE_FROM: "1717"},
        ]:
            greetOldParent(environ)
            takeOver(environ, Logger())
        self.assertEqual(self.killed, [(old, signal.SIGTERM), (old, signal.SIGTERM)])
        os.set_blocking(readEnd, False)
        self.assertRaises(BlockingIOError, os.read, readEnd, 100)


class SharedLogTests(SynchronousTestCase):
    def test_newParentAppends(self) -> None:
        """
        In a new parent, twistd's log file is opened append-only from its
        first line: what the old parent writes meanwhile is not written
        over.
        """
        from twisted.python import logfile

        self.patch(logfile.LogFile, "_openFile", logfile.LogFile._openFile)
        self.patch(_sharedlog, "_SHARED_LOGS", [])
        directory = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, directory)
        path = Path(directory, "maccept.log")
        path.write_bytes(b"old 1\n")
        appendToLogFiles()
        log = logfile.LogFile.fromFullPath(str(path), rotateLength=None)
        self.addCleanup(log.close)
        log.write("new 1\n")
        oldParent = os.open(path, os.O_WRONLY | os.O_APPEND)
        os.write(oldParent, b"old 2\n")
        os.close(oldParent)
        log.write("new 2\n")
        log.flush()
        self.assertEqual(path.read_bytes(), b"old 1\nnew 1\nold 2\nnew 2\n")

    def test_followsTheOldParentsRotation(self) -> None:
        """
        When the old parent rotates the shared log while it drains, the new
        parent reopens the file by its name instead of writing on in the
        renamed one; it stops watching once the old parent is gone.
        """
        from twisted.python import logfile

        self.patch(logfile.LogFile, "_openFile", logfile.LogFile._openFile)
        self.patch(_sharedlog, "_SHARED_LOGS", [])
        directory = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, directory)
        path = Path(directory, "maccept.log")
        appendToLogFiles()
        log = logfile.LogFile.fromFullPath(str(path), rotateLength=None)
        self.addCleanup(log.close)
        clock = Clock()
        followRotatedLogs(clock, os.getppid())
        log.write("before\n")
        os.rename(path, f"{path}.1")  # the old parent rotates
        path.write_bytes(b"old parent\n")
        clock.advance(1)
        log.write("after\n")
        self.assertEqual(path.read_bytes(), b"old parent\nafter\n")
        self.assertEqual(Path(f"{path}.1").read_bytes(), b"before\n")
        self.assertEqual(len(clock.getDelayedCalls()), 1)
        gone = Clock()
        followRotatedLogs(gone, os.getppid() + 1)
        gone.advance(1)
        self.assertEqual(gone.getDelayedCalls(), [])


class WorkersAfterUpgradeTests(SynchronousTestCase):
    def test_sizeFollows(self) -> None:
        """
        A new parent runs as many workers as the old one ran (scaled since
        its --workers), and forgets the number; without an upgrade, or with
        a value no old parent writes, --workers stands.
        """
        offered = {UPGRADE_FROM: "4242", UPGRADE_PIPE: "4242:9"}
        environ = {**offered, UPGRADE_WORKERS: "5"}
        self.assertEqual(workersAfterUpgrade(environ, 2), 5)
        self.assertEqual(environ, offered)
        for stray in [
            {UPGRADE_WORKERS: "5"},
            {**offered, UPGRADE_WORKERS: "0"},
            # Passed on by an old parent of older code, which ignores it.
            {UPGRADE_FROM: "4242", UPGRADE_PIPE: "1717:9", UPGRADE_WORKERS: "5"},
        ]:
            self.assertEqual(workersAfterUpgrade(stray, 2), 2)


class InheritedTests(SynchronousTestCase):
    def test_readAndForgotten(self) -> None:
        """
        The inherited sockets are read by description, and the variable is
        removed so that this parent's children do not see it.
        """
        environ = {INHERIT: json.dumps([{"fd": 7, "description": "tcp:7007"}]), "OTHER": "x"}
        self.assertEqual(inheritedListeners(environ), {"tcp:7007": 7})
        self.assertEqual(environ, {"OTHER": "x"})
        self.assertEqual(inheritedListeners({}), {})
