# -*- test-case-name: tests.test_pool,tests.test_pool_supervision -*-
"""
The parent's side: a supervised pool of worker processes.

The pool starts its workers (L{maccept._spawning}); follows each through
its states (L{maccept._states}); replaces workers that die, hang
(L{maccept._watchdog}), or reach C{--max-connections} or C{--max-memory},
always starting the replacement before the old one drains; reloads by
starting a whole new generation first; scales; and drains every worker
when it stops.
"""

from __future__ import annotations

import math
import random
import sys
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger

from maccept._board import MAX_WORKERS, LoadBoard
from maccept._descriptions import asWord
from maccept._listening import ListeningSocket
from maccept._spawning import WorkerLauncher
from maccept._states import PoolState, WorkerState, nextPoolState
from maccept._watchdog import Watchdog
from maccept._wire import COUNTERS
from maccept._workerprocess import WorkerProcess

#: Why a worker left the pool, for C{maccept_worker_restarts_total}.
RESTART_REASONS = ("crash", "recycle", "watchdog", "reload", "scale")


@dataclass
class PoolSettings:
    """
    What the command line decides about the pool.
    """

    size: int = 1
    protocol: str = "echo"
    balance: bool = True
    gracefulTimeout: float = 30.0
    #: Seconds a new worker may take to be ready (its start hook included).
    startTimeout: float = 10.0
    #: Seconds without a heartbeat before a worker counts as hung (0: never).
    watchdogTimeout: float = 30.0
    maxConnections: int | None = None
    maxConnectionsJitter: int = 0
    #: Bytes of resident memory after which a worker is replaced.
    maxMemory: int | None = None
    #: Open connections at which a worker stops accepting (None: no limit).
    maxConcurrent: int | None = None
    #: Seconds of silence after which a connection is closed (0: never).
    idleTimeout: float = 0.0
    #: The reactor every worker runs.
    reactor: str = "fast"
    #: C{--protocol-option KEY=VALUE}s, for a protocol plugin.
    protocolOptions: tuple[str, ...] = ()
    #: Where the command was given, in which the options were checked.
    optionsDirectory: str | None = None
    #: C{--cpu-affinity}: worker N runs on the N-th of these, in turn.
    cpus: tuple[int, ...] = ()


@dataclass
class PendingRestart:
    """
    A worker that died and waits out its restart delay.  It is still one of
    the pool's members: scaling counts it, and its number stays taken.
    """

    number: int
    generation: int
    #: The worker the restarted one takes over from once ready, if any.
    replaces: WorkerProcess | None
    call: IDelayedCall | None = None


#: Seconds the pool waits before replacing a worker that received SIGTERM:
#: long enough for a SIGTERM sent to the whole group to reach the parent.
SIGNAL_GRACE = 0.2


