# -*- test-case-name: tests.test_command_line,tests.test_serving -*-
"""
C{twistd maccept}: build the service from the options.

The listening sockets are created here, before twistd starts logging,
daemonises or sheds privileges, so that a port in use or a privileged port
fails at once with one line, and so that a privileged port can be bound
before C{--uid} takes effect.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import sys
from collections.abc import Callable
from typing import Any

from twisted.application.service import IService
from twisted.internet.error import ReactorNotRunning
from twisted.logger import Logger

from maccept._board import MAX_WORKERS
from maccept._descriptions import ListenError, shown
from maccept._handover import (
    UPGRADE_FROM,
    greetOldParent,
    inheritedListeners,
    takeOver,
    tellOldParentWhy,
    workersAfterUpgrade,
)
from maccept._listening import ListeningSocket, adoptListener, listen
from maccept._options import CommandLineOptions, fail
from maccept._parent import MacceptService
from maccept._pool import PoolSettings, WorkerPool
from maccept._serviceports import openServicePorts
from maccept._sharedlog import appendToLogFiles, followRotatedLogs
from maccept._states import PoolState
from maccept._systemd import SystemdNotifier
from maccept._upgrade import Upgrade

_log = Logger(namespace="maccept")

Options = CommandLineOptions


def exitWithStatus(code: int) -> None:
    """
    Make the process exit with C{code} once twistd has finished.

    twistd always exits 0 after its reactor stops; an exit handler, which
    runs after twistd has removed its pid file, sets the status.
    """

    def _exit() -> None:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)

    atexit.register(_exit)


def makeService(options: CommandLineOptions) -> IService:
    from twisted.internet import reactor

    greetOldParent()
    if UPGRADE_FROM in os.environ:
        # twistd opens --logfile after this, and the old parent writes it.
        appendToLogFiles()
    # After an upgrade (SIGUSR2), the old parent's sockets, by description.
    inherited = inheritedListeners()
    listeners = _openListeners(reactor, options["listen"], inherited)
    # Where the command was given, before twistd changes into its --rundir:
    # workers read their options, and a new parent (USR2) starts, there.
    launchDirectory = os.getcwd()
    pool = WorkerPool(
        reactor, listeners, _poolSettings(options, launchDirectory), _onFatal(reactor)
    )
    upgrade = Upgrade(
        reactor,
        listeners,
        getattr(options, "parent", None),
        isServing=lambda: pool.state is PoolState.RUNNING,
        willServe=lambda: pool.state in (PoolState.STARTING, PoolState.RELOADING),
        poolSize=lambda: pool.size,
        beforeStart=pool.forgetQueuedReload,
        onTakenOver=lambda: service.handOver(),
        servicePorts=lambda: service.servicePorts,
        directory=launchDirectory,
    )
    service = MacceptService(reactor, listeners, pool, upgrade)
    service.stopDelay = options["stop-delay"]
    # Before the systemd notifier's: a new parent's READY (with its
    # MAINPID) goes once its own observer has taken over, which forgets
    # UPGRADE_FROM (see silent= below), in the same state change.
    _followUpgrade(reactor, service, pool, upgrade)
    try:
        service.servicePorts = openServicePorts(
            reactor, options, pool, service.stopFromControl, inherited
        )
    except ListenError as e:
        for listener in listeners:
            listener.close()
        fail(str(e))
    for fd in inherited.values():
        os.close(fd)  # the old parent listened on more than we were asked to
    notifier = SystemdNotifier.fromEnvironment(reactor)
    if notifier is not None:
        # Silent in a parent that handed over, or that has not taken over.
        notifier.follow(
            pool,
            silent=lambda: UPGRADE_FROM in os.environ or upgrade.takenOver,
        )
    return service


def _openListeners(
    reactor: Any, descriptions: list[str], inherited: dict[str, int]
) -> list[ListeningSocket]:
    """
    A socket for each C{--listen}: the one an old parent handed over for
    the same description (USR2), or a new one.  One that cannot listen
    ends the start-up with one line, closing those already made.
    """
    listeners: list[ListeningSocket] = []
    for description in descriptions:
        try:
            if description in inherited:
                listeners.append(adoptListener(reactor, description, inherited.pop(description)))
            else:
                listeners.append(listen(reactor, description))
        except ListenError as e:
            for listener in listeners:
                listener.close()
            fail(f"--listen {shown(description)}: {e}")
    return listeners


def _poolSettings(options: CommandLineOptions, optionsDirectory: str) -> PoolSettings:
    """
    What the command line decides about the pool (its size as the old
    parent ran it, after an upgrade); C{optionsDirectory} is where it was
    given.
    """
    return PoolSettings(
        # Within the bounds of --workers, whatever the variable says.
        size=min(workersAfterUpgrade(os.environ, options["workers"]), MAX_WORKERS),
        protocol=options["protocol"],
        protocolOptions=tuple(options["protocol-option"]),
        optionsDirectory=optionsDirectory,
        balance=options["balance"] == "even",
        gracefulTimeout=options["graceful-timeout"],
        startTimeout=options["start-timeout"],
        watchdogTimeout=options["timeout"],
        maxConnections=options["max-connections"],
        maxConnectionsJitter=options["max-connections-jitter"],
        maxMemory=options["max-memory"] * 2**20 if options["max-memory"] else None,
        maxConcurrent=options["max-concurrent"],
        idleTimeout=options["idle-timeout"],
        reactor=options["worker-reactor"],
        cpus=options["cpu-affinity"] or (),
    )


def _onFatal(
    reactor: Any, exitWith: Callable[[int], None] = exitWithStatus
) -> Callable[[str], None]:
    def onFatal(message: str) -> None:
        # One line on the terminal too: under twistd -n the log goes to
        # standard output, where the reason can scroll past unseen.
        with contextlib.suppress(OSError):
            os.write(2, f"maccept: error: {message}\n".encode(errors="replace"))
        tellOldParentWhy(message)  # a new parent (USR2): for the old one's log
        exitWith(1)
        # The reactor may be stopping already (an operator's stop came
        # first), and then refuses a second stop().
        with contextlib.suppress(ReactorNotRunning):
            reactor.stop()

    return onFatal


def _followUpgrade(
    reactor: Any, service: MacceptService, pool: WorkerPool, upgrade: Upgrade
) -> None:
    """
    Both sides of USR2 follow the pool: this parent as the old one (a
    queued upgrade starts once the pool serves, and scaling and reloads
    wait while one is under way), and as the new one (taking over once its
    pool runs).
    """
    pool.stateObservers.append(
        lambda state: upgrade.poolServes() if state is PoolState.RUNNING else None
    )
    pool.upgrading = lambda: "an upgrade (USR2) is under way" if upgrade.underWay else None

    def tookOver(state: PoolState) -> None:
        if state is PoolState.RUNNING and UPGRADE_FROM in os.environ:
            service.takeOwnership(adopted=True)
            for servicePort in service.servicePorts:
                servicePort.answer()
            oldParent = os.environ[UPGRADE_FROM]
            takeOver(os.environ, _log)
            if oldParent == str(os.getppid()):
                followRotatedLogs(reactor, int(oldParent))

    pool.stateObservers.append(tookOver)
