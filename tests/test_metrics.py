"""
What C{/metrics} and C{/healthz} say about a pool, driven by a fake reactor:
totals that survive departed workers, states, restarts by reason, health,
and the kernel's accept queue read from a real listening socket.
"""

from __future__ import annotations

import shutil
import socket
import tempfile
from pathlib import Path
from typing import Any

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import defer, reactor
from twisted.internet.endpoints import serverFromString
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock, deferLater
from twisted.internet.testing import StringTransport
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.resource import Resource

from maccept import _httpchannel
from maccept._http import QuietSite, TurnedAwayCollector, healthy
from maccept._metrics import listenQueue, registryFor
from maccept._pool import WorkerPool
from maccept._tally import Tally
from maccept._wire import COUNTERS
from tests.test_pool import PoolTestCase
from tests.test_tls import selfSignedCertificate

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(pool: WorkerPool) -> Samples:
    text = generate_latest(registryFor(pool)).decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


class CollectorTests(PoolTestCase):
    def test_totalsSurviveDeparture(self) -> None:
        """
        Counters add the live workers' last reports to what departed workers
        reported, so a worker that exits takes nothing away.
        """
        pool = self.readyPool(2)
        first, second = pool.workers
        first.stats.update(accepted=5, bytesReceived=100, bytesSent=90, open=1)
        second.stats.update(accepted=3, bytesReceived=30, bytesSent=30, open=2)
        before = scrape(pool)
        self.assertEqual(before[("maccept_connections_accepted_total", ())], 8)
        self.assertEqual(before[("maccept_connections_open", ())], 3)
        self.process(first).end(1)
        after = scrape(pool)
        self.assertEqual(after[("maccept_connections_accepted_total", ())], 8)
        self.assertEqual(after[("maccept_bytes_received_total", ())], 130)
        self.assertEqual(after[("maccept_bytes_sent_total", ())], 120)
        self.assertEqual(after[("maccept_worker_restarts_total", (("reason", "crash"),))], 1)

    def test_acceptPausesByReason(self) -> None:
        """
        The governor's pauses are counted by reason, departed workers' too;
        a report from a worker of older code that lacks them changes nothing.
        """
        pool = self.readyPool(2)
        first, second = pool.workers
        first.heartbeat(acceptPausesAhead=7, acceptPausesFull=1)
        second.heartbeat(acceptPausesAhead=2, acceptPausesFull=None, handshakesFailed=None)
        self.process(first).end(1)
        samples = scrape(pool)
        self.assertEqual(samples[("maccept_accept_pauses_total", (("reason", "balance"),))], 9)
        self.assertEqual(
            samples[("maccept_accept_pauses_total", (("reason", "max_concurrent"),))], 1
        )
        self.assertEqual(samples[("maccept_tls_handshakes_failed_total", ())], 0)

    def test_emptyWakeups(self) -> None:
        """
        Wake-ups that found nothing to accept are summed over workers,
        departed ones too; a worker of older code that lacks them changes
        nothing.
        """
        pool = self.readyPool(3)
        first, second, third = pool.workers
        first.heartbeat(emptyWakeups=40)
        second.heartbeat(emptyWakeups=2)
        third.heartbeat(emptyWakeups=None)
        self.process(first).end(1)
        self.assertEqual(scrape(pool)[("maccept_accept_empty_wakeups_total", ())], 42)

    def test_acceptBatches(self) -> None:
        """
        Wake-ups that accepted are summed over workers, departed ones too.
        """
        pool = self.readyPool(3)
        first, second, third = pool.workers
        first.heartbeat(acceptBatches=30)
        second.heartbeat(acceptBatches=12)
        third.heartbeat(acceptBatches=None)
        self.process(first).end(1)
        self.assertEqual(scrape(pool)[("maccept_accept_batches_total", ())], 42)

    def test_everyCounterShown(self) -> None:
        """
        Every counter a worker reports (L{COUNTERS}) reaches C{/metrics}:
        one added to the heartbeat cannot be left out of it unseen.
        """
        pool = self.readyPool(1)
        [worker] = pool.workers
        values = {name: 1000 + index for index, name in enumerate(COUNTERS)}
        worker.heartbeat(**values)
        shown = set(scrape(pool).values())
        self.assertEqual({n for n, v in values.items() if v not in shown}, set())

    def test_signalledWorkerShownDraining(self) -> None:
        """
        A worker that received SIGTERM on its own stopped accepting: the
        metrics, the status and the health check say it drains, though it
        stays ready to the pool until its replacement is.
        """
        from maccept._control import controlFactory

        pool = self.readyPool(1)
        [worker] = pool.workers
        worker.askedToBeReplaced("it received SIGTERM", signalled=True)
        samples = scrape(pool)
        self.assertEqual(samples[("maccept_workers", (("state", "ready"),))], 0)
        self.assertEqual(samples[("maccept_workers", (("state", "draining"),))], 1)
        control = controlFactory(pool, lambda: True).buildProtocol(None)
        assert control is not None
        self.assertEqual([w["state"] for w in control.status()["workers"]], ["draining"])
        self.assertFalse(healthy(pool))

    def test_resets(self) -> None:
        """
        Connections clients reset are summed over workers, departed ones
        too; a worker of older code that lacks the count changes nothing.
        """
        pool = self.readyPool(2)
        first, second = pool.workers
        first.heartbeat(resets=5)
        second.heartbeat(resets=None)
        self.process(first).end(1)
        second.heartbeat(resets=3)
        self.assertEqual(scrape(pool)[("maccept_connections_reset_total", ())], 8)

    def test_workersByState(self) -> None:
        """
        C{maccept_workers} counts workers in every state but stopped.
        """
        pool = self.startPool(3)
        pool.workers[0].ready()
        samples = scrape(pool)
        self.assertEqual(samples[("maccept_workers", (("state", "ready"),))], 1)
        self.assertEqual(samples[("maccept_workers", (("state", "starting"),))], 2)
        self.assertNotIn(("maccept_workers", (("state", "stopped"),)), samples)

    def test_everyRestartReason(self) -> None:
        """
        Every restart reason is exported, at zero until it happens.
        """
        samples = scrape(self.readyPool(1))
        for reason in ("crash", "recycle", "watchdog", "reload", "scale"):
            self.assertEqual(samples[("maccept_worker_restarts_total", (("reason", reason),))], 0)

    def test_abandonedReloadCounted(self) -> None:
        """
        The workers of a failed reload all leave counted: the one that died
        as a crash, the others, stopped with their generation, as reload.
        """
        pool = self.readyPool(3)
        pool.reload()
        first, second, third = pool.ofGeneration(2)
        first.ready()
        self.process(third).end(1)
        for worker in (first, second):
            self.process(worker).end(0)
        samples = scrape(pool)
        restarts = {
            reason: samples[("maccept_worker_restarts_total", (("reason", reason),))]
            for reason in ("crash", "reload")
        }
        self.assertEqual(restarts, {"crash": 1, "reload": 2})

    def test_lagShowsABlockedReactor(self) -> None:
        """
        A worker whose reactor is blocked sends no heartbeat to report its
        lag: the gauge shows how overdue the heartbeat is, and the worker's
        own report again once it comes.
        """
        pool = self.readyPool(1)
        [worker] = pool.workers
        self.patch(worker, "pid", 1)  # a process /proc knows

        def lag() -> float:
            labels = (("pid", "1"), ("worker", "1"))
            return scrape(pool)[("maccept_worker_reactor_lag_seconds", labels)]

        worker.heartbeat(lag=0.002)
        self.assertEqual(lag(), 0.002)
        self.reactor.advance(1.5)  # a report a little late is not lag yet
        self.assertEqual(lag(), 0.002)
        worker.heartbeat(lag=0.002)
        for _ in range(5):
            self.reactor.advance(1.0)
        self.assertEqual(lag(), 4.0)
        worker.heartbeat(lag=5.001)
        self.assertEqual(lag(), 5.001)
        self.reactor.advance(1.0)
        worker.heartbeat(lag=0.003)
        self.assertEqual(lag(), 0.003)