class WorkerPool(Service):
    """
    Keep C{size} workers (C{settings.size} at start, then as scaled)
    accepting on C{listeners}.

    Restart policy, after L{twisted.runner.procmon.ProcessMonitor} but for
    the whole pool: a worker that crashed after being ready and living at
    least C{threshold} seconds is replaced at once; one that died younger,
    or before it was ever ready, is replaced after a delay that doubles
    with each young death, from C{minRestartDelay} to C{maxRestartDelay},
    so that a crash loop costs a handful of spawns a minute whatever the
    pool's size; after twice C{maxRestartDelay} with no young death, the
    delay starts from the minimum again.

    @ivar onFatal: called with one line when the pool cannot start at all.
    @ivar restarts: how many workers left the pool, by reason.
    """

    log = Logger()

    threshold = 1.0
    minRestartDelay = 1.0
    maxRestartDelay = 60.0
    killTime = 5.0

    def __init__(
        self,
        reactor: Any,
        listeners: Sequence[ListeningSocket],
        settings: PoolSettings,
        onFatal: Callable[[str], None],
        executable: str = sys.executable,
        rng: random.Random | None = None,
    ) -> None:
        self.reactor = reactor
        self.listeners = list(listeners)
        self.settings = settings
        #: A stop is asked for and comes after C{--stop-delay}: the workers
        #: accept meanwhile, but /healthz, status, systemd and every
        #: request to start something new (reload, scale) take it as the
        #: stop (see L{announceStop}).
        self.stopAnnounced = False
        #: A new parent serves in this one's place (see L{handOver}).
        self.handedOver = False
        #: Called when a stop is announced.
        self.stopObservers: list[Callable[[], None]] = []
        #: Called with the new size after every change of the pool's size.
        self.sizeObservers: list[Callable[[int], None]] = []
        self._size = settings.size
        #: Why the last reload failed, until one succeeds (systemd's STATUS).
        self.reloadFailure: str | None = None
        #: The generation the last reload started, once it is ready or has
        #: failed (C{maccept-ctl reload --wait} waits for it).
        self.lastReloadDone: int | None = None
        #: The generation a queued reload would have started, once an
        #: upgrade has dropped it.
        self.reloadDropped: int | None = None
        self.onFatal = onFatal
        self.state = PoolState.STARTING
        self.generation = 1
        self.pendingGeneration: int | None = None
        # Generations are never reused, not even after a failed reload
        # whose workers are still draining.
        self._newestGeneration = self.generation
        self.workers: list[WorkerProcess] = []
        self.restarts: Counter[str] = Counter({reason: 0 for reason in RESTART_REASONS})
        self.departedTotals: Counter[str] = Counter({name: 0 for name in COUNTERS})
        #: Called with the new state after every change of the pool's state.
        self.stateObservers: list[Callable[[PoolState], None]] = []
        self.nextRestartDelay = self.minRestartDelay
        self._lastYoungDeath = -math.inf
        board = LoadBoard.create() if settings.balance else None
        self.launcher = WorkerLauncher(
            reactor, self.listeners, settings, board, executable, rng or random.Random()
        )
        #: Where every worker posts its open connections (C{--balance even}).
        self.board = self.launcher.board
        self._restarts: list[PendingRestart] = []
        #: Recycle requests that came while the pool was starting: why, by worker.
        self._replaceWhenRunning: dict[WorkerProcess, tuple[str, str]] = {}
        #: Replacements of workers that received SIGTERM, not yet started.
        self._signalledReplacements: dict[WorkerProcess, IDelayedCall] = {}
        self._timeoutCall: IDelayedCall | None = None
        #: A reload asked for while the pool started or reloaded.
        self._reloadQueued = False
        #: Why the pool must neither scale nor reload now, or C{None}: a
        #: new parent (USR2) being started was told the size to run, and
        #: imports the code anew itself.
        self.upgrading: Callable[[], str | None] = lambda: None
        self._stopped: defer.Deferred[None] | None = None
        self.watchdog = Watchdog(self)

    @property
    def startTimeout(self) -> float:
        """
        Seconds a new worker may take to be ready (C{--start-timeout}).
        """
        return self.settings.startTimeout

    @property
    def size(self) -> int:
        """
        How many workers the pool runs (C{--workers}, then scaling).
        """
        return self._size

    @size.setter
    def size(self, size: int) -> None:
        if size != self._size:
            self._size = size
            for observer in list(self.sizeObservers):
                observer(size)

    def announceStop(self) -> None:
        """
        A stop comes after C{--stop-delay}: from now on the pool counts as
        stopping for everything but accepting.
        """
        self.stopAnnounced = True
        for observer in list(self.stopObservers):
            observer()

    def handOver(self) -> None:
        """
        A new parent (USR2) took over and serves the same sockets: this
        pool now drains, but the host is as healthy as before.
        """
        self.handedOver = True

    @property
    def stopping(self) -> bool:
        """
        Whether a stop is under way or announced: nothing new starts.
        """
        return self.stopAnnounced or self.state in (PoolState.STOPPING, PoolState.STOPPED)

    @property
    def shownState(self) -> str:
        """
        The state to show (status, /healthz): C{stopping} once announced.
        """
        if self.stopAnnounced and self.state not in (PoolState.STOPPING, PoolState.STOPPED):
            return PoolState.STOPPING.value
        return self.state.value

    # Queries.

    def serving(self) -> list[WorkerProcess]:
        """
        Workers of the serving generation that are not on their way out.
        """
        return [
            w
            for w in self.workers
            if w.generation == self.generation
            and w.state in (WorkerState.STARTING, WorkerState.READY)
            and w.stopReason is None
        ]

    def pendingRestarts(self) -> list[PendingRestart]:
        """
        Workers of the serving generation waiting out their restart delay.
        """
        return [
            r
            for r in self._restarts
            if r.generation == self.generation and r.call is not None and r.call.active()
        ]

    def totals(self) -> dict[str, int]:
        """
        Every counter in L{COUNTERS} over all workers, past and present.
        A worker's last report is folded in when it exits, so the totals
        never go backwards across restarts, recycling or reloads.
        """
        return {
            name: self.departedTotals[name] + sum(w.stats[name] for w in self.workers)
            for name in COUNTERS
        }

    def ofGeneration(self, generation: int | None) -> list[WorkerProcess]:
        return [w for w in self.workers if w.generation == generation]

    def transition(self, event: str) -> PoolState:
        before, self.state = self.state, nextPoolState(self.state, event)
        if self.state is not before:
            for observer in list(self.stateObservers):
                observer(self.state)
            if self.state is PoolState.RUNNING and self._reloadQueued:
                self.reactor.callLater(0, self._runQueuedReload)
        return self.state

    # Service.

    def startService(self) -> None:
        super().startService()
        for number in range(1, self.size + 1):
            try:
                self._spawn(number, self.generation)
            except OSError as e:
                # Out of descriptors, or an interpreter that --uid's user
                # may not run: one line, once the reactor can stop.
                why = f"cannot start worker {number}: {e}"
                self.reactor.callWhenRunning(self._fatal, why)
                return
        self._timeoutCall = self.reactor.callLater(self.startTimeout, self._startTimedOut)
        self.watchdog.start()

    def stopService(self) -> defer.Deferred[None]:
        """
        Drain every worker; fire once all have exited.
        """
        super().stopService()
        self.transition("stop")
        self._cancelTimers()
        self._stopped = defer.Deferred()
        for worker in list(self.workers):
            self._drain(worker, "stop")
        self._checkStopped()
        return self._stopped

    def _cancelTimers(self) -> None:
        self._cancelTimeout()
        for worker in list(self._signalledReplacements):
            self._cancelSignalledReplacement(worker)
        for restart in list(self._restarts):
            self._cancelRestart(restart)
        self.watchdog.stop()

    def _checkStopped(self) -> None:
        if self._stopped is not None and not self.workers and not self._stopped.called:
            self.transition("all exited")
            self._stopped.callback(None)

    def killAll(self) -> None:
        """
        Kill every worker now, open connections and all.
        """
        for worker in list(self.workers):
            worker.kill("stop")

    # Spawning.

    def _spawn(
        self, number: int, generation: int, replaces: WorkerProcess | None = None
    ) -> WorkerProcess:
        """
        Start worker C{number} of C{generation}.

        @raise OSError: no process could be started (out of descriptors,
            processes or memory); the pool is left as it was.
        """
        worker = WorkerProcess(self, number, generation, self.reactor.seconds())
        worker.replaces = replaces
        self.launcher.launch(worker)
        self.workers.append(worker)
        self.log.info(
            "started worker {number} (pid {pid}, generation {generation})",
            number=number,
            pid=worker.pid,
            generation=generation,
        )
        return worker

    # Workers report.

    def workerReady(self, worker: WorkerProcess) -> None:
        self.log.info("worker {number} (pid {pid}) ready", number=worker.number, pid=worker.pid)
        old = worker.replaces
        if old is not None:
            worker.replaces = None
            self._drain(old, old.stopReason or "recycle")
        if self.state is PoolState.STARTING and self._allReady(self.generation):
            self.transition("all ready")
            self._cancelTimeout()
            self.log.info(
                "all {count} workers ready on {listen}",
                count=len(self.serving()),
                listen=" ".join(asWord(listener.address) for listener in self.listeners),
            )
            self._replaceRemembered()
        elif self.state is PoolState.RELOADING and self._allReady(self.pendingGeneration):
            self._finishReload()

    def _allReady(self, generation: int | None) -> bool:
        # One sent SIGTERM stopped accepting: it does not count, its
        # replacement does.
        workers = [
            w for w in self.ofGeneration(generation) if w.stopReason is None and not w.signalled
        ]
        return len(workers) >= self.size and all(w.state is WorkerState.READY for w in workers)

    def _drain(self, worker: WorkerProcess, reason: str) -> None:
        """
        Tell C{worker} to finish within C{--graceful-timeout}, and kill it
        L{killTime} seconds after that.
        """
        worker.drain(reason, self.settings.gracefulTimeout, self.killTime)

    def lateReport(self, worker: WorkerProcess, stats: dict[str, Any]) -> None:
        """
        A report from a worker already folded into the totals (its process
        ended while the parent was behind on its control channel): what it
        counted since still adds up.
        """
        for name in COUNTERS:
            increase = int(stats.get(name, 0)) - int(worker.stats[name])
            if increase > 0:
                self.departedTotals[name] += increase

    def workerEnded(self, worker: WorkerProcess) -> None:
        self.launcher.freeBoardSlot(worker)
        if worker in self.workers:
            self.workers.remove(worker)
            for name in COUNTERS:
                self.departedTotals[name] += worker.stats[name]
        # A worker that received SIGTERM alone and exits cleanly left as
        # asked, not crashed (its replacement comes from replaceSignalled);
        # one that dies while it drains crashed all the same.
        leftAsAsked = worker.signalled and worker.exitedCleanly
        reason = worker.stopReason or ("recycle" if leftAsAsked else "crash")
        # The workers of a failed reload that did not fail themselves left
        # for the reload.
        counted = "reload" if reason == "abandoned" else reason
        if counted in self.restarts:
            self.restarts[counted] += 1
        if self.state is PoolState.STOPPING:
            self.log.info(
                "worker {number} (pid {pid}) exited, {how}",
                number=worker.number,
                pid=worker.pid,
                how=worker.exitDescription,
            )
            self._checkStopped()
            return
        if reason != "crash":
            if worker.replaces is not None and not worker.signalled:
                # (One that left on its own SIGTERM as it started gets a
                # successor of its own: see _replaceSignalled.)
                self._keepServing(worker.replaces)
            replacement = self._replacementOf(worker)
            if replacement is not None:
                replacement.replaces = None  # it takes the place of one gone
            self._departed(worker, reason)
        else:
            # Its crash restarts it: a replacement for its SIGTERM would be a second.
            self._cancelSignalledReplacement(worker)
            self._replaceWhenRunning.pop(worker, None)
            self._crashed(worker)

    def _keepServing(self, old: WorkerProcess) -> None:
        """
        The replacement of C{old} left before it was ready: C{old} serves on
        as an ordinary member, and may be replaced again later.
        """
        # (One sent SIGTERM on its own drains all the same.)
        if old.state is WorkerState.READY and old.stopReason == "recycle" and not old.signalled:
            old.stopReason = None
            self.log.info(
                "worker {number} (pid {pid}) keeps serving: its replacement left",
                number=old.number,
                pid=old.pid,
            )

    def _replacementOf(self, worker: WorkerProcess) -> WorkerProcess | PendingRestart | None:
        """
        The worker, or the pending restart, that is to take over from C{worker}.
        """
        others: list[WorkerProcess | PendingRestart] = [*self.workers, *self._restarts]
        for other in others:
            if other.replaces is worker:
                return other
        return None

    def _departed(self, worker: WorkerProcess, reason: str) -> None:
        self.log.info(
            "worker {number} (pid {pid}) left ({reason}), {how}",
            number=worker.number,
            pid=worker.pid,
            reason=reason,
            how=worker.exitDescription,
        )
        # A recycle request kept for when the pool runs (a signalled worker
        # that has finished draining first) is answered by starting it again.
        kept = self._replaceWhenRunning.pop(worker, None) is not None
        if (reason == "watchdog" or kept) and self._startsAgain(worker):
            # Started again here, not also after its own SIGTERM's grace.
            self._cancelSignalledReplacement(worker)
            self._respawn(worker.number, worker.generation, None)

    def _startsAgain(self, worker: WorkerProcess) -> bool:
        """
        Whether C{worker}, gone, is to be started again under its number: a
        member of the serving generation, or of the one a reload starts.
        """
        return not worker.leavesPool and worker.generation in (
            self.generation,
            self.pendingGeneration,
        )

    def _crashed(self, worker: WorkerProcess) -> None:
        why = worker.failureReason or worker.exitDescription or "unknown"
        lastWords = " | ".join(worker.lastWords)
        self.log.warn(
            "worker {number} (pid {pid}) died: {why}{words}",
            number=worker.number,
            pid=worker.pid,
            why=why,
            words=f"; last words: {lastWords}" if lastWords else "",
        )
        if self.state is PoolState.STARTING:
            self._fatal(f"worker {worker.number} failed to start: {why}")
            return
        if worker.generation == self.pendingGeneration:
            self._abandonReload(f"worker {worker.number} died: {why}")
            return
        replacement = self._replacementOf(worker)
        if replacement is not None:
            replacement.replaces = None  # it is already on its way
            return
        if worker.generation != self.generation:
            return
        self._scheduleRestart(worker)

    def _scheduleRestart(self, worker: WorkerProcess) -> None:
        # A worker that never got ready is young however long its start
        # took: a start hook that fails slowly is still a crash loop.
        lifetime = self.reactor.seconds() - worker.startedAt
        young = worker.readyAt is None or lifetime < self.threshold
        delay = self._restartDelay(young)
        if young:
            self.log.warn(
                "worker {number} died young: restarting it in {delay:.0f}s",
                number=worker.number,
                delay=delay,
            )
        self._addRestart(worker.number, worker.generation, worker.replaces, delay)

    def _restartDelay(self, young: bool) -> float:
        """
        How long to wait before the next restart: at once after a long
        life, otherwise the pool-wide delay, which then doubles.
        """
        now = self.reactor.seconds()
        calm = now - self._lastYoungDeath >= 2 * self.maxRestartDelay
        if not young or calm:
            # Young deaths in a row make a crash loop; after a long life,
            # or long with none, the count starts again.
            self.nextRestartDelay = self.minRestartDelay
        if not young:
            return 0.0
        self._lastYoungDeath = now
        delay = self.nextRestartDelay
        self.nextRestartDelay = min(delay * 2, self.maxRestartDelay)
        return delay

    def _addRestart(
        self, number: int, generation: int, replaces: WorkerProcess | None, delay: float
    ) -> None:
        restart = PendingRestart(number, generation, replaces)
        restart.call = self.reactor.callLater(delay, self._restart, restart)
        self._restarts.append(restart)

    def _cancelRestart(self, restart: PendingRestart) -> None:
        if restart.call is not None and restart.call.active():
            restart.call.cancel()
        if restart in self._restarts:
            self._restarts.remove(restart)

    def _restart(self, restart: PendingRestart) -> None:
        self._restarts.remove(restart)
        # Of the serving generation, or of the one a reload starts (a start
        # that failed for want of descriptors, tried again).
        if self.state is PoolState.STOPPING or restart.generation not in (
            self.generation,
            self.pendingGeneration,
        ):
            return
        self._respawn(restart.number, restart.generation, restart.replaces)

    def _respawn(self, number: int, generation: int, replaces: WorkerProcess | None) -> None:
        """
        Start worker C{number} again; if no process can be started, try
        again later, backing off as for a crash loop.
        """
        try:
            self._spawn(number, generation, replaces)
        except OSError as e:
            self._spawnLater(number, generation, replaces, f"cannot restart worker {number}: {e}")

    def _spawnLater(
        self, number: int, generation: int, replaces: WorkerProcess | None, why: str
    ) -> None:
        """
        No process could be started: try again later, backing off as for a
        crash loop.
        """
        delay = self._restartDelay(young=True)
        self.log.error("{why}; trying again in {delay:.0f}s", why=why, delay=delay)
        self._addRestart(number, generation, replaces, delay)

    # Lifecycle requests.

    def replace(self, worker: WorkerProcess, reason: str, why: str = "") -> None:
        """
        Start a replacement for C{worker}; C{worker} drains once it is ready.
        """
        if worker.state is not WorkerState.READY or worker.stopReason is not None:
            return
        if self._replacementOf(worker) is not None:
            return
        startingGeneration = self.state is PoolState.STARTING or (
            self.state is PoolState.RELOADING and worker.generation == self.pendingGeneration
        )
        if startingGeneration and not worker.signalled:
            # A sibling is still starting: act once the pool runs.  (A
            # start or a reload ends once its generation is all ready at
            # once, which workers recycled as fast as they start never
            # would be; one sent SIGTERM leaves whatever the pool does, and
            # is not ready for it.)
            self._replaceWhenRunning[worker] = (reason, why)
            return
        if self.state not in (PoolState.STARTING, PoolState.RUNNING, PoolState.RELOADING):
            return
        # Replaced now: a request kept for later (see above) is answered.
        self._replaceWhenRunning.pop(worker, None)
        self.log.info(
            "replacing worker {number} (pid {pid}): {why}",
            number=worker.number,
            pid=worker.pid,
            why=why or reason,
        )
        worker.stopReason = reason
        try:
            self._spawn(worker.number, worker.generation, replaces=worker)
        except OSError as e:
            if worker.signalled:
                # It leaves whatever the pool does (SIGTERM): it cannot
                # serve on, so its replacement must come later.
                why = f"cannot replace worker {worker.number}: {e}"
                self._spawnLater(worker.number, worker.generation, worker, why)
                return
            worker.stopReason = None
            self.log.error(
                "cannot replace worker {number}: {why}; it serves on", number=worker.number, why=e
            )

    def replaceSignalled(self, worker: WorkerProcess, why: str) -> None:
        """
        C{worker} received SIGTERM and drains.  Replace it after
        L{SIGNAL_GRACE}, and only if the pool still runs by then: the same
        SIGTERM sent to the whole process group (C{kill -TERM -PGID},
        systemd's default C{KillMode}) stops the parent too, and a stopping
        pool starts no worker.
        """
        if worker in self._signalledReplacements:
            return  # signalled twice: one replacement
        call = self.reactor.callLater(SIGNAL_GRACE, self._replaceSignalled, worker, why)
        self._signalledReplacements[worker] = call

    def _cancelSignalledReplacement(self, worker: WorkerProcess) -> None:
        call = self._signalledReplacements.pop(worker, None)
        if call is not None and call.active():
            call.cancel()

    def _replaceSignalled(self, worker: WorkerProcess, why: str) -> None:
        self._signalledReplacements.pop(worker, None)
        if self.state in (PoolState.STOPPING, PoolState.STOPPED) or worker.leavesPool:
            return
        if worker in self.workers and worker.state is WorkerState.STARTING:
            # Signalled before it was ready: it holds no connection and
            # goes as soon as its start is cut short; look again then.
            self.replaceSignalled(worker, why)
        elif worker in self.workers:
            self.replace(worker, "recycle", why=why)
        elif (
            worker.stopReason is None
            and self._replacementOf(worker) is None
            and self._startsAgain(worker)
        ):
            # It had no connection to finish and is gone already (while the
            # pool starts too: it cannot run without this worker).  One that
            # was to replace a worker still serving hands that on.
            old = worker.replaces if worker.replaces in self.workers else None
            self.log.info("starting worker {number} again: {why}", number=worker.number, why=why)
            self._respawn(worker.number, worker.generation, old)

    def _replaceRemembered(self) -> None:
        remembered, self._replaceWhenRunning = self._replaceWhenRunning, {}
        for worker, (reason, why) in remembered.items():
            self.replace(worker, reason, why)

    def reload(self) -> int | None:
        """
        Start a new generation of workers; drain the old one once all of the
        new are ready.  If the new generation fails, the old keeps serving.

        Asked while the pool starts or reloads, the reload waits its turn
        (code edited again since should not be left unloaded); several
        such requests make one reload.

        @return: the generation that carries this request (started now or
            once its turn comes); C{None} if it is ignored.
        """
        refused = self.reloadRefused()
        if refused is not None:
            self.log.warn("reload ignored: {why}", why=refused)
            return None
        if self.state in (PoolState.STARTING, PoolState.RELOADING):
            if not self._reloadQueued:
                self._reloadQueued = True
                self.log.info(
                    "reload queued: it starts once the pool is no longer {state}",
                    state=self.state.value,
                )
            return self._newestGeneration + 1
        if self.state is not PoolState.RUNNING:
            self.log.warn("reload ignored: the pool is {state}", state=self.state.value)
            return None
        self._reloadQueued = False
        self.transition("reload")
        self._newestGeneration += 1
        self.pendingGeneration = self._newestGeneration
        self.log.info(
            "reloading: starting generation {generation}", generation=self.pendingGeneration
        )
        self._timeoutCall = self.reactor.callLater(
            self.startTimeout,
            self._abandonReload,
            f"not all workers were ready within {self.startTimeout:g}s (--start-timeout)",
        )
        started = self.pendingGeneration
        for number in range(1, self.size + 1):
            try:
                self._spawn(number, self.pendingGeneration)
            except OSError as e:
                self._abandonReload(f"cannot start worker {number}: {e}")
                break
        return started

    def forgetQueuedReload(self) -> None:
        """
        An upgrade (USR2) starts: a reload queued meanwhile would start a
        generation of the old code during the hand-over, for nothing.
        """
        if self._reloadQueued:
            self._reloadQueued = False
            self.reloadDropped = self._newestGeneration + 1
            self.log.info("queued reload dropped: the upgrade starts the new code")

    def _runQueuedReload(self) -> None:
        if self._reloadQueued and self.state is PoolState.RUNNING:
            self.reload()

    def _finishReload(self) -> None:
        self._cancelTimeout()
        self.reloadFailure = None
        old = [w for w in self.workers if w.generation != self.pendingGeneration]
        assert self.pendingGeneration is not None
        self.lastReloadDone = self.pendingGeneration
        self.generation, self.pendingGeneration = self.pendingGeneration, None
        self.transition("generation ready")
        for restart in [r for r in self._restarts if r.generation != self.generation]:
            self._cancelRestart(restart)
        self.log.info(
            "reload: generation {generation} ready; draining {count} old workers",
            generation=self.generation,
            count=len(old),
        )
        for worker in old:
            self._drain(worker, "reload")
        # From then on only the new code answers a new connection (the
        # testing kit's reload() waits for this line).
        generation = self.generation
        defer.gatherResults([w.stoppedAccepting() for w in old]).addCallback(
            lambda _: self.log.info(
                "reload: generation {generation} alone accepts: the old workers stopped accepting",
                generation=generation,
            )
        )
        self._replaceRemembered()

    def _abandonReload(self, why: str) -> None:
        self._cancelTimeout()
        self.log.error(
            "reload failed, keeping the old workers: {why}",
            why=why,
        )
        self.reloadFailure = why
        self.lastReloadDone = self.pendingGeneration
        for worker in self.ofGeneration(self.pendingGeneration):
            self._replaceWhenRunning.pop(worker, None)
            # A ready worker already serves clients: let it finish them.
            if worker.state is WorkerState.STARTING:
                worker.kill("abandoned")
            else:
                self._drain(worker, "abandoned")
        self.pendingGeneration = None
        self.transition("generation failed")

    def reloadRefused(self) -> str | None:
        """
        Why a reload is refused now, or C{None}: not while the pool stops,
        nor while a new parent (USR2) is being started, which imports the
        code anew itself.  (While the pool starts or reloads, it is queued.)
        """
        if self.stopping:
            return f"the pool is {self.shownState}"
        return self.upgrading()

    def scalingRefused(self) -> str | None:
        """
        Why the pool cannot be scaled now, or C{None}: only a running pool
        scales, and not while a new parent (USR2) is being started, which
        was told the size to run and would not hear of a change.
        """
        if self.stopping or self.state is not PoolState.RUNNING:
            return f"the pool is {self.shownState}"
        return self.upgrading()

    def scaleUp(self) -> bool:
        """
        Add one worker; say whether one was added.
        """
        refused = self.scalingRefused()
        if refused is not None:
            self.log.warn("scaling ignored: {why}", why=refused)
            return False
        if self.size >= MAX_WORKERS:
            self.log.warn("scaling ignored: the pool runs at most {most} workers", most=MAX_WORKERS)
            return False
        # Numbers in use, and those of workers that will be started again
        # under their own (hung, or gone after their own SIGTERM).
        taken = {w.number for w in [*self.serving(), *self._leavingUnreplaced()]}
        taken |= {r.number for r in self.pendingRestarts()}
        # And those of signalled workers whose successors are still to come
        # (a replacement gone on its own SIGTERM hands its task on).
        taken |= {w.number for w in self._signalledReplacements if w.generation == self.generation}
        number = next(n for n in range(1, len(taken) + 2) if n not in taken)
        self.log.info("scaling up to {size} workers", size=self.size + 1)
        try:
            self._spawn(number, self.generation)
        except OSError as e:
            self.log.error("cannot scale up: {why}", why=e)
            return False
        self.size += 1
        return True

    def scaleTo(self, size: int) -> None:
        """
        Add or drain workers until the pool has C{size}.
        """
        while self.size < size and self.state is PoolState.RUNNING and self.scaleUp():
            pass
        while self.size > max(1, size) and self.state is PoolState.RUNNING and self.scaleDown():
            pass

    def scaleDown(self) -> bool:
        """
        Take one member out of the pool, the one that costs least: a pending
        restart, else a worker leaving anyway, else a worker still starting,
        else the highest-numbered worker, drained.  Say whether one was
        taken out.
        """
        refused = self.scalingRefused()
        if refused is not None:
            self.log.warn("scaling ignored: {why}", why=refused)
            return False
        if self.size <= 1:
            self.log.warn("not scaling down: the pool keeps at least one worker")
            return False
        return self._dropPendingRestart() or self._dropLeaving() or self._drainOne()

    def _dropPendingRestart(self) -> bool:
        restarts = [r for r in self.pendingRestarts() if r.replaces is None]
        if not restarts:
            return False
        restart = max(restarts, key=lambda r: r.number)
        self._cancelRestart(restart)
        self.size -= 1
        self.log.info(
            "scaling down to {size} workers: worker {number} is not restarted",
            size=self.size,
            number=restart.number,
        )
        return True

    def _dropLeaving(self) -> bool:
        """
        Take out a worker already on its way out (the watchdog's stack dump,
        its own SIGTERM's grace): draining a healthy worker as well would
        leave the pool a worker short until the next start.
        """
        leaving = self._leavingUnreplaced()
        if not leaving:
            return False
        worker = max(leaving, key=lambda w: w.number)
        worker.leavesPool = True
        # Not a member any more: not to be drained or replaced again.
        worker.stopReason = worker.stopReason or "scale"
        self._cancelSignalledReplacement(worker)
        # A signalled worker drains itself; give it the deadline every
        # drained worker gets.
        self._drain(worker, "scale")
        self.size -= 1
        self.log.info(
            "scaling down to {size} workers: worker {number}, leaving already, is not replaced",
            size=self.size,
            number=worker.number,
        )
        return True

    def _drainOne(self) -> bool:
        """
        Drain the highest-numbered worker, preferring one being replaced
        already (recycled, or sent SIGTERM on its own), which leaves anyway:
        its replacement is stopped rather than a healthy worker drained too;
        then one still starting (a restart, a replacement whose worker has
        left), which holds no connection.  A replacement is never the one:
        the worker it replaces is.
        """
        candidates = [
            w
            for w in self.ofGeneration(self.generation)
            if w.state in (WorkerState.STARTING, WorkerState.READY)
            and w.replaces is None
            and (w.stopReason is None or self._replacementOf(w) is not None)
        ]
        if not candidates:
            self.log.warn("not scaling down: no worker to drain")
            return False
        victim = max(
            candidates,
            key=lambda w: (
                self._replacementOf(w) is not None,
                w.state is WorkerState.STARTING,  # no connection yet
                w.number,
            ),
        )
        self.size -= 1
        self.log.info(
            "scaling down to {size} workers: draining worker {number}",
            size=self.size,
            number=victim.number,
        )
        replacement = self._replacementOf(victim)
        victim.stopReason = "scale"
        self._drain(victim, "scale")
        if isinstance(replacement, PendingRestart):
            self._cancelRestart(replacement)
        elif replacement is not None:
            replacement.replaces = None
            self._drain(replacement, "scale")
        return True

    def _leavingUnreplaced(self) -> list[WorkerProcess]:
        """
        Workers of this generation that are to be replaced once they are
        gone but have no replacement yet: hung, or signalled on their own
        (whose replacement waits for L{SIGNAL_GRACE}, and who may have left
        already).
        """
        hung = [w for w in self.ofGeneration(self.generation) if w.stopReason == "watchdog"]
        signalled = [
            w
            for w in self._signalledReplacements
            if w.generation == self.generation and w.stopReason is None
        ]
        return [
            w
            for w in [*hung, *signalled]
            if not w.leavesPool and w.replaces is None and self._replacementOf(w) is None
        ]

    # Failing.

    def _cancelTimeout(self) -> None:
        if self._timeoutCall is not None and self._timeoutCall.active():
            self._timeoutCall.cancel()
        self._timeoutCall = None

    def _startTimedOut(self) -> None:
        if self.state is PoolState.STARTING:
            ready = sum(1 for w in self.serving() if w.state is WorkerState.READY)
            which = "no worker" if ready == 0 else f"only {ready} of {self.size} workers"
            self._fatal(f"{which} became ready within {self.startTimeout:g}s (--start-timeout)")

    def _fatal(self, message: str) -> None:
        self._cancelTimeout()
        self.transition("stop")
        # Not "message": legacy observers treat that key as their own.
        self.log.critical("{reason}", reason=message)
        self.onFatal(message)
