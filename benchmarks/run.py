"""
Measure maccept against the other ways to serve one socket from many processes.

One command runs every competitor (see servers.py) at every worker count
through every workload, with servers and client pinned to their own CPUs,
and writes results.json, results.md and throughput_vs_workers.png::

    # 2-core development machine (about 2-3 minutes)
    .venv/bin/python benchmarks/run.py --quick --out benchmarks/results/dev-2core

    # 16-core machine, full sweep (about 6 minutes)
    .venv/bin/python benchmarks/run.py --server-cpus 0-7 --client-cpus 8-15 \\
        --workers 1,2,4,8 --duration 3 --warmup 1 --out benchmarks/results/16core

See benchmarks/README.rst for what each number means.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import _loadgen
import _procfs
import _profile
import _report
import _system
import servers

#: maccept's log line once a reload's new generation accepts.
RELOADED = re.compile(r"generation \d+ ready")
#: The most seconds a reload's new generation has to serve, and its old one to go.
RELOAD_LIMIT = 60.0


@dataclass(frozen=True)
class Workload:
    """
    One kind of load: a load generator mode and message size.
    """

    name: str
    mode: str
    size: int


WORKLOADS = {
    w.name: w
    for w in (
        Workload("rr-1k", "rr", 1024),
        Workload("rr-16k", "rr", 16 * 1024),
        Workload("rr-256k", "rr", 256 * 1024),
        Workload("churn", "churn", 64),
        Workload("burst", "burst", 0),
    )
}

#: What --quick means: the 2-core development machine, about 2-3 minutes.
QUICK = {"workers": "1,2", "duration": 2.0, "warmup": 0.5, "startup_runs": 3}
FULL = {"workers": "1,2,4,8", "duration": 3.0, "warmup": 1.0, "startup_runs": 5}


@dataclass(frozen=True)
class Settings:
    """
    Everything a run was asked to do, as recorded in results.json.
    """

    servers: tuple[str, ...]
    workers: tuple[int, ...]
    workloads: tuple[str, ...]
    duration: float
    warmup: float
    connections: int
    burst_connections: int
    threads: int
    sources: int
    burst_wait: float
    startup_workers: int
    startup_runs: int
    startup_servers: tuple[str, ...]
    idle_wait: float
    backlog: int
    prime: float
    reload_load: float
    #: Times the whole sweep is run; each cell reports its median run.
    rounds: int = 1
    #: The py-spy that profiles maccept's workers in each timed run, if any.
    profile: str | None = None
    #: Why --profile was asked for and could not be done.
    profile_unavailable: str | None = None


def parseArguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add = parser.add_argument
    add("--out", type=Path, required=True, help="directory for results.json/.md/.png")
    add("--quick", action="store_true", help=f"preset for a 2-core machine: {QUICK}")
    add("--server-cpus", help="CPU list for the servers, e.g. 0-7 (default: first half)")
    add("--client-cpus", help="CPU list for the load generator (default: second half)")
    add("--workers", help=f"worker counts, comma-separated (default {FULL['workers']})")
    add(
        "--servers",
        default=",".join(servers.DEFAULT_KINDS),
        help=f"competitors, comma-separated, from {', '.join(servers.KINDS)}",
    )
    add("--workloads", default=",".join(WORKLOADS), help="workloads, comma-separated")
    add("--duration", type=float, help="measured seconds per run (default 3)")
    add("--warmup", type=float, help="unmeasured seconds before each run (default 1)")
    add("--connections", type=int, default=256, help="request/response and churn connections")
    add("--burst-connections", type=int, default=256, help="connections in the burst")
    add("--threads", type=int, help="client threads (default: one per client CPU)")
    add("--sources", type=int, default=64, help="churn: client source addresses 127.0.0.2..")
    add(
        "--burst-wait",
        type=float,
        default=5.0,
        help="the burst is served within this + 5 s, and counted within this",
    )
    add("--startup-workers", type=int, default=4, help="workers for start-up and idle memory")
    add("--startup-runs", type=int, help="start-ups to take the median of (default 5)")
    add("--startup-servers", default="maccept,recipe", help="servers timed at start-up")
    add("--idle-wait", type=float, default=1.0, help="seconds idle before reading memory")
    add("--backlog", type=int, default=servers.BACKLOG, help="accept queue of every server")
    add("--prime", type=float, default=1.0, help="unmeasured seconds of load on a new server")
    add(
        "--reload-load",
        type=float,
        default=5.0,
        help="least seconds of churn around a reload (it lasts until the old workers are gone)",
    )
    add(
        "--rounds",
        type=int,
        default=1,
        help="run the whole sweep this many times, one after the other; report each cell's median",
    )
    add(
        "--profile",
        nargs="?",
        const="py-spy",
        metavar="PY_SPY",
        help="sample maccept's workers with py-spy in each timed run (default: py-spy on PATH)",
    )
    add("--render", action="store_true", help="only rewrite OUT's .md and .png from its .json")
    return parser.parse_args(argv)


def _names(text: str, known: tuple[str, ...] | list[str], what: str) -> tuple[str, ...]:
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    unknown = [n for n in names if n not in known]
    if unknown:
        raise SystemExit(f"unknown {what}: {', '.join(unknown)} (known: {', '.join(known)})")
    return names


def makeSettings(args: argparse.Namespace, pinning: _system.Pinning) -> Settings:
    """
    Resolve presets and defaults; arguments given explicitly always win.
    """
    preset = QUICK if args.quick else FULL

    def pick(name: str) -> Any:
        value = getattr(args, name)
        return preset[name] if value is None else value

    profiler = unavailable = None
    if args.profile:
        profiler = _profile.findPySpy(args.profile)
        unavailable = _profile.cannotProfile(profiler)
        if unavailable is not None:
            # Measure anyway: a lent machine's time is better spent on the
            # numbers than on nothing.
            print(
                f"benchmark: --profile: py-spy cannot read processes here, "
                f"measuring without it: {unavailable}",
                file=sys.stderr,
            )
            profiler = None
    available = servers.available_kinds()
    wanted = _names(args.servers, servers.KINDS, "server")
    missing = [k for k in wanted if k not in available]
    if missing:
        print(f"skipping {', '.join(missing)}: not importable here", file=sys.stderr)
    return Settings(
        servers=tuple(k for k in wanted if k in available),
        workers=tuple(sorted({int(w) for w in str(pick("workers")).split(",")})),
        workloads=_names(args.workloads, list(WORKLOADS), "workload"),
        duration=float(pick("duration")),
        warmup=float(pick("warmup")),
        connections=args.connections,
        burst_connections=args.burst_connections,
        threads=args.threads or len(pinning.client),
        sources=args.sources,
        burst_wait=args.burst_wait,
        startup_workers=args.startup_workers,
        startup_runs=int(pick("startup_runs")),
        startup_servers=_names(args.startup_servers, servers.KINDS, "server"),
        idle_wait=args.idle_wait,
        backlog=args.backlog,
        prime=args.prime,
        reload_load=args.reload_load,
        rounds=args.rounds,
        profile=profiler,
        profile_unavailable=unavailable,
    )


def competitors(settings: Settings) -> list[tuple[str, int]]:
    """
    (server, workers) pairs to measure: the single-process server once, at
    one worker, and every other server at every count.
    """
    pairs = []
    for workers in settings.workers:
        for kind in settings.servers:
            if kind not in servers.SINGLE_PROCESS:
                pairs.append((kind, workers))
            elif workers == settings.workers[0]:
                pairs.append((kind, 1))
    return pairs


class Bench:
    """
    One benchmark run: owns the settings, the pinning and the results, and
    writes results.json after every server so that an interrupted run
    still leaves what it measured.
    """

    def __init__(self, settings: Settings, pinning: _system.Pinning, out: Path) -> None:
        self.settings = settings
        self.pinning = pinning
        self.out = out
        #: The sweep now running (0 for the first; see --rounds).
        self.round = 0
        self.results: dict[str, Any] = {
            "command": " ".join([Path(sys.executable).name, *sys.argv]),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "environment": _system.environment(),
            "pinning": pinning.describe(),
            "settings": asdict(settings),
            "runs": [],
            "failures": [],
            "servers": {},
        }

    # -- running servers

    def serve(
        self, kind: str, workers: int, label: str = "", metrics: bool = False
    ) -> servers.RunningServer:
        """
        A server ready to start; with C{metrics}, a maccept server also
        serves /metrics, for the accept path's counters (left out of the
        footprint runs, where it would add its own memory).
        """
        port = servers.freePort()
        metricsPort = None
        while metrics and kind.startswith("maccept") and metricsPort in (None, port):
            metricsPort = servers.freePort()
        spec = servers.ServerSpec(kind, workers, port, self.settings.backlog, metricsPort)
        log = self.out / "raw" / f"{kind}-{workers}{label}.log"
        return servers.RunningServer(spec, self.pinning.server, log)

    def preflight(self) -> None:
        """
        Start each server once, with the fewest workers, before measuring
        anything: one that cannot start (a module missing where the sweep
        runs) would otherwise fail in every cell while the others take
        minutes of a lent machine's time.

        @raise SystemExit: naming the first server that did not start, with
            the tail of its log.
        """
        for kind in self.settings.servers:
            server = self.serve(kind, 1, "-preflight", metrics=True)
            try:
                server.start()
            except servers.ServerError as e:
                raise SystemExit(
                    f"benchmark: {kind} did not start, so nothing was measured"
                    f" (fix it or leave it out of --servers): {e}"
                ) from None
            finally:
                server.stop()

    def measureServer(self, kind: str, workers: int, round: int = 0) -> None:
        """
        Start one server, put every workload through it, stop it.
        """
        rounds = self.settings.rounds
        of = f", round {round + 1} of {rounds}" if rounds > 1 else ""
        print(f"== {kind}, {workers} worker(s){of}", file=sys.stderr, flush=True)
        server = self.serve(kind, workers, f"-round{round + 1}" if rounds > 1 else "", metrics=True)
        self.round = round
        try:
            server.start()
            pids = self._describeServer(server)
            self._prime(server, pids)
            for name in self.settings.workloads:
                self._measureWorkload(server, WORKLOADS[name], pids)
        except ServerExitedError as e:
            # Recorded with its run already; the rest would only be refused.
            print(f"   cell broken off: {e}", file=sys.stderr, flush=True)
        except Exception as e:
            # Anything, not only the expected failures: on a lent machine one
            # cell's surprise must not cost the rest of the sweep.
            failure = {"server": kind, "workers": workers, "round": round, "error": _why(e)}
            self.results["failures"].append(failure)
            print(f"   FAILED: {e}", file=sys.stderr)
        finally:
            server.stop()
        self.save()

    def _serverKey(self, server: servers.RunningServer) -> str:
        key = f"{server.spec.kind}-{server.spec.processes}"
        return key if self.settings.rounds == 1 else f"{key}-round{self.round + 1}"

    def _describeServer(self, server: servers.RunningServer) -> list[int]:
        """
        Record the server's command line and workers; return the workers'
        pids, which must all outlive the cell.
        """
        pids = server.workerPids()
        key = self._serverKey(server)
        self.results["servers"][key] = {
            "command": " ".join(server.spec.command()),
            "ready_s": round(server.readyAfter, 3),
            "worker_pids": pids,
            "worker_affinity": [_system.formatCpus(_procfs.affinity(p)) for p in pids],
        }
        return pids

    def _prime(self, server: servers.RunningServer, pids: Iterable[int] = ()) -> None:
        """
        Run an unmeasured load on a connection set of its own first.  A new
        asyncio server serves its first set of connections at a third of
        its later rate for as long as they live, whatever the warm-up; other
        servers may have smaller first-use costs.  The rate is kept to show it.
        """
        s = self.settings
        if s.prime <= 0:
            return
        load = _loadgen.Load(
            mode="rr",
            port=server.spec.port,
            connections=s.connections,
            threads=s.threads,
            duration=s.prime,
            size=1024,
        )
        result = _loadgen.run(load, self.pinning.client)
        key = self._serverKey(server)
        self.results["servers"][key]["prime_rps"] = result["rps"]
        # Unmeasured, but a wrong or missing echo here is as wrong as anywhere.
        self.results["servers"][key]["prime"] = {
            k: result[k]
            for k in ("errors", "connect_failures", *PROBLEMS, "first_error")
            if k in result
        }
        self._checkRun(server, "prime", result, pids)

    def _checkRun(
        self,
        server: servers.RunningServer,
        workload: str,
        result: dict[str, Any],
        pids: Iterable[int] = (),
    ) -> None:
        """
        Record a load generator run whose echoes were wrong or never came
        back (L{failed}), or during which the server or one of its workers
        (C{pids}) exited, as a failure of its cell, so that the run exits 1,
        and mark the run C{failed}, so that the report does not show its
        numbers as the server's.

        @raise ServerExitedError: when the server or a worker exited: the cell
            breaks off.
        """
        exited = server.exited(pids)
        problems = failed(result)
        why = "; ".join(text for text in (exited and f"{exited} during the run", problems) if text)
        if not why:
            return
        result["failed"] = why
        failure = {
            "server": server.spec.kind,
            "workers": server.spec.processes,
            "round": self.round,
            "workload": workload,
            "error": why,
        }
        self.results["failures"].append(failure)
        print(f"   FAILED: {workload}: {why}", file=sys.stderr, flush=True)
        if exited:
            raise ServerExitedError(f"{server.spec.kind} {server.spec.processes} w: {exited}")

    def _measureWorkload(
        self, server: servers.RunningServer, workload: Workload, pids: Iterable[int] = ()
    ) -> None:
        if workload.mode == "burst":
            if server.spec.processes < 2 or server.spec.kind in servers.SINGLE_PROCESS:
                return  # one process: nothing to balance
            record = self.measureBurst(server)
        else:
            record = self.measureLoad(server, workload)
        record = {
            "server": server.spec.kind,
            "workers": server.spec.processes,
            "workload": workload.name,
            "round": self.round,
            **record,
        }
        self.results["runs"].append(record)
        print(f"   {_report.oneLine(record)}", file=sys.stderr, flush=True)
        self._checkRun(server, workload.name, record, pids)

    def measureLoad(self, server: servers.RunningServer, workload: Workload) -> dict[str, Any]:
        """
        One timed run, and the CPU time the workers (and a supervising
        parent) spent in its measured window.  CPU per request is the
        server's cost whatever else competes for the machine, and the
        spread between workers shows the balance under steady load.
        """
        s = self.settings
        pids = server.workerPids()
        load = _loadgen.Load(
            mode=workload.mode,
            port=server.spec.port,
            connections=s.connections,
            threads=s.threads,
            duration=s.duration,
            warmup=s.warmup,
            size=workload.size,
            sources=s.sources,
        )
        watched = [*pids, server.pid] if server.pid not in pids else pids
        running = _loadgen.Background(load, self.pinning.client)
        # The client's measured window, as near as this process can tell:
        # the CPU readings bound it, and its end is fixed from the client's
        # start, so that the slower work inside it (py-spy's start, a
        # /metrics fetch) does not lengthen it, and CPU per request divides
        # the window's CPU by the window's requests.
        windowEnds = time.monotonic() + s.warmup + s.duration
        recording = None
        try:
            time.sleep(s.warmup)
            before = [_procfs.cpuTimes(p) for p in watched]
            recording = self._startProfiling(server, workload)
            countersBefore = server.acceptCounters()
            time.sleep(max(0.0, windowEnds - time.monotonic()))
            after = [_procfs.cpuTimes(p) for p in watched]
            countersAfter = server.acceptCounters()
        finally:
            try:
                samples = recording.stop() if recording is not None else None
            finally:
                result = running.finish()
        userTime = [a[0] - b[0] for a, b in zip(after, before, strict=True)]
        systemTime = [a[1] - b[1] for a, b in zip(after, before, strict=True)]
        spent = [u + k for u, k in zip(userTime, systemTime, strict=True)]
        record = {**result, "worker_cpu_s": [round(x, 2) for x in spent[: len(pids)]]}
        if countersBefore and countersAfter:
            # The window's counts, as maccept's own /metrics tell them.
            record["accept_path"] = {
                name: countersAfter[name] - countersBefore[name]
                for name in countersAfter.keys() & countersBefore.keys()
            }
        if isinstance(samples, str):
            record["profile"] = {"error": samples}
        elif samples is not None:
            cpu = dict(zip(pids, spent[: len(pids)], strict=True))
            record["profile"] = _profile.spread(samples, cpu, result["requests"])
        if len(watched) > len(pids):
            # A supervising parent should cost nothing while workers serve.
            record["parent_cpu_s"] = round(spent[-1], 2)
        if sum(spent) > 0:
            record["server_kernel_share"] = round(sum(systemTime) / sum(spent), 3)
        if result["requests"]:
            record["server_cpu_us_per_request"] = round(sum(spent) * 1e6 / result["requests"], 1)
        # The client's CPU over its whole run (warm-up included), as a share
        # of what its threads could use: near 1, the client set the pace.
        clientCapacity = min(s.threads, len(self.pinning.client)) * (s.warmup + s.duration)
        if clientCapacity > 0:
            record["client_busy"] = round(result["client_cpu_s"] / clientCapacity, 3)
        return record

    def _startProfiling(
        self, server: servers.RunningServer, workload: Workload
    ) -> _profile.Recording | None:
        """
        With C{--profile}, start py-spy on a maccept server's workers (the
        parent's children) for the measured window, on the client's CPUs.
        """
        if self.settings.profile is None or not server.spec.isMaccept:
            return None
        label = f"{self._serverKey(server)}-{workload.name}"
        return _profile.Recording(
            self.settings.profile,
            server.pid,
            self.out / "raw" / f"{label}.pyspy",
            preexec=_loadgen.pinnedTo(self.pinning.client),
        )

    def measureBurst(self, server: servers.RunningServer) -> dict[str, Any]:
        """
        Open the burst, wait until every connection has had its byte
        echoed (the client says so), and count each worker's connections
        from /proc.
        """
        s = self.settings
        load = _loadgen.Load(
            mode="burst",
            port=server.spec.port,
            connections=s.burst_connections,
            threads=s.threads,
            # The client waits up to half of this for its connections to be
            # served, and holds them for the rest: time to count them.
            duration=2 * s.burst_wait + 10,
        )
        pids = server.workerPids()
        burst = _loadgen.Background(load, self.pinning.client)
        try:
            opened = burst.waitOpen()
            served = burst.waitServed()
            counts = countConnections(server.spec.port, pids, served, s.burst_wait)
        finally:
            result = burst.finish(early=True)
        return {
            **result,
            "opened": opened,
            "served": served,
            "per_worker": counts,
            "max_min_ratio": _ratio(counts),
        }

    # -- start-up and idle footprint

    def measureFootprint(self, kind: str) -> None:
        """
        Time start-ups until every worker accepts, and read the idle memory
        of the parent and of the workers once.
        """
        s = self.settings
        print(f"== start-up and idle memory: {kind}, {s.startup_workers} workers", file=sys.stderr)
        times: list[float] = []
        memory: dict[str, Any] = {}
        for attempt in range(s.startup_runs):
            server = self.serve(kind, s.startup_workers, f"-startup{attempt}")
            try:
                server.start()
                times.append(server.readyAfter)
                if attempt == 0:
                    time.sleep(s.idle_wait)
                    memory = idleMemory(server)
            except Exception as e:  # as in measureServer: the sweep goes on
                self.results["failures"].append({"server": kind, "startup": True, "error": _why(e)})
            finally:
                server.stop()
        self.results.setdefault("footprint", {})[kind] = {
            "workers": s.startup_workers,
            "startup_s": [round(t, 3) for t in times],
            "startup_median_s": round(statistics.median(times), 3) if times else None,
            **memory,
        }
        self.save()

    def measureReload(self) -> None:
        """
        SIGHUP a maccept under connection churn: how long until the new
        generation serves and the old one is gone, and whether any client
        noticed (connect failures, errors).
        """
        if not reloadSupported():
            self.results["reload"] = {"seconds": None, "note": "maccept has no reload (SIGHUP)"}
            return
        s = self.settings
        print(f"== reload: maccept, {s.startup_workers} workers", file=sys.stderr)
        server = self.serve("maccept", s.startup_workers, "-reload")
        try:
            server.start()
            reload = self._reload(server)
            # Its workers change on purpose; its parent must stay.
            exited = server.exited()
            why = reloadFailed(reload)
            if exited is not None:
                why = "; ".join(t for t in (f"{exited} during the reload", why) if t)
        except Exception as e:  # as in measureServer: the sweep goes on
            why = _why(e)
            reload = {"seconds": None, "note": f"failed: {why}"}
        finally:
            server.stop()
        self.results["reload"] = reload
        if why is not None:
            failure = {"server": "maccept", "workers": s.startup_workers, "reload": True}
            self.results["failures"].append({**failure, "error": why})
            print(f"   FAILED: reload: {why}", file=sys.stderr, flush=True)
        self.save()

    def _reload(self, server: servers.RunningServer) -> dict[str, Any]:
        s = self.settings
        old = server.workerPids()
        load = _loadgen.Load(
            mode="churn",
            port=server.spec.port,
            connections=s.connections,
            threads=s.threads,
            # Longer than the reload may take: ended (SIGTERM) once it is over.
            duration=s.reload_load + 2 * RELOAD_LIMIT,
            sources=s.sources,
        )
        churn = _loadgen.Background(load, self.pinning.client)
        started = time.monotonic()
        try:
            time.sleep(min(1.0, s.reload_load / 4))
            began = time.monotonic()
            os.kill(server.pid, signal.SIGHUP)
            ready = waitUntil(lambda: bool(RELOADED.search(server.log())), RELOAD_LIMIT)
            gone = waitUntil(lambda: not set(old) & set(server.workerPids()), RELOAD_LIMIT)
            # Churn for --reload-load at least, and through the whole reload,
            # so that what the clients saw covers all of it.
            time.sleep(max(0.0, started + s.reload_load - time.monotonic()))
        finally:
            result = churn.finish(early=True)
        new = server.workerPids()
        return {
            "seconds": None if gone is None else round(gone - began, 3),
            "new_generation_ready_s": None if ready is None else round(ready - began, 3),
            "old_generation_gone_s": None if gone is None else round(gone - began, 3),
            "workers_before": old,
            "workers_after": new,
            "load": result,
            "note": (
                f"SIGHUP to the parent during {result['seconds']:.1f} s of connection churn, "
                "which lasted until the last old worker exited; seconds: until it exited"
            ),
        }

    # -- output

    def save(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "results.json").write_text(json.dumps(self.results, indent=2) + "\n")

    def finish(self) -> None:
        self.results["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        self.results["loadavg_after"] = _system.loadAverage()
        self.save()
        render(self.out)


def _ratio(counts: list[int]) -> float | None:
    """
    max/min of the per-worker counts; None when a worker got nothing.
    """
    if not counts or min(counts) == 0:
        return None
    return round(max(counts) / min(counts), 2)


def countConnections(port: int, pids: list[int], expected: int, limit: float) -> list[int]:
    """
    Each of C{pids}' established connections to C{port}.  Every connection
    the client saw served (C{expected}) has been accepted, so one read
    normally finds them all; a count that falls short is read again, up to
    C{limit} seconds, rather than recorded as it is.
    """
    deadline = time.monotonic() + limit
    counts = _procfs.connectionsPerProcess(port, pids)
    while sum(counts) < expected and time.monotonic() < deadline:
        time.sleep(0.01)
        counts = _procfs.connectionsPerProcess(port, pids)
    return counts


def idleMemory(server: servers.RunningServer) -> dict[str, Any]:
    """
    RSS and PSS of the parent and of each worker, in KiB.
    """
    workers = [_procfs.memory(p) for p in server.workerPids()]
    rss = [w["rss_kib"] for w in workers if w["rss_kib"] is not None]
    return {
        "parent": _procfs.memory(server.pid),
        "workers_mem": workers,
        "worker_rss_median_kib": int(statistics.median(rss)) if rss else None,
    }


def reloadSupported() -> bool:
    """
    Whether the installed maccept reloads on SIGHUP (it did not at first).
    """
    try:
        from maccept._pool import WorkerPool
    except ImportError:
        return False
    return hasattr(WorkerPool, "reload")


#: The load generator's counts that make a run wrong, not just slow: echoes
#: that differed from what was sent, and requests left without one.
PROBLEMS = _report.PROBLEMS


class ServerExitedError(Exception):
    """
    A server, or one of its workers, exited during a run: its failure is
    recorded, and the cell breaks off.
    """


def failed(result: dict[str, Any]) -> str | None:
    """
    Why a load generator run failed (wrong or missing echoes: the client's
    exit status 1), or None.  Broken connections and failed connects are
    reported, not failed: a full accept queue (--backlog 50) causes them.
    """
    counts = [f"{k} {result[k]}" for k in PROBLEMS if result.get(k)]
    if not counts:
        return None
    first = f" (first: {result['first_error']})" if result.get("first_error") else ""
    return ", ".join(counts) + first


def reloadFailed(reload: dict[str, Any]) -> str | None:
    """
    Why a measured reload failed: a generation that never served or never
    left, or wrong or missing echoes meanwhile; None if it did not.
    """
    if reload["new_generation_ready_s"] is None:
        return f"the new generation did not serve within {RELOAD_LIMIT:.0f} s"
    if reload["old_generation_gone_s"] is None:
        return f"the old generation had not exited after {RELOAD_LIMIT:.0f} s"
    why = failed(reload["load"])
    return None if why is None else f"clients during the reload: {why}"


def exitOnSignals() -> None:
    """
    Make SIGTERM and SIGHUP end the run as an exception would, so that
    every server is stopped on the way out (each runs in a session of its
    own, where no signal to this process reaches it).  A second signal
    during that clean-up is ignored; SIGKILL still ends everything but the
    servers.
    """

    def end(signum: int, frame: FrameType | None) -> None:
        for other in (signal.SIGTERM, signal.SIGHUP):
            signal.signal(other, signal.SIG_IGN)
        raise SystemExit(128 + signum)

    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, end)


def _why(error: Exception) -> str:
    """
    A failure's text: the expected ones say it all, a surprise is named.
    """
    expected = (servers.ServerError, _loadgen.LoadgenError, subprocess.SubprocessError)
    return str(error) if isinstance(error, expected) else f"{type(error).__name__}: {error}"


def waitUntil(condition: Callable[[], bool], limit: float) -> float | None:
    """
    Poll C{condition}; return the monotonic time it first held, or None
    after C{limit} seconds.
    """
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if condition():
            return time.monotonic()
        time.sleep(0.005)
    return None


def runAll(bench: Bench) -> None:
    s = bench.settings
    # Whole sweeps one after the other, rather than one cell N times, so
    # that a slow spell of the machine spreads over every competitor.
    for round in range(s.rounds):
        for kind, workers in competitors(s):
            bench.measureServer(kind, workers, round)
    for kind in s.startup_servers:
        if kind in s.servers:
            bench.measureFootprint(kind)
    if "maccept" in s.servers:
        bench.measureReload()


def render(out: Path) -> None:
    """
    Rewrite the report and the plot from a results.json, e.g. after the
    tables changed, without measuring again.
    """
    results = json.loads((out / "results.json").read_text())
    (out / "results.md").write_text(_report.markdown(results))
    try:
        _report.plot(results, out / "throughput_vs_workers.png")
    except ImportError:
        # matplotlib is optional (benchmarks/README.rst): the tables stand.
        print("no plot: matplotlib is not installed (pip install matplotlib)", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    # The servers run from the repository; so does the harness's own look
    # at maccept (whether it reloads), however the harness was started.
    if str(_system.REPO) not in sys.path:
        sys.path.append(str(_system.REPO))
    args = parseArguments(argv)
    if args.render:
        render(args.out)
        return 0
    try:
        pinning = _system.Pinning.choose(args.server_cpus, args.client_cpus)
    except ValueError as e:
        raise SystemExit(str(e)) from None
    if args.rounds < 1:
        raise SystemExit(f"--rounds: expected 1 or more, got {args.rounds}")
    if args.duration is not None and args.duration <= 0:
        raise SystemExit(f"--duration: expected more than 0 seconds, got {args.duration}")
    if args.warmup is not None and args.warmup < 0:
        raise SystemExit(f"--warmup: expected 0 seconds or more, got {args.warmup}")
    exitOnSignals()
    _loadgen.build()
    settings = makeSettings(args, pinning)
    bench = Bench(settings, pinning, args.out)
    # Off the server CPUs (it polls logs and /proc), once the environment,
    # which records the CPUs this process may use, is taken.
    os.sched_setaffinity(0, pinning.client)
    bench.preflight()
    began = time.monotonic()
    try:
        runAll(bench)
    finally:
        bench.results["elapsed_s"] = round(time.monotonic() - began, 1)
        bench.save()
    bench.finish()
    print(f"done in {bench.results['elapsed_s']:.0f}s: {args.out}/results.md", file=sys.stderr)
    return 1 if bench.results["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