class HealthTests(PoolTestCase):
    def test_healthyAfterHandOver(self) -> None:
        """
        An old parent that handed over to a new one (USR2) and drains
        answers a check it took just before as healthy: the new parent
        serves the same sockets.
        """
        pool = self.readyPool(1)
        pool.handOver()
        pool.stopService()
        self.assertTrue(healthy(pool))

    def test_healthyOnceAWorkerIsReady(self) -> None:
        """
        Healthy from the first ready worker on, not before.
        """
        pool = self.startPool(2)
        self.assertFalse(healthy(pool))
        pool.workers[0].ready()
        self.assertTrue(healthy(pool))

    def test_unhealthyWhileStopping(self) -> None:
        """
        Unhealthy as soon as the pool stops, even with workers still ready
        and draining, so a load balancer moves traffic away first.
        """
        pool = self.readyPool(2)
        pool.stopService()
        self.assertFalse(healthy(pool))


class ListenQueueTests(SynchronousTestCase):
    def test_waitingConnections(self) -> None:
        """
        The kernel's count of connections waiting to be accepted, and the
        backlog limit, for a real listening socket.
        """
        listener = socket.socket()
        self.addCleanup(listener.close)
        listener.bind(("127.0.0.1", 0))
        listener.listen(17)
        clients = [socket.create_connection(listener.getsockname()) for _ in range(3)]
        for client in clients:
            self.addCleanup(client.close)

        class Listening:
            family = "AF_INET"

            def fileno(self) -> int:
                return listener.fileno()

        self.assertEqual(listenQueue(Listening()), (3, 17))  # type: ignore[arg-type]

    def test_unixHasNone(self) -> None:
        """
        UNIX sockets report no queue.
        """

        class Listening:
            family = "AF_UNIX"

        self.assertIsNone(listenQueue(Listening()))  # type: ignore[arg-type]


