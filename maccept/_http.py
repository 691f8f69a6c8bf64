# -*- test-case-name: tests.test_metrics -*-
"""
The parent's HTTP endpoint (C{--metrics}): C{/metrics} for Prometheus and
C{/healthz} for load balancers.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.web.resource import Resource
from twisted.web.server import Site

from maccept import _httpchannel
from maccept._httpchannel import SmallRequestsChannel
from maccept._metrics import exposition, registryFor
from maccept._pool import WorkerPool
from maccept._states import WorkerState
from maccept._tally import Tally

_log = Logger(namespace="maccept")


def healthy(pool: WorkerPool) -> bool:
    """
    Whether a load balancer should send this host traffic: at least one
    worker accepts, and the pool is not stopping, nor about to
    (C{--stop-delay}); or a new parent (USR2) serves in its place, which
    an old parent draining may still be asked, by a check it took just
    before the hand-over.
    """
    if pool.handedOver:
        return True
    if pool.stopping:
        return False
    return any(w.shownState is WorkerState.READY for w in pool.workers)


class _Page(Resource):
    """
    A page that answers HEAD as GET does, without the body (Twisted's
    default renders GET and logs a warning per HEAD that it dropped one).
    """

    isLeaf = True

    def render_HEAD(self, request: Any) -> bytes:
        body: bytes = self.render_GET(request)  # type: ignore[attr-defined]
        request.setHeader(b"content-length", b"%d" % len(body))
        return b""


class MetricsResource(_Page):
    def __init__(self, pool: WorkerPool) -> None:
        super().__init__()
        self.registry = registryFor(pool)

    def render_GET(self, request: Any) -> bytes:
        request.setHeader(b"content-type", CONTENT_TYPE_LATEST.encode("ascii"))
        return exposition(self.registry)


class HealthResource(_Page):
    def __init__(self, pool: WorkerPool) -> None:
        super().__init__()
        self.pool = pool

    def render_GET(self, request: Any) -> bytes:
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        if healthy(self.pool):
            return b"ok\n"
        request.setResponseCode(503)
        return f"unavailable: pool is {self.pool.shownState}\n".encode()


class QuietSite(Site):
    """
    The parent's site: no access log line (Prometheus scrapes and load
    balancers' checks come every few seconds, and would bury the log's lines
    about workers), and a bound on what idle clients can hold: each of its
    connections costs the parent a descriptor, which it needs to start
    workers.  Twisted's default idle timeout is 12 hours.  Its channel
    takes no request body, wants a whole request head within 10 s, and
    drops a client that pipelines requests and reads no answer
    (L{SmallRequestsChannel}).

    @ivar maxConnections: connections open at once; more are closed at
        once, and logged (L{Tally}).
    """

    maxConnections = 64
    idleTimeout = 10
    protocol = SmallRequestsChannel  # type: ignore[assignment]

    def __init__(self, resource: Resource) -> None:
        super().__init__(resource, timeout=self.idleTimeout)
        self.openConnections = 0
        self.refused = Tally(
            _log,
            "refused {count} connection(s) to the metrics port, the last from {peer}: "
            "{limit} open already",
        )

    def log(self, request: Any) -> None:
        pass

    def buildProtocol(self, addr: Any) -> Any:
        if self.openConnections >= self.maxConnections:
            self.refused.add(peer=addr, limit=self.maxConnections)
            # Not None: a TLS wrapper around the site would wrap the None.
            return _Refused()
        channel = super().buildProtocol(addr)
        self.openConnections += 1
        lost = channel.connectionLost

        def connectionLost(reason: Any) -> None:
            self.openConnections -= 1
            lost(reason)

        channel.connectionLost = connectionLost
        return channel


class _Refused(Protocol):
    """
    A connection past L{QuietSite.maxConnections}: closed at once.
    """

    def connectionMade(self) -> None:
        self.transport.abortConnection()  # type: ignore[union-attr]


class TurnedAwayCollector(Collector):
    """
    The clients the metrics port itself turned away, counted as the
    workers count theirs: over its connection limit, or dropped for what
    they sent (a body, a head that never ends, answers left unread).
    """

    def __init__(self, site: QuietSite) -> None:
        self.site = site

    def collect(self) -> Iterator[Metric]:
        turnedAway = CounterMetricFamily(
            "maccept_metrics_port_dropped",
            "Clients of the metrics port turned away: over its connection limit, "
            "or for what they sent.",
            labels=["reason"],
        )
        turnedAway.add_metric(["over_limit"], self.site.refused.total)
        turnedAway.add_metric(["bad_request"], _httpchannel.dropped.total)
        yield turnedAway


def metricsSite(pool: WorkerPool) -> Site:
    root = Resource()
    metrics = MetricsResource(pool)
    root.putChild(b"metrics", metrics)
    root.putChild(b"healthz", HealthResource(pool))
    site = QuietSite(root)
    site.noisy = False
    site.displayTracebacks = False
    metrics.registry.register(TurnedAwayCollector(site))
    return site
