# -*- test-case-name: tests.test_metrics -*-
"""
The pool's metrics in the Prometheus text format, aggregated over all
workers in the parent: no files on disk, no directory that grows as
workers come and go.

Workers report their counters over the control channel; a collector reads
the pool's view of them at scrape time.
"""

from __future__ import annotations

import os
import socket
import struct
from collections.abc import Iterator
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry

from maccept._listening import ListeningSocket
from maccept._pool import WorkerPool
from maccept._procfs import cpuSeconds, residentBytes
from maccept._states import WorkerState

#: struct tcp_info up to tcpi_sacked: for a listening socket the kernel puts
#: the accept queue's length in tcpi_unacked and its limit in tcpi_sacked.
_TCP_INFO = struct.Struct("=8B6I")


def listenQueue(listener: ListeningSocket) -> tuple[int, int] | None:
    """
    C{(waiting, limit)}: connections the kernel has completed that no worker
    has accepted yet, and the backlog limit; C{None} where the kernel does
    not say (UNIX sockets) or the socket is closed.
    """
    if listener.family not in ("AF_INET", "AF_INET6"):
        return None
    try:
        sock = socket.socket(fileno=os.dup(listener.fileno()))
    except (OSError, AttributeError, TypeError):
        return None
    try:
        raw = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCP_INFO.size)
    except OSError:
        return None
    finally:
        sock.close()
    fields = _TCP_INFO.unpack(raw[: _TCP_INFO.size])
    return fields[8 + 4], fields[8 + 5]


#: The pool's counters summed over every worker there ever was (L{COUNTERS},
#: but the two accept pauses, which are one metric by reason): the worker's
#: name for each, and how C{/metrics} shows it.
_COUNTERS = [
    (
        "accepted",
        "maccept_connections_accepted",
        "Connections accepted by all workers, past and present.",
    ),
    (
        "bytesReceived",
        "maccept_bytes_received",
        "Bytes received from clients by all workers, past and present.",
    ),
    (
        "bytesSent",
        "maccept_bytes_sent",
        "Bytes sent to clients by all workers, past and present.",
    ),
    (
        "idleClosed",
        "maccept_connections_idle_closed",
        "Connections closed after --idle-timeout seconds of silence.",
    ),
    (
        "proxyRejected",
        "maccept_proxy_headers_rejected",
        "Connections dropped for a malformed PROXY protocol header.",
    ),
    (
        "handshakesFailed",
        "maccept_tls_handshakes_failed",
        "Connections dropped for a failed TLS handshake.",
    ),
    (
        "shed",
        "maccept_connections_shed",
        "Connections closed at once because the worker was out of file descriptors.",
    ),
    (
        "resets",
        "maccept_connections_reset",
        "Connections the client reset, or dropped while the server still wrote to them.",
    ),
    (
        "emptyWakeups",
        "maccept_accept_empty_wakeups",
        "Times a worker woke to accept and found no connection waiting: another "
        "worker took it (every worker's epoll wakes for each new connection).",
    ),
    (
        "acceptBatches",
        "maccept_accept_batches",
        "Times a worker accepted connections in one go (a wake-up, or a draining "
        "worker's last sweep): connections accepted over this is the mean accept batch.",
    ),
]


class PoolCollector(Collector):
    """
    Everything C{/metrics} shows, read from the pool at scrape time.
    """

    def __init__(self, pool: WorkerPool) -> None:
        self.pool = pool

    def collect(self) -> Iterator[Metric]:
        pool = self.pool
        workers = GaugeMetricFamily(
            "maccept_workers", "Worker processes by state.", labels=["state"]
        )
        for state in WorkerState:
            if state is not WorkerState.STOPPED:
                count = sum(1 for w in pool.workers if w.shownState is state)
                workers.add_metric([state.value], count)
        yield workers

        totals = pool.totals()
        for name, metric, documentation in _COUNTERS:
            yield CounterMetricFamily(metric, documentation, value=totals[name])
        yield GaugeMetricFamily(
            "maccept_connections_open",
            "Connections open now, over all workers.",
            value=sum(w.stats["open"] for w in pool.workers),
        )
        pauses = CounterMetricFamily(
            "maccept_accept_pauses",
            "Times a worker stopped reading the listeners: ahead of the others' mean "
            "(--balance even) or at --max-concurrent.",
            labels=["reason"],
        )
        pauses.add_metric(["balance"], totals["acceptPausesAhead"])
        pauses.add_metric(["max_concurrent"], totals["acceptPausesFull"])
        yield pauses
        restarts = CounterMetricFamily(
            "maccept_worker_restarts",
            "Workers that left the pool, by reason.",
            labels=["reason"],
        )
        for reason, count in sorted(pool.restarts.items()):
            restarts.add_metric([reason], count)
        yield restarts
        yield from self._perWorker()
        yield from self._listenQueues()

    def _perWorker(self) -> Iterator[Metric]:
        labels = ["worker", "pid"]
        memory = GaugeMetricFamily(
            "maccept_worker_resident_memory_bytes", "Resident memory of each worker.", labels=labels
        )
        cpu = CounterMetricFamily(
            "maccept_worker_cpu_seconds", "CPU time (user + system) of each worker.", labels=labels
        )
        lag = GaugeMetricFamily(
            "maccept_worker_reactor_lag_seconds",
            "How late each worker's reactor runs: its worst timed call over the last heartbeat,"
            " or how overdue its next heartbeat is (a blocked reactor).",
            labels=labels,
        )
        now = self.pool.reactor.seconds()
        for worker in self.pool.workers:
            if worker.pid is None:
                continue
            key = [str(worker.number), str(worker.pid)]
            rss, seconds = residentBytes(worker.pid), cpuSeconds(worker.pid)
            if rss is not None:
                memory.add_metric(key, rss)
            if seconds is not None:
                cpu.add_metric(key, seconds)
            lag.add_metric(key, max(worker.stats["lag"], self.pool.watchdog.overdue(worker, now)))
        yield from (memory, cpu, lag)

    def _listenQueues(self) -> Iterator[Metric]:
        waiting = GaugeMetricFamily(
            "maccept_listen_backlog",
            "Connections the kernel completed that no worker has accepted yet.",
            labels=["listen"],
        )
        limit = GaugeMetricFamily(
            "maccept_listen_backlog_limit", "The listen backlog limit.", labels=["listen"]
        )
        for listener in self.pool.listeners:
            queue = listenQueue(listener)
            if queue is not None:
                # By address: two descriptions can be the same (tcp:0 twice).
                waiting.add_metric([listener.address], queue[0])
                limit.add_metric([listener.address], queue[1])
        yield from (waiting, limit)


def registryFor(pool: WorkerPool) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(PoolCollector(pool))
    return registry


def exposition(registry: Any) -> bytes:
    """
    The registry's metrics in the Prometheus text format.
    """
    from prometheus_client import generate_latest

    return generate_latest(registry)
