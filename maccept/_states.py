# -*- test-case-name: tests.test_pool,tests.test_pool_supervision -*-
"""
The states of a worker and of the pool, and every transition between them,
in one place.  The README's tables are these tables.

An event not listed for a state leaves that state unchanged: a worker that
is already draining ignores a second request to drain.
"""

from __future__ import annotations

from enum import Enum


class WorkerState(Enum):
    STARTING = "starting"  # spawned; adopting sockets, running start hooks
    READY = "ready"  # accepting and serving
    DRAINING = "draining"  # no longer accepting; finishing open connections
    STOPPED = "stopped"  # the process has exited


class PoolState(Enum):
    STARTING = "starting"  # the first workers are not all ready yet
    RUNNING = "running"
    RELOADING = "reloading"  # a new generation is starting beside the old
    STOPPING = "stopping"  # every worker drains; the parent exits after
    STOPPED = "stopped"


WORKER_TRANSITIONS: dict[tuple[WorkerState, str], WorkerState] = {
    (WorkerState.STARTING, "ready"): WorkerState.READY,
    (WorkerState.STARTING, "drain"): WorkerState.DRAINING,
    (WorkerState.STARTING, "exit"): WorkerState.STOPPED,
    (WorkerState.READY, "drain"): WorkerState.DRAINING,
    (WorkerState.READY, "exit"): WorkerState.STOPPED,
    (WorkerState.DRAINING, "exit"): WorkerState.STOPPED,
}

POOL_TRANSITIONS: dict[tuple[PoolState, str], PoolState] = {
    (PoolState.STARTING, "all ready"): PoolState.RUNNING,
    (PoolState.STARTING, "stop"): PoolState.STOPPING,
    (PoolState.RUNNING, "reload"): PoolState.RELOADING,
    (PoolState.RUNNING, "stop"): PoolState.STOPPING,
    (PoolState.RELOADING, "generation ready"): PoolState.RUNNING,
    (PoolState.RELOADING, "generation failed"): PoolState.RUNNING,
    (PoolState.RELOADING, "stop"): PoolState.STOPPING,
    (PoolState.STOPPING, "all exited"): PoolState.STOPPED,
}


def nextWorkerState(state: WorkerState, event: str) -> WorkerState:
    return WORKER_TRANSITIONS.get((state, event), state)


def nextPoolState(state: PoolState, event: str) -> PoolState:
    return POOL_TRANSITIONS.get((state, event), state)
