# -*- test-case-name: tests.test_upgrade_unit,tests.test_upgrade -*-
"""
Upgrading maccept itself (SIGUSR2), as nginx and unicorn do: the parent
starts a new parent from the code now on disk, handing it the listening
sockets; once the new parent's workers all accept, it tells the old parent
to stop, and the old one drains as on SIGTERM.  The sockets never close, so
no connection is refused.  This is the old parent's side; the new parent's
is L{maccept._handover}.

The new parent says it serves on a pipe of its own (L{maccept._handover}),
not with a signal, so that the old parent can tell the hand-over from a
stop asked for by someone else: stopped before the hand-over, the old
parent stops the new one too and stops for good (its paths, its metrics);
handed over, it leaves those to the new parent, and tells systemd nothing
more.  A new parent greets the old one on that pipe as it starts; one that
does not (older code, as in a rollback) still hands over with SIGTERM, so
a stop before any greeting is taken for that hand-over, and found out if
a greeting follows.

The pidfile follows the parent that serves: the old parent renames its
pidfile to C{PIDFILE.oldbin} (and will remove that one when it exits), so
that the new twistd can write C{PIDFILE}.  If the new parent fails before
it is ready, the old one renames the pidfile back and keeps serving.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import Callable, Mapping, MutableMapping, Sequence
from enum import Enum
from pathlib import Path
from typing import Any

from twisted.internet import defer
from twisted.internet.error import ProcessExitedAlready
from twisted.internet.interfaces import IDelayedCall, IProcessTransport
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from maccept._handover import (
    ERROR,
    HELLO,
    INHERIT,
    SERVING,
    UPGRADE_FROM,
    UPGRADE_PIPE,
    UPGRADE_WORKERS,
    pipeValue,
)
from maccept._listening import ListeningSocket
from maccept._serviceports import ServicePort
from maccept._sharedlog import shareLogFile
from maccept._signals import UPGRADE_BLOCKED, spawnSignalsBlocked
from maccept._socketpath import SocketPath

_TWISTD = "from twisted.scripts.twistd import run; run()"


def commandLine(
    argv: Sequence[str] = sys.argv, twistdConfig: Mapping[str, Any] | None = None
) -> list[str]:
    """
    The command that starts this same twistd again.

    A daemon's new parent runs with C{--nodaemon} (and the log file twistd
    would have chosen), as nginx's new master does not daemonise again: it
    stays this parent's child, so that its exit tells a failed upgrade
    rather than the end of daemonising.
    """
    extra: list[str] = []
    # twist (python -m twisted) never daemonises, and has no such options.
    if twistdConfig is not None and "nodaemon" in twistdConfig and not twistdConfig["nodaemon"]:
        extra.append("--nodaemon")
        if not twistdConfig.get("logfile"):
            extra.append("--logfile=twistd.log")
    if argv[0] == "-c":
        return [sys.executable, "-c", _TWISTD, *extra, *argv[1:]]
    if Path(argv[0]).parts[-2:] == ("twisted", "__main__.py"):
        # python -m twisted: run as a module again, so that its sys.path
        # starts, like this one's, with the current directory.
        return [sys.executable, "-m", "twisted", *extra, *argv[1:]]
    return [sys.executable, argv[0], *extra, *argv[1:]]


#: How long a stopping parent waits for a new parent to greet it (it does
#: as soon as its interpreter has loaded Twisted), before taking the stop
#: for the hand-over of a new parent of older code.
GREETING_WAIT = 10.0


class Stage(Enum):
    """
    Where an upgrade stands, in the old parent.
    """

    IDLE = "idle"
    STARTED = "started"  # the new parent runs; not heard from yet
    GREETED = "greeted"  # it will say when it serves
    SERVING = "serving"  # it said so: this parent drains for good
    SIGNALLED = "signalled"  # stopped before a greeting: older code's hand-over
    ABANDONED = "abandoned"  # this parent was stopped, and stopped the new one


class _NewParent(ProcessProtocol):
    def __init__(self, upgrade: Upgrade, pipe: int) -> None:
        self.upgrade = upgrade
        self.pipe = pipe
        self.unread = b""

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        if childFD != self.pipe:
            return
        *lines, self.unread = (self.unread + data).split(b"\n")
        self.unread = self.unread[-64:]
        for line in lines:
            if line == HELLO:
                self.upgrade.greet()
            elif line == SERVING:
                self.upgrade.tookOver()
            elif line.startswith(ERROR):
                self.upgrade.newParentError = line[len(ERROR) :].decode(errors="replace")

    def processEnded(self, reason: Failure) -> None:
        self.upgrade.newParentEnded(reason)


class Upgrade:
    """
    The old parent's side of an upgrade.

    @param twistdConfig: twistd's own options (C{pidfile} is read and, for
        the rename, changed there, so twistd removes the right file).
    """

    log = Logger()

    def __init__(
        self,
        reactor: Any,
        listeners: Sequence[ListeningSocket],
        twistdConfig: MutableMapping[str, Any] | None,
        *,
        isServing: Callable[[], bool],
        willServe: Callable[[], bool],
        poolSize: Callable[[], int],
        beforeStart: Callable[[], None],
        onTakenOver: Callable[[], None],
        servicePorts: Callable[[], Sequence[ServicePort]],
        directory: str | None = None,
    ) -> None:
        """
        @param isServing: Whether the pool serves now (an upgrade starts only
            then).
        @param willServe: Whether the pool will serve soon (it starts or
            reloads): then a USR2 waits for it, as a HUP does, rather than
            being dropped.
        @param poolSize: How many workers the pool runs now (scaled since
            C{--workers}, maybe): the new parent starts as many.
        @param beforeStart: Called as an upgrade starts (a queued reload is
            dropped).
        @param onTakenOver: The old parent's stop, called once the new
            parent serves.
        @param servicePorts: The parent's own ports (L{maccept._serviceports}),
            handed over too; opened after this object is made.
        @param directory: Where this parent's command was given: the new
            parent starts there too, so that its command line (a relative
            path in it, C{PYTHONPATH=.}) means what it meant for this one
            before twistd changed into its C{--rundir}.  (Default: the
            current directory when the upgrade starts.)
        """
        self.reactor = reactor
        self.listeners = listeners
        self.twistdConfig = twistdConfig
        self.isServing = isServing
        self.willServe = willServe
        self.poolSize = poolSize
        self.beforeStart = beforeStart
        self.onTakenOver = onTakenOver
        self.servicePorts = servicePorts
        self.directory = directory
        self.newParent: IProcessTransport | None = None
        self.stage = Stage.IDLE
        self._settling: list[defer.Deferred[None]] = []
        self._settleTimer: IDelayedCall | None = None
        self._queued = False
        #: This parent is asked to stop: no upgrade starts any more.
        self._stopping = False
        #: When a stop came before the new parent greeted (L{Stage.SIGNALLED}).
        self._signalledAt = 0.0
        #: Why the new parent gave up, if it said (see L{tellOldParentWhy}).
        self.newParentError = ""

    @property
    def underWay(self) -> bool:
        """
        A new parent starts, and has not taken over yet.
        """
        return self.stage in (Stage.STARTED, Stage.GREETED)

    @property
    def takenOver(self) -> bool:
        """
        A new parent serves in this one's place (its sockets' paths, its
        pidfile, and what systemd hears are the new parent's).
        """
        return self.stage in (Stage.SERVING, Stage.SIGNALLED)

    def start(self) -> None:
        if self._stopping:
            self.log.warn("upgrade ignored: this parent is stopping")
            return
        if self.newParent is not None or self.takenOver:
            self.log.warn("upgrade ignored: one is already under way")
            return
        if not self.isServing():
            if self.willServe():
                if not self._queued:
                    self._queued = True
                    self.log.info("upgrade queued: it starts once the pool serves")
                return
            self._queued = False
            self.log.warn("upgrade ignored: the pool is not serving")
            return
        self._queued = False
        self.newParentError = ""
        inherited: list[dict[str, Any]] = []
        childFDs: dict[int, Any] = {0: "w", 1: 1, 2: 2}
        handOver = [(each.description, each.fileno()) for each in self.listeners]
        handOver += [(each.label, each.fileno()) for each in self.servicePorts()]
        try:
            for description, fileno in handOver:
                fd = os.dup(fileno)
                inherited.append({"fd": fd, "description": description})
                childFDs[fd] = fd
        except OSError as e:  # out of descriptors
            for each in inherited:
                os.close(each["fd"])
            self.log.error("upgrade failed: cannot hand the sockets over: {why}", why=e)
            return
        env = dict(os.environ)
        for name in ("LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES", "WATCHDOG_PID"):
            # systemd's descriptors are among those handed over, by name;
            # its watchdog is the new parent's to feed once it is the main
            # process (WATCHDOG_PID names this one).
            env.pop(name, None)
        pipe = max(childFDs) + 1
        childFDs[pipe] = "r"
        env[INHERIT] = json.dumps(inherited)
        env[UPGRADE_FROM] = str(os.getpid())
        env[UPGRADE_PIPE] = pipeValue(pipe)
        env[UPGRADE_WORKERS] = str(self.poolSize())
        shareLogFile(self.twistdConfig)
        self._movePidfile(".oldbin")
        command = commandLine(sys.argv, self.twistdConfig)
        try:
            with spawnSignalsBlocked(UPGRADE_BLOCKED):
                self.newParent = self.reactor.spawnProcess(
                    _NewParent(self, pipe),
                    command[0],
                    command,
                    env=env,
                    path=self.directory or os.getcwd(),
                    childFDs=childFDs,
                )
        except Exception:
            self.log.failure("upgrade failed: cannot start a new parent")
            self._movePidfile("")
        finally:
            for each in inherited:
                os.close(each["fd"])
        if self.newParent is not None:
            self.stage = Stage.STARTED
            self.beforeStart()
            self.log.info(
                "upgrade: started a new parent (pid {pid}) from the code on disk",
                pid=self.newParent.pid,
            )

    def greet(self) -> None:
        """
        The new parent runs maccept's code and will say when it serves.
        """
        pid = self.newParent.pid if self.newParent is not None else "?"
        if self.stage is Stage.STARTED:
            self.stage = Stage.GREETED
            # It greets before it reads its command line, which may still
            # refuse: the line says no more than it knows.
            self.log.info(
                "upgrade: the new parent (pid {pid}) answered; it checks its command line, "
                "then starts its workers",
                pid=pid,
            )
        elif self.stage is Stage.SIGNALLED:
            # The stop taken for an older parent's hand-over was someone's
            # stop: it is the new parent's too.
            self._stopNewParent()
            self._takeSocketPathsBack()
            self._settle()

    def _takeSocketPathsBack(self) -> None:
        """
        No new parent took over after all: the sockets' paths, left for it,
        are this stopping parent's to remove.
        """
        for path in SocketPath.ofOwners([*self.listeners, *self.servicePorts()]):
            path.remove()

    def settled(self) -> defer.Deferred[None]:
        """
        Fires once this parent, stopping, may exit: at once, unless its
        stop was taken for the hand-over of a new parent that has not
        greeted (older code, or one too slow to greet yet); then once it
        greets (and is stopped too), exits, or L{GREETING_WAIT} has passed.
        Exiting sooner would leave a new parent of this code serving on
        after a stop.
        """
        if self.stage is not Stage.SIGNALLED or self.newParent is None:
            return defer.succeed(None)
        waiting: defer.Deferred[None] = defer.Deferred()
        self._settling.append(waiting)
        if self._settleTimer is None:
            self._settleTimer = self.reactor.callLater(GREETING_WAIT, self._settle)
        return waiting

    def _settle(self) -> None:
        if self._settleTimer is not None and self._settleTimer.active():
            self._settleTimer.cancel()
        self._settleTimer = None
        waiting, self._settling = self._settling, []
        for each in waiting:
            each.callback(None)

    def tookOver(self) -> None:
        """
        The new parent's workers all accept: this parent stops (unless it
        was stopped meanwhile, and has stopped the new one too).
        """
        if self.stage not in (Stage.STARTED, Stage.GREETED):
            return
        self.stage = Stage.SERVING
        self.log.info(
            "upgrade: the new parent (pid {pid}) serves; this one drains and exits",
            pid=self.newParent.pid if self.newParent is not None else "?",
        )
        self.onTakenOver()

    def poolServes(self) -> None:
        """
        The pool serves (again): start an upgrade queued meanwhile.
        """
        if self._queued:
            self.reactor.callLater(0, self._startQueued)

    def _startQueued(self) -> None:
        # Still queued: a stop in the same turn forgot it.
        if self._queued:
            self.start()

    def abandon(self) -> None:
        """
        This parent is asked to stop before the new one took over: stop
        that one too (it has not claimed the sockets' paths), so that
        nothing serves on after the stop.  The pidfile comes back once it
        has exited (and removed its own).  A new parent that has not
        greeted yet may run older code, whose hand-over is this very
        SIGTERM: taken for one, until a greeting says otherwise.
        """
        self._queued = False
        self._stopping = True
        if self.stage is Stage.STARTED:
            self.stage = Stage.SIGNALLED
            self._signalledAt = self.reactor.seconds()
        elif self.stage is Stage.GREETED:
            self._stopNewParent()

    def _stopNewParent(self) -> None:
        self.stage = Stage.ABANDONED
        if self.newParent is not None:
            self.log.warn(
                "upgrade abandoned: stopping the new parent (pid {pid}) too",
                pid=self.newParent.pid,
            )
            with contextlib.suppress(ProcessExitedAlready, OSError):
                self.newParent.signalProcess("TERM")

    def newParentEnded(self, reason: Failure) -> None:
        """
        A new parent that exits before it took over failed (or was stopped
        with this one): this parent keeps its pidfile.
        """
        if self.stage in (Stage.STARTED, Stage.GREETED):
            self.log.error(
                "upgrade failed, keeping this parent: the new one exited ({why}){said}",
                why=reason.getErrorMessage(),
                said=f": {self.newParentError}" if self.newParentError else "",
            )
        elif (
            self.stage is Stage.SIGNALLED
            and self.reactor.seconds() - self._signalledAt < GREETING_WAIT
        ):
            # It ended before it could greet: the stop was of both (a group
            # TERM), not an older parent's hand-over, which would serve on.
            self.stage = Stage.ABANDONED
            self._takeSocketPathsBack()
        if not self.takenOver:
            self._movePidfile("")
            self.stage = Stage.IDLE
        self.newParent = None
        self._settle()

    def _movePidfile(self, suffix: str) -> None:
        """
        Rename the pidfile to C{BASE + suffix} and make twistd remove that
        name when this parent exits.
        """
        if not self.twistdConfig or not self.twistdConfig.get("pidfile"):
            return
        current = self.twistdConfig["pidfile"]
        base = current.removesuffix(".oldbin")
        wanted = base + suffix
        if wanted == current:
            return
        try:
            os.rename(current, wanted)
        except OSError as e:
            self.log.warn("cannot rename the pidfile {pidfile}: {error}", pidfile=current, error=e)
            return
        self.twistdConfig["pidfile"] = wanted