class QuietSiteTests(SynchronousTestCase):
    def test_boundedConnections(self) -> None:
        """
        The metrics site holds at most C{maxConnections} connections (each
        costs the parent a descriptor it needs for workers): more are
        refused until one closes; idle ones time out in seconds.
        """
        site = QuietSite(Resource())
        site.maxConnections = 2
        channels = [site.buildProtocol(None) for _ in range(2)]
        refused, transport = site.buildProtocol(None), StringTransport()
        refused.makeConnection(transport)
        self.assertTrue(transport.disconnecting)
        self.assertEqual(site.openConnections, 2)
        channels[0].callLater = Clock().callLater  # its idle timer, off the real reactor
        channels[0].makeConnection(StringTransport())
        channels[0].connectionLost(Failure(ConnectionDone()))
        self.assertEqual(site.openConnections, 1)
        site.buildProtocol(None)
        self.assertEqual(site.openConnections, 2)
        self.assertEqual(site.timeOut, QuietSite.idleTimeout)

    def test_turnedAwayCounted(self) -> None:
        """
        The clients the metrics port turned away are counted, by reason:
        over its connection limit, or dropped for what they sent.
        """
        site = QuietSite(Resource())
        site.maxConnections = 0
        collector = TurnedAwayCollector(site)
        self.patch(_httpchannel, "dropped", Tally(Logger(), "{count} dropped"))
        site.buildProtocol(None).makeConnection(StringTransport())
        _httpchannel.dropped.add()
        [family] = collector.collect()
        counts = {s.labels["reason"]: s.value for s in family.samples}
        self.assertEqual(counts, {"over_limit": 1, "bad_request": 1})
        self.assertEqual(family.name, "maccept_metrics_port_dropped")


class QuietSiteOverTLSTests(TestCase):
    @defer.inlineCallbacks
    def test_refusedOverTLS(self) -> Any:
        """
        Behind TLS (C{--metrics ssl:...}) a connection past the limit is
        closed at once too: the refusal is a protocol that aborts, which a
        TLS wrapper wraps (it would wrap a None and fail).
        """
        directory = Path(tempfile.mkdtemp(prefix="maccept-quiet-tls-"))
        self.addCleanup(shutil.rmtree, directory, True)
        key, certificate = selfSignedCertificate(directory)
        site = QuietSite(Resource())
        site.maxConnections = 1
        description = f"ssl:0:interface=127.0.0.1:privateKey={key}:certKey={certificate}"
        port = yield serverFromString(reactor, description).listen(site)
        self.addCleanup(port.stopListening)
        address = ("127.0.0.1", port.getHost().port)
        held, refused = (socket.create_connection(address, timeout=10) for _ in range(2))
        refused.setblocking(False)

        def closedByServer() -> bool:
            try:
                return refused.recv(10) == b""
            except BlockingIOError:
                return False
            except OSError:
                return True

        for _ in range(400):
            if closedByServer():
                break
            yield deferLater(reactor, 0.01, lambda: None)
        self.assertTrue(closedByServer())
        self.assertEqual(self.flushLoggedErrors(), [])
        held.close()
        refused.close()
        while site.openConnections:
            yield deferLater(reactor, 0.01, lambda: None)
