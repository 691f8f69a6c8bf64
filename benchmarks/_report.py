"""
Turn results.json into results.md and throughput_vs_workers.png.

The tables put every competitor side by side at each worker count, because
only ratios taken within one run mean much: absolute rates move from machine
to machine and from run to run.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import _profile

RR_TITLES = {
    "rr-1k": "Request/response, 1 KiB",
    "rr-16k": "Request/response, 16 KiB",
    "rr-256k": "Request/response, 256 KiB",
    "churn": "Connection churn (connect, 64 B echo, close)",
}


#: The load generator's counts that make a run wrong, not just slow: echoes
#: that differed from what was sent, and requests left without one.
PROBLEMS = ("mismatches", "stalled")
#: After a number from a run that failed (Errors): it is not the server's.
FAILED_MARK = " !"


def runFailed(run: dict[str, Any] | None) -> bool:
    """
    Whether a run failed: the harness marked it (wrong or missing echoes,
    a server that exited during it), or, in a results.json from before it
    did, its counts say so.
    """
    return run is not None and (bool(run.get("failed")) or any(run.get(k) for k in PROBLEMS))


def oneLine(record: dict[str, Any]) -> str:
    """
    A progress line for the terminal.
    """
    if record["workload"] == "burst":
        return f"burst: per worker {record['per_worker']} max/min {record['max_min_ratio']}"
    return (
        f"{record['workload']}: {record['rps']:.0f}/s p99 {record['p99_us'] / 1000:.1f} ms "
        f"errors {record['errors']} mismatches {record['mismatches']} "
        f"stalled {record.get('stalled', '?')}"
    )


def _kilo(value: float) -> str:
    return f"{value / 1000:.1f}k" if value >= 1000 else f"{value:.0f}"


def _table(header: list[str], rows: Iterable[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


class Results:
    """
    Look-ups over the runs of one results.json.
    """

    def __init__(self, results: dict[str, Any]) -> None:
        self.raw = results
        self.runs: list[dict[str, Any]] = results["runs"]
        #: The worker counts asked for, and 1 where only the one-process
        #: server ran it (--workers without 1): its column, not hidden.
        asked = results["settings"]["workers"]
        self.workers: list[int] = sorted({*asked, *(run["workers"] for run in self.runs)})
        seen: dict[str, None] = {}
        for run in self.runs:
            seen.setdefault(run["server"], None)
        self.servers = list(seen)

    def all(self, server: str, workers: int, workload: str) -> list[dict[str, Any]]:
        """
        Every round's run of one cell, leaving out those that failed when
        any did not: a failed run's numbers are not the server's.  When all
        failed, all of them, so that the cell shows, marked.
        """
        key = (server, workers, workload)
        runs = [run for run in self.runs if (run["server"], run["workers"], run["workload"]) == key]
        good = [run for run in runs if not runFailed(run)]
        return good or runs

    def failed(self, server: str, workers: int, workload: str) -> bool:
        """
        Whether the cell has only failed runs: its numbers are marked, and
        no ratio or target rests on them.
        """
        return runFailed(self.find(server, workers, workload))

    def find(self, server: str, workers: int, workload: str) -> dict[str, Any] | None:
        """
        The cell's run, or with several rounds its median run: by rate, or
        for a burst by max/min (the lower middle of an even count).
        """
        runs = sorted(self.all(server, workers, workload), key=_rank)
        return runs[(len(runs) - 1) // 2] if runs else None

    def median(self, server: str, workers: int, workload: str, field: str) -> float | None:
        """
        The median of one field over a cell's rounds (the lower middle of
        an even count), each round's own: the run of median rate may have
        had the worst p99 of all.  None when no round measured it.
        """
        values = sorted(run[field] for run in self.all(server, workers, workload) if field in run)
        return float(values[(len(values) - 1) // 2]) if values else None

    def spread(self, server: str, workers: int, workload: str) -> float | None:
        """
        Half the range of a cell's rates over its rounds, as a share of the
        median; None with one round.
        """
        rates = [run["rps"] for run in self.all(server, workers, workload) if "rps" in run]
        median = self.find(server, workers, workload)
        if len(rates) < 2 or median is None or not median.get("rps"):
            return None
        return float((max(rates) - min(rates)) / 2 / median["rps"])

    def ratio(self, mine: str, theirs: str, workers: int, workload: str) -> float | None:
        """
        C{mine}'s rate over C{theirs}' at one worker count; None when
        either was not run.
        """
        a, b = self.find(mine, workers, workload), self.find(theirs, workers, workload)
        if a is None or b is None or not b["rps"] or runFailed(a) or runFailed(b):
            return None
        return float(a["rps"] / b["rps"])

    def scaling(self, server: str, workload: str, workers: int) -> float | None:
        """
        The rate with C{workers} over C{workers} times the rate with one:
        1.0 is linear scaling.  None when either was not run.
        """
        one, many = self.find(server, 1, workload), self.find(server, workers, workload)
        if one is None or many is None or not one["rps"] or runFailed(one) or runFailed(many):
            return None
        return float(many["rps"] / (workers * one["rps"]))

    def workloads(self) -> list[str]:
        return [
            w
            for w in self.raw["settings"]["workloads"]
            if any(r["workload"] == w for r in self.runs)
        ]


def _rank(run: dict[str, Any]) -> float:
    if run["workload"] == "burst":
        ratio = run.get("max_min_ratio")
        return float("inf") if ratio is None else float(ratio)
    return float(run["rps"])


def _header(results: dict[str, Any]) -> list[str]:
    env = results["environment"]
    pin = results["pinning"]
    s = results["settings"]
    overlap = f" **Sets overlap on CPUs {pin['overlap']}.**" if pin["overlap"] else ""
    return [
        "# maccept benchmark",
        "",
        f"Command: `{results['command']}`  ",
        f"Started {results['started']}, took {results.get('elapsed_s', '?')} s.",
        "",
        f"- Machine: {env['cpu_model']}, {env['cpu_count']} CPUs "
        f"(usable {env['usable_cpus']}), {env['machine']}, Linux {env['kernel']}",
        f"- Software: {env['python_implementation']} {env['python']}, Twisted {env['twisted']}, "
        f"uvloop {env['uvloop']}, maccept {env['maccept']} at {env['maccept_commit']}"
        f"{' (with uncommitted changes)' if env['maccept_tree_dirty'] else ''}, {env['cc']}",
        f"- Load average (1, 5, 15 min) before the run: {env.get('loadavg_before', '?')} "
        f"(other work competing shows here), after: {results.get('loadavg_after', '?')} "
        "(includes the run)",
        f"- Pinning: servers on CPUs {pin['server_cpus']}, load generator on CPUs "
        f"{pin['client_cpus']}, by {pin['method']}.{overlap}",
        f"- CPU split: {pin.get('note', '?')}.",
        f"- Load: {s['connections']} connections, {s['threads']} client threads, "
        f"{s['duration']} s measured after {s['warmup']} s warm-up; churn over {s['sources']} "
        f"source addresses; burst of {s['burst_connections']} connections; accept backlog "
        f"{s['backlog']} for every server.",
        *(
            [
                f"- Rounds: the whole sweep ran {s['rounds']} times, one after the other; each "
                "cell is its median run (bursts: by max/min), and ±N% is half the range of its "
                "rates over the rounds."
            ]
            if s.get("rounds", 1) > 1
            else []
        ),
        *(
            [
                "- Profile: asked for, but py-spy could not read processes: "
                f"{s['profile_unavailable']}"
            ]
            if s.get("profile_unavailable")
            else []
        ),
        "",
    ]


#: A client this busy may have set the pace rather than the server.
CLIENT_BOUND = 0.9


def _cell(run: dict[str, Any] | None, withBandwidth: bool, spread: float | None = None) -> str:
    if run is None:
        return "-"
    text = _kilo(run["rps"])
    if spread is not None:
        text += f" ±{spread:.0%}"
    if withBandwidth:
        text += f" ({run['mib_s']:.0f} MiB/s)"
    if run.get("client_busy", 0) >= CLIENT_BOUND:
        text += " *"
    if runFailed(run):
        text += FAILED_MARK
    return text


def _ratioText(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _scaling(r: Results, server: str, workload: str, workers: int) -> str:
    if r.failed(server, 1, workload) or r.failed(server, workers, workload):
        return FAILED_MARK.strip()
    return _ratioText(r.scaling(server, workload, workers))


def _versus(r: Results, workload: str, workers: int) -> str:
    if r.failed("maccept", workers, workload) or r.failed("recipe", workers, workload):
        return FAILED_MARK.strip()
    return _ratioText(r.ratio("maccept", "recipe", workers, workload))


def _throughputSection(r: Results, workload: str) -> list[str]:
    many = [w for w in r.workers if w > 1]
    bandwidth = workload in ("rr-16k", "rr-256k")
    unit = "requests/s (MiB/s echoed)" if bandwidth else "per second"
    header = ["server", *[f"{w} w" for w in r.workers], *[f"{w}/({w}x1)" for w in many]]
    rows = []
    for server in r.servers:
        cells = [
            _cell(r.find(server, w, workload), bandwidth, r.spread(server, w, workload))
            for w in r.workers
        ]
        rows.append([server, *cells, *[_scaling(r, server, workload, w) for w in many]])
    rows.append(
        ["maccept / recipe", *[_versus(r, workload, w) for w in r.workers], *["" for _ in many]]
    )
    starred = any(" *" in cell for row in rows for cell in row)
    marked = any(cell.endswith(FAILED_MARK) for row in rows for cell in row)
    # Older results.json files lack the kernel share and the client's load.
    recorded = [run for run in r.runs if run["workload"] == workload]
    kernelShare = any("server_kernel_share" in run for run in recorded)
    clientBusy = [
        "Load generator busy, as a share of its CPUs (whole run):",
        "",
        *_perWorkerCount(r, workload, _clientBusy),
        "",
    ]
    acceptPath = [
        "maccept's accept path (from its own /metrics, which lag by up to a second): "
        "balance pauses / wake-ups that found nothing (another worker took the "
        "connection), each per 1000 connections accepted / connections per wake-up "
        "that accepted any (the mean accept batch):",
        "",
        *_perWorkerCount(r, workload, _acceptPath),
        "",
    ]
    footnote = [
        f"\\* the load generator used {CLIENT_BOUND:.0%} or more of its CPUs: the client, "
        "not the server, may have set that number.",
        "",
    ]
    return [
        f"## {RR_TITLES[workload]}: {unit}",
        "",
        *_table(header, rows),
        "",
        *(footnote if starred else []),
        *(FAILED_FOOTNOTE if marked else []),
        "p50 / p99 / p99.9 latency in ms:",
        "",
        *_perWorkerCount(r, workload, _latency),
        "",
        "Server CPU per request in µs (workers and parent, measured window)"
        + (
            ", and the kernel's share of it (system time: TCP on loopback, epoll, scheduling):"
            if kernelShare
            else ":"
        ),
        "",
        *_perWorkerCount(r, workload, _cpuPerRequest),
        "",
        *(clientBusy if any("client_busy" in run for run in recorded) else []),
        # Only churn accepts enough connections for a rate per connection.
        *(
            acceptPath
            if workload == "churn" and any("accept_path" in run for run in recorded)
            else []
        ),
        *(_profileSection(r, workload) if any("profile" in run for run in recorded) else []),
    ]


FAILED_FOOTNOTE = [
    f"{FAILED_MARK.strip()} the run failed (Errors, below: wrong or missing echoes, or the "
    "server exited during it): its numbers, and the ratios and targets that would rest on "
    "them, are not the server's.",
    "",
]


def _profileSection(r: Results, workload: str) -> list[str]:
    """
    With --profile: the server CPU per request spread over the parts of
    the server, each worker's CPU in the shares of its own py-spy samples.
    """
    rows = []
    for server in r.servers:
        for workers in r.workers:
            run = r.find(server, workers, workload)
            profile = (run or {}).get("profile")
            if profile is None:
                continue
            if "us_per_request" not in profile:
                why = profile.get("error", "no samples")
                rows.append([server, str(workers), why, *["" for _ in _profile.NAMES], "-"])
                continue
            perPart = profile["us_per_request"]
            rows.append(
                [
                    server,
                    str(workers),
                    *[f"{perPart.get(name, 0):.1f}" for name in _profile.NAMES],
                    f"{profile.get('unsampled_us_per_request', 0):.1f}",
                    str(profile["samples"]),
                ]
            )
    header = ["server", "workers", *_profile.NAMES, "unsampled", "samples"]
    return [
        "Where the workers' CPU per request goes, in µs: each worker's CPU time spread over"
        " the parts of the server in the shares of its py-spy samples (by the innermost"
        " Python frame; a frame's system calls count with it):",
        "",
        *_table(header, rows),
        "",
    ]


def _perWorkerCount(
    r: Results, workload: str, show: Callable[[dict[str, Any] | None], str]
) -> list[str]:
    """
    A table with a row per server and a column per worker count; a number
    from a failed run is marked.
    """

    def marked(run: dict[str, Any] | None) -> str:
        text = show(run)
        return text + FAILED_MARK if runFailed(run) and text != "-" else text

    header = ["server", *[f"{w} w" for w in r.workers]]
    rows = [
        [server, *[marked(r.find(server, w, workload)) for w in r.workers]] for server in r.servers
    ]
    return _table(header, rows)


def _cpuPerRequest(run: dict[str, Any] | None) -> str:
    if run is None or "server_cpu_us_per_request" not in run:
        return "-"
    text = f"{run['server_cpu_us_per_request']:.1f}"
    if "server_kernel_share" in run:
        text += f" ({run['server_kernel_share']:.0%} kernel)"
    return text


def _acceptPath(run: dict[str, Any] | None) -> str:
    counts = (run or {}).get("accept_path", {})
    accepted = counts.get("accepted", 0)
    if not accepted:
        return "-"
    perThousand = [
        f"{counts[name] * 1000 / accepted:.1f}" if name in counts else "-"
        for name in ("balance_pauses", "empty_wakeups")
    ]
    batches = counts.get("batches")
    perBatch = f"{accepted / batches:.1f}" if batches else "-"
    return " / ".join([*perThousand, perBatch])


def _clientBusy(run: dict[str, Any] | None) -> str:
    if run is None or "client_busy" not in run:
        return "-"
    return f"{run['client_busy']:.0%}"


def _latency(run: dict[str, Any] | None) -> str:
    if run is None:
        return "-"
    return " / ".join(f"{run[k] / 1000:.2f}" for k in ("p50_us", "p99_us", "p999_us"))


def _cpuSpread(r: Results, server: str, workers: int) -> str:
    run = r.find(server, workers, "rr-1k")
    if run is None or not run.get("worker_cpu_s") or min(run["worker_cpu_s"]) <= 0:
        return "-"
    cpu = run["worker_cpu_s"]
    return f"{max(cpu) / min(cpu):.2f}"


def _servedIn(run: dict[str, Any]) -> str:
    """
    How long the burst's connections waited to be served: from connect()
    to the echo of their byte, p50 / max, and from the last connect to the
    last echo (what the server added to the burst), in ms.  Runs from
    before the client timed that kept a poll of /proc instead (marked).
    """
    if "served" not in run:
        return f"({run['accept_wait_s'] * 1000:.0f}) †"
    if not run["served"]:
        return f"none of {run['opened']} served"
    text = f"{run['p50_us'] / 1000:.1f} / {run['max_us'] / 1000:.1f}"
    if "burst_lag_us" in run:
        text += f" / {run['burst_lag_us'] / 1000:.1f}"
    if run["served"] < run["opened"]:
        text += f" (served {run['served']} of {run['opened']})"
    return text


def _balanceSection(r: Results, connections: int) -> list[str]:
    rows = []
    for server in r.servers:
        for w in r.workers:
            run = r.find(server, w, "burst")
            if run is None:
                continue
            ratio = run["max_min_ratio"]
            rows.append(
                [
                    server,
                    str(w),
                    " / ".join(str(c) for c in run["per_worker"]),
                    ("inf (a worker got none)" if ratio is None else f"{ratio:.2f}")
                    + (FAILED_MARK if runFailed(run) else ""),
                    _servedIn(run),
                    _cpuSpread(r, server, w),
                ]
            )
    if not rows:
        return []
    header = [
        "server",
        "workers",
        "connections per worker",
        "max/min",
        "ms from connect to echo, p50 / max / last echo after last connect",
        "rr-1k CPU max/min",
    ]
    footnote = [
        "† a run from before the client timed each connection: the number in brackets is how "
        "long reading /proc/net/tcp took until every connection was seen accepted, which "
        "after a churn run was mostly the reading itself (benchmarks/README.rst).",
        "",
    ]
    old = any(row[4].endswith("†") for row in rows)
    marked = any(row[3].endswith(FAILED_MARK) for row in rows)
    return [
        f"## Accept balance: burst of {connections} long-lived connections",
        "",
        *_table(header, rows),
        "",
        *(footnote if old else []),
        *(FAILED_FOOTNOTE if marked else []),
    ]


def _mib(kib: int | None) -> str:
    return "-" if kib is None else f"{kib / 1024:.1f}"


def _footprintSection(results: dict[str, Any]) -> list[str]:
    footprint = results.get("footprint", {})
    rows = []
    for server, f in footprint.items():
        parent = f.get("parent", {})
        workers = f.get("workers_mem", [])
        first = workers[0] if workers else {}
        startup = f["startup_median_s"]
        rows.append(
            [
                server,
                str(f["workers"]),
                "-"
                if startup is None
                else f"{startup:.2f} ({', '.join(map(str, f['startup_s']))})",
                f"{_mib(parent.get('rss_kib'))} / {_mib(parent.get('pss_kib'))}",
                f"{_mib(first.get('rss_kib'))} / {_mib(first.get('pss_kib'))}",
            ]
        )
    reload = results.get("reload", {})
    lines = ["## Start-up, idle memory, reload", ""]
    if rows:
        header = [
            "server",
            "workers",
            "start-up s, median (all)",
            "parent RSS / PSS MiB",
            "one worker RSS / PSS MiB",
        ]
        lines += [*_table(header, rows), ""]
    return [*lines, *_reloadLines(reload), ""]


def _reloadLines(reload: dict[str, Any]) -> list[str]:
    if reload.get("seconds") is None and "load" not in reload:
        return [f"Reload: not measured ({reload.get('note', 'not run')})."]
    load = reload["load"]
    return [
        f"Reload ({reload['note']}): new generation accepting after "
        f"{reload['new_generation_ready_s']} s, old generation gone after "
        f"{reload['old_generation_gone_s']} s.  Clients meanwhile: "
        f"{load['rps']:.0f} connections/s, "
        f"{load['connect_failures']} connect failures, {load['errors']} errors, "
        f"{load['mismatches']} mismatches, {load.get('stalled', '?')} stalled, "
        f"p99 {load['p99_us'] / 1000:.1f} ms, "
        f"max {load.get('max_us', 0) / 1000:.1f} ms.",
    ]


def _healthSection(results: dict[str, Any]) -> list[str]:
    runs = results["runs"]
    keys = ("errors", "connect_failures", "mismatches", "stalled")
    totals = {k: sum(r.get(k, 0) for r in runs) for k in keys}
    lines = ["## Errors", ""]
    lines.append(
        ", ".join(f"{k}: {v}" for k, v in totals.items())
        + " over all runs (stalled: requests left without their echo for over a second"
        " when the run ended; mismatches and stalled fail the run, as does a server that"
        " exits during it)."
    )
    for r in runs:
        if any(r.get(k) for k in keys):
            counts = ", ".join(f"{k} {r[k]}" for k in keys if r.get(k))
            first = f" (first: {r['first_error']})" if r.get("first_error") else ""
            lines.append(f"- {r['server']} {r['workers']} w {r['workload']}: {counts}{first}")
    for key, server in results.get("servers", {}).items():
        prime = server.get("prime", {})
        if any(prime.get(k) for k in keys):
            counts = ", ".join(f"{k} {prime[k]}" for k in keys if prime.get(k))
            first = f" (first: {prime['first_error']})" if prime.get("first_error") else ""
            lines.append(f"- {key} prime (unmeasured): {counts}{first}")
    for failure in results.get("failures", []):
        where = f"{failure['server']} {failure.get('workers', '?')} w"
        if "round" in failure and results["settings"].get("rounds", 1) > 1:
            where += f", round {failure['round'] + 1}"
        if "workload" in failure:
            where += f" {failure['workload']}"
        elif failure.get("reload"):
            where += " reload"
        elif failure.get("startup"):
            where += " start-up"
        lines.append(f"- FAILED {where}: {failure['error'].splitlines()[0]}")
    return [*lines, ""]


def markdown(results: dict[str, Any]) -> str:
    # Here, not at the top: _targets builds on this module's Results.
    import _targets

    r = Results(results)
    lines = [*_header(results), *_targets.section(results)]
    for workload in r.workloads():
        if workload in RR_TITLES:
            lines += _throughputSection(r, workload)
    lines += _balanceSection(r, results["settings"]["burst_connections"])
    lines += _footprintSection(results)
    lines += _healthSection(results)
    return "\n".join(lines)


def plot(results: dict[str, Any], path: Path, workload: str = "rr-1k") -> None:
    """
    Requests per second against worker count, one line per server.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    r = Results(results)
    figure, axes = plt.subplots(figsize=(7, 4.5))
    failures: list[tuple[int, float]] = []
    for server in r.servers:
        points = [(w, run["rps"]) for w in r.workers if (run := r.find(server, w, workload))]
        failures += [(w, rps) for w, rps in points if r.failed(server, w, workload)]
        if points:
            xs, ys = zip(*points, strict=True)
            alone = len(points) == 1  # the single-process baseline: a star, not a line
            axes.plot(
                xs, ys, marker="*" if alone else "o", markersize=12 if alone else 6, label=server
            )
    if failures:
        # Crossed out: the point is there, but its run failed.
        xs, ys = zip(*failures, strict=True)
        axes.plot(
            xs, ys, linestyle="none", marker="x", markersize=14, color="red", label="run failed"
        )
    env = results["environment"]
    pin = results["pinning"]
    axes.set_xscale("log", base=2)
    axes.set_xticks(r.workers, [str(w) for w in r.workers])
    axes.set_xlabel("worker processes")
    axes.set_ylabel("echo round trips per second")
    axes.set_ylim(bottom=0)
    axes.set_title(
        f"{RR_TITLES[workload]}, {results['settings']['connections']} connections\n"
        f"{env['cpu_model']}; servers CPUs {pin['server_cpus']}, client CPUs {pin['client_cpus']}",
        fontsize=9,
    )
    axes.grid(True, alpha=0.3)
    if axes.get_legend_handles_labels()[0]:  # not for a run without this workload
        axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
