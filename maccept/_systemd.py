# -*- test-case-name: tests.test_systemd -*-
"""
Telling systemd how the pool is doing (C{Type=notify}): C{READY=1} once
every worker accepts, C{RELOADING=1} while a new generation starts,
C{STOPPING=1} when the stop begins, and C{WATCHDOG=1} keep-alives when the
unit sets C{WatchdogSec=}.

The protocol is one datagram per message to the UNIX socket named by
C{NOTIFY_SOCKET} (see sd_notify(3)); where that variable is unset, as
outside systemd, nothing is sent.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable, Mapping
from typing import Any

from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from maccept._pool import WorkerPool
from maccept._states import PoolState

#: The shortest interval between watchdog pings, in seconds.
MIN_WATCHDOG_PING = 0.1


class SystemdNotifier:
    """
    Follows the pool's state and reports it to systemd.
    """

    log = Logger()

    def __init__(self, reactor: Any, address: str, watchdogSeconds: float | None = None) -> None:
        self.reactor = reactor
        # A leading "@" names the abstract namespace.
        self.address = "\0" + address[1:] if address.startswith("@") else address
        self.socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.watchdog: LoopingCall | None = None
        if watchdogSeconds:
            self.watchdog = LoopingCall(self.notify, "WATCHDOG=1")
            self.watchdog.clock = reactor
            # Twice per period, as sd_watchdog_enabled(3) advises; no more
            # often than MIN_WATCHDOG_PING (a period of a few microseconds
            # would spin the parent: systemd's own floor is 1 s anyway).
            self.watchdog.start(max(watchdogSeconds / 2, MIN_WATCHDOG_PING), now=True)

    @classmethod
    def fromEnvironment(
        cls, reactor: Any, environ: Mapping[str, str] = os.environ
    ) -> SystemdNotifier | None:
        """
        A notifier if systemd asked for one (C{NOTIFY_SOCKET}), with its
        watchdog if C{WATCHDOG_USEC} is set for this process.
        """
        address = environ.get("NOTIFY_SOCKET")
        if not address:
            return None
        watchdog = None
        usec = environ.get("WATCHDOG_USEC")
        pid = environ.get("WATCHDOG_PID")
        if usec and usec.isdigit() and (not pid or pid == str(os.getpid())):
            watchdog = int(usec) / 1e6
        return cls(reactor, address, watchdog)

    def follow(self, pool: WorkerPool, silent: Callable[[], bool] = lambda: False) -> None:
        """
        Report C{pool}'s changes unless C{silent} says this parent does not
        speak for the service: after it handed over to a new parent (SIGUSR2),
        and not in a new parent before it takes over.  With NotifyAccess=all
        systemd takes a message from any process of the unit as the
        service's: an old parent's STOPPING=1, or a failed new parent's,
        would stop the whole unit.
        """
        self.pool = pool
        self.silent = silent
        pool.stateObservers.append(self.poolChanged)
        pool.sizeObservers.append(lambda size: self.sizeChanged())
        pool.stopObservers.append(self.stopAnnounced)

    def poolChanged(self, state: PoolState) -> None:
        """
        Report a change of the pool's state.  The watchdog keeps beating
        while the pool drains: a drain may take the whole graceful timeout.
        """
        if self.silent():
            return
        if state is PoolState.RUNNING:
            # MAINPID: after an upgrade (SIGUSR2) this parent is the new main
            # process (systemd takes it with NotifyAccess=all).
            self.notify("READY=1", f"MAINPID={os.getpid()}", self._servingStatus())
        elif state is PoolState.RELOADING:
            monotonic = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
            self.notify("RELOADING=1", f"MONOTONIC_USEC={monotonic}", "STATUS=reloading")
        elif state is PoolState.STOPPING:
            self.notify("STOPPING=1", "STATUS=draining")

    def stopAnnounced(self) -> None:
        """
        A stop comes after C{--stop-delay}: systemd hears of it at once
        (the workers accept until the drain).
        """
        if not self.silent():
            self.notify("STOPPING=1", "STATUS=stopping: /healthz answers 503 until the drain")

    def sizeChanged(self) -> None:
        """
        The pool was scaled: C{systemctl status} shows the new size.
        """
        if not self.silent() and self.pool.state is PoolState.RUNNING:
            self.notify(self._servingStatus())

    def _servingStatus(self) -> str:
        # A failed reload is no success: systemctl status says so until a
        # reload succeeds.
        failure = self.pool.reloadFailure
        # One line: a newline would start another assignment for systemd.
        failed = f"; the last reload failed: {' '.join(failure.split())[:200]}" if failure else ""
        return f"STATUS=serving with {self.pool.size} workers{failed}"

    def notify(self, *lines: str) -> None:
        try:
            self.socket.sendto("\n".join(lines).encode(), self.address)
        except OSError as e:
            self.log.warn(
                "cannot notify systemd at {address}: {error}", address=self.address, error=e
            )

    def close(self) -> None:
        if self.watchdog is not None and self.watchdog.running:
            self.watchdog.stop()
        self.socket.close()
