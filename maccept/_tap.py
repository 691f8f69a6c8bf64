# -*- test-case-name: tests.test_tap -*-
"""
C{twistd maccept}: build the service from the options.

The listening sockets are created here, before twistd starts logging,
daemonises or sheds privileges, so that a port in use or a privileged port
fails at once with one line, and so that a privileged port can be bound
before C{--uid} takes effect.
"""

from __future__ import annotations

import atexit
import os
import sys
from typing import Any

from twisted.application.service import IService
from twisted.internet.address import UNIXAddress
from twisted.internet.endpoints import UNIXServerEndpoint, serverFromString
from twisted.internet.interfaces import IListeningPort
from twisted.logger import Logger

from maccept._listening import ListenError, ListeningSocket, adoptListener, listen, listenNow
from maccept._options import CommandLineOptions, fail
from maccept._parent import MacceptService
from maccept._pool import PoolSettings, WorkerPool
from maccept._states import PoolState
from maccept._systemd import SystemdNotifier
from maccept._upgrade import UPGRADE_FROM, Upgrade, inheritedListeners, takeOver

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

    # After an upgrade (SIGUSR2), the old parent's sockets, by description.
    inherited = inheritedListeners()
    listeners: list[ListeningSocket] = []
    for description in options["listen"]:
        try:
            if description in inherited:
                listeners.append(adoptListener(reactor, description, inherited.pop(description)))
            else:
                listeners.append(listen(reactor, description))
        except ListenError as e:
            for listener in listeners:
                listener.close()
            fail(f"--listen {description}: {e}")
    for fd in inherited.values():
        os.close(fd)  # the old parent listened on more than we were asked to

    settings = PoolSettings(
        size=options["workers"],
        protocol=options["protocol"],
        protocolOptions=tuple(options["protocol-option"]),
        balance=options["balance"] == "even",
        gracefulTimeout=options["graceful-timeout"],
        watchdogTimeout=options["timeout"],
        maxConnections=options["max-connections"],
        maxConnectionsJitter=options["max-connections-jitter"],
        maxMemory=options["max-memory"] * 2**20 if options["max-memory"] else None,
        maxConcurrent=options["max-concurrent"],
        idleTimeout=options["idle-timeout"],
        reactor=options["worker-reactor"],
        cpus=options["cpu-affinity"] or (),
    )

    def onFatal(message: str) -> None:
        exitWithStatus(1)
        reactor.stop()

    pool = WorkerPool(reactor, listeners, settings, onFatal)
    service = MacceptService(reactor, listeners, pool)
    twistdConfig = getattr(options, "parent", None)
    service.upgrade = Upgrade(
        reactor, listeners, twistdConfig, lambda: pool.state is PoolState.RUNNING
    )

    def tookOver(state: PoolState) -> None:
        if state is PoolState.RUNNING and UPGRADE_FROM in os.environ:
            takeOver(os.environ, _log)
            del os.environ[UPGRADE_FROM]

    pool.stateObservers.append(tookOver)
    service.servicePorts = listenServicePorts(reactor, options, service)
    notifier = SystemdNotifier.fromEnvironment(reactor)
    if notifier is not None:
        notifier.follow(pool)
    return service


def listenServicePorts(
    reactor: Any, options: CommandLineOptions, service: MacceptService
) -> list[IListeningPort]:
    """
    The parent's own ports: metrics and health over HTTP, and the control
    socket.  Failing to listen on one fails start-up with one line.
    """
    wanted: list[tuple[str, Any, Any]] = []
    if options["metrics"] is not None:
        from maccept._http import metricsSite

        endpoint = serverFromString(reactor, options["metrics"])
        wanted.append((f"--metrics {options['metrics']}", endpoint, metricsSite(service.pool)))
    if options["control"] is not None:
        from maccept._control import controlFactory

        path = options["control"]
        endpoint = UNIXServerEndpoint(reactor, path, mode=0o600, wantPID=True)
        wanted.append(
            (f"--control {path}", endpoint, controlFactory(service.pool, service.requestStop))
        )
    ports: list[IListeningPort] = []
    for option, endpoint, factory in wanted:
        try:
            port = listenNow(endpoint, factory)
        except ListenError as e:
            for listener in service.listeners:
                listener.close()
            for port in ports:
                port.stopListening()
            fail(f"{option}: {e}")
        ports.append(port)
        _log.info("{option}: listening on {address}", option=option, address=describe(port))
    return ports


def describe(port: IListeningPort) -> str:
    """
    Where a service port listens, as an operator would type it.
    """
    address = port.getHost()
    if isinstance(address, UNIXAddress):
        return str(address.name.decode() if isinstance(address.name, bytes) else address.name)
    return f"http://{address.host}:{address.port}/"  # type: ignore[attr-defined]
