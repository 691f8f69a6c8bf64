"""
Issue 5's scaling targets, judged from one run's results.json.

The targets are only meaningful on a machine where the servers have CPUs
of their own, so a run says for itself which it met, which it missed, and
which it could not test (client and server sharing CPUs, a worker count
beyond the server's CPUs, a competitor not run), rather than leaving the
reader to do the arithmetic across tables.

The targets (request/response with 1 KiB messages over 256 connections
unless said):

- W workers give at least 0.9 x W x the 1-worker rate, for W up to the
  server's CPUs;
- connection churn scales by the same measure;
- 1 worker does at least as well as the plain recipe's 1 worker;
- at W = the server's CPUs (8 on 8), ahead of asyncio with as many
  processes;
- p99 latency at each W no worse than the recipe's (each side's median p99
  over the rounds, not the p99 of its median run by rate).

No target passes on a cell whose runs failed (wrong or missing echoes, a
server that exited): one of maccept's misses it, one of a competitor's
leaves it not tested.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from _report import CLIENT_BOUND, Results, runFailed
from _system import parseCpus

#: The least share of linear scaling that counts as scaling.
SCALING = 0.9


def _count(n: int, noun: str, plural: str = "") -> str:
    return f"{n} {noun if n == 1 else plural or noun + 's'}"


@dataclass
class Verdict:
    target: str
    measured: str
    verdict: str  # "met", "missed", "not tested"
    note: str = ""
    #: Whether the target is about using more CPUs, which a run whose
    #: server and client share CPUs cannot test.
    scaling: bool = False
    #: Whether a cell it rests on failed: the verdict stands whatever the CPUs.
    failed: bool = False


def _failed(
    runs: Results, target: str, workload: str, *cells: tuple[str, int], scaling: bool = False
) -> Verdict | None:
    """
    The verdict on C{target} when a cell (server, workers) it rests on
    failed: missed when it is maccept's, since a server that fails meets no
    target, else not tested; None when none failed.
    """
    failed = [(server, w) for server, w in cells if runs.failed(server, w, workload)]
    if not failed:
        return None
    names = ", ".join(f"{server} {w} w" for server, w in failed)
    verdict = "missed" if any(server == "maccept" for server, _ in failed) else "not tested"
    note = f"{workload} run failed: {names} (Errors, below)"
    return Verdict(target, "-", verdict, note, scaling=scaling, failed=True)


def _clientNote(*runs: dict[str, Any] | None) -> str:
    busy = [r["client_busy"] for r in runs if r is not None and "client_busy" in r]
    if busy and max(busy) >= CLIENT_BOUND:
        return f"load generator {max(busy):.0%} busy: the client may have set the pace"
    return ""


def _notRun(*sides: tuple[str, dict[str, Any] | None]) -> str:
    """
    "maccept not run", "maccept and recipe not run", or "" if both ran.
    """
    missing = " and ".join(name for name, run in sides if run is None)
    return f"{missing} not run" if missing else ""


def _scaling(runs: Results, workload: str, workers: list[int], serverCpus: int) -> list[Verdict]:
    verdicts = []
    one = runs.find("maccept", 1, workload)
    for w in workers:
        if w == 1:
            continue
        target = f"{workload}: {w} workers >= {SCALING} x {w} x 1 worker"
        many = runs.find("maccept", w, workload)
        if w > serverCpus:
            note = f"only {_count(serverCpus, 'server CPU')}"
            verdicts.append(Verdict(target, "-", "not tested", note, scaling=True))
            continue
        broken = _failed(runs, target, workload, ("maccept", 1), ("maccept", w), scaling=True)
        if broken is not None:
            verdicts.append(broken)
            continue
        ratio = runs.scaling("maccept", workload, w)
        if ratio is None or one is None or many is None:
            verdicts.append(Verdict(target, "-", "not tested", "not run"))
            continue
        verdicts.append(
            Verdict(
                target,
                f"{ratio:.2f} ({many['rps'] / 1000:.1f}k against {w} x {one['rps'] / 1000:.1f}k)",
                "met" if ratio >= SCALING else "missed",
                _clientNote(one, many),
                scaling=True,
            )
        )
    return verdicts


def _ahead(runs: Results, mine: str, theirs: str, workers: int, target: str) -> Verdict:
    a, b = runs.find(mine, workers, "rr-1k"), runs.find(theirs, workers, "rr-1k")
    broken = _failed(runs, target, "rr-1k", (mine, workers), (theirs, workers))
    if broken is not None:
        return broken
    ratio = runs.ratio(mine, theirs, workers, "rr-1k")
    if ratio is None or a is None or b is None:
        return Verdict(
            target, "-", "not tested", _notRun((mine, a), (theirs, b)) or f"{theirs} not run"
        )
    measured = f"{ratio:.2f} x ({a['rps'] / 1000:.1f}k against {b['rps'] / 1000:.1f}k)"
    if "server_cpu_us_per_request" in a and "server_cpu_us_per_request" in b:
        measured += (
            f"; CPU per request {a['server_cpu_us_per_request']:.1f} against "
            f"{b['server_cpu_us_per_request']:.1f} µs"
        )
    return Verdict(target, measured, "met" if ratio >= 1 else "missed", _clientNote(a, b))


def _latency(runs: Results, workers: list[int]) -> list[Verdict]:
    verdicts = []
    for w in workers:
        target = f"rr-1k: p99 at {w} worker{'s' if w > 1 else ''} <= the recipe's"
        broken = _failed(runs, target, "rr-1k", ("maccept", w), ("recipe", w))
        if broken is not None:
            verdicts.append(broken)
            continue
        a, b = (
            runs.median("maccept", w, "rr-1k", "p99_us"),
            runs.median("recipe", w, "rr-1k", "p99_us"),
        )
        if a is None or b is None:
            notRun = _notRun(
                ("maccept", runs.find("maccept", w, "rr-1k")),
                ("recipe", runs.find("recipe", w, "rr-1k")),
            )
            verdicts.append(Verdict(target, "-", "not tested", notRun))
            continue
        measured = f"{a / 1000:.2f} against {b / 1000:.2f} ms"
        verdicts.append(Verdict(target, measured, "met" if a <= b else "missed"))
    return verdicts


def judge(results: dict[str, Any]) -> list[Verdict]:
    """
    Every target, with what this run measured and whether it was met.
    """
    runs = Results(results)
    workers: list[int] = results["settings"]["workers"]
    pinning = results["pinning"]
    serverCpus = len(parseCpus(pinning["server_cpus"]))
    verdicts = [
        *_scaling(runs, "rr-1k", workers, serverCpus),
        *_scaling(runs, "churn", workers, serverCpus),
        _ahead(runs, "maccept", "recipe", 1, "rr-1k: 1 worker >= the recipe's 1 worker"),
    ]
    full = max((w for w in workers if w <= serverCpus), default=1)
    target = (
        f"rr-1k: {_count(full, 'worker')} on {_count(serverCpus, 'CPU')} ahead of asyncio "
        f"with {_count(full, 'process', 'processes')}"
    )
    versusAsyncio = _ahead(runs, "maccept", "asyncio", full, target)
    versusAsyncio.scaling = True
    verdicts.append(versusAsyncio)
    if pinning.get("overlap"):
        # Scaling needs CPUs of the server's own; the comparisons at one
        # worker count hold either way (both sides met the same client).
        for verdict in verdicts:
            if verdict.scaling and verdict.verdict != "not tested" and not verdict.failed:
                verdict.verdict, verdict.note = "not tested", "server and client share CPUs"
    return [*verdicts, *_latency(runs, workers)]


def _shortCells(results: dict[str, Any]) -> list[str]:
    """
    The rr-1k and churn cells that ran fewer rounds than asked, or whose
    runs failed in some of them (but not all: then the cell is marked), as
    "maccept 2 w churn (2 of 3)".
    """
    rounds = results["settings"].get("rounds", 1)
    counted: dict[tuple[str, int, str], int] = {}
    for run in results["runs"]:
        if run["workload"] in ("rr-1k", "churn") and not runFailed(run):
            key = (run["server"], run["workers"], run["workload"])
            counted[key] = counted.get(key, 0) + 1
    return [
        f"{server} {workers} w {workload} ({count} of {rounds})"
        for (server, workers, workload), count in sorted(counted.items())
        if count < rounds
    ]


def section(results: dict[str, Any]) -> list[str]:
    """
    The targets as a Markdown section.
    """
    verdicts = judge(results)
    lines = [
        "## Targets (issue 5)",
        "",
        "| target | measured | verdict |",
        "|---|---|---|",
    ]
    for v in verdicts:
        verdict = v.verdict + (f" ({v.note})" if v.note else "")
        lines.append(f"| {v.target} | {v.measured} | {verdict} |")
    counts = {
        k: sum(1 for v in verdicts if v.verdict == k) for k in ("met", "missed", "not tested")
    }
    lines += ["", ", ".join(f"{n} {k}" for k, n in counts.items()) + ".", ""]
    short = _shortCells(results)
    if short:
        lines += [
            "Cells that lost a round (a failure below), whose median is then the lower of "
            "the runs left, which can move a verdict: " + ", ".join(short) + ".",
            "",
        ]
    if results["pinning"].get("overlap"):
        lines += [
            "Server and client share CPUs in this run, so it cannot test scaling: run on a "
            "machine with separate CPU sets for that.",
            "",
        ]
    return lines
