"""
Build and drive C{echoload}, the benchmark's C load generator.

The client is in C because a Python client would be the bottleneck long
before the servers are: one Twisted worker answers tens of thousands of
echoes a second.  It is built with the system C compiler on first use, so
the benchmark needs no Makefile and no build step of its own.
"""

from __future__ import annotations

import json
import os
import select
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
SOURCE = HERE / "loadgen" / "echoload.c"
BUILD = HERE / "build"
BINARY = BUILD / "echoload"
CFLAGS = ["-O2", "-pthread"]


class LoadgenError(Exception):
    """
    The load generator could not be built, or a run of it failed.
    """


def compiler() -> str:
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise LoadgenError("no C compiler: install cc/gcc or set CC")
    return cc


def build() -> Path:
    """
    Compile C{echoload} unless the binary is newer than its source.
    """
    if BINARY.exists() and BINARY.stat().st_mtime >= SOURCE.stat().st_mtime:
        return BINARY
    BUILD.mkdir(parents=True, exist_ok=True)
    command = [compiler(), *CFLAGS, "-o", str(BINARY), str(SOURCE)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise LoadgenError(f"{' '.join(command)} failed:\n{done.stderr}")
    return BINARY


def compilerVersion() -> str:
    done = subprocess.run([compiler(), "--version"], capture_output=True, text=True, check=False)
    return done.stdout.splitlines()[0] if done.stdout else "unknown"


@dataclass(frozen=True)
class Load:
    """
    One run of the load generator; see the usage text in echoload.c.
    """

    mode: str
    port: int
    connections: int
    threads: int
    duration: float
    warmup: float = 0.0
    size: int | None = None
    sources: int = 16
    host: str = "127.0.0.1"

    def command(self) -> list[str]:
        args = [
            str(BINARY),
            "-m",
            self.mode,
            "-c",
            str(self.connections),
            "-t",
            str(self.threads),
            "-d",
            str(self.duration),
            "-w",
            str(self.warmup),
            "-a",
            str(self.sources),
        ]
        if self.size is not None:
            args += ["-s", str(self.size)]
        return [*args, f"{self.host}:{self.port}"]

    @property
    def timeout(self) -> float:
        """
        The longest a run may take: measured time plus generous slack for
        connecting and for a server that stalls.
        """
        return self.warmup + self.duration + 30.0


def pinnedTo(cpus: set[int]) -> Callable[[], None]:
    """
    A C{preexec_fn} that moves the child onto C{cpus}.
    """
    return lambda: os.sched_setaffinity(0, cpus)


def _parse(stdout: str, load: Load) -> dict[str, Any]:
    try:
        result: dict[str, Any] = json.loads(stdout.strip().splitlines()[-1])
    except (IndexError, ValueError) as e:
        raise LoadgenError(f"{' '.join(load.command())}: no JSON in {stdout!r}") from e
    return result


def run(load: Load, cpus: set[int]) -> dict[str, Any]:
    """
    Run C{load} on C{cpus} to the end and return its JSON report.
    """
    done = subprocess.run(
        load.command(),
        capture_output=True,
        text=True,
        timeout=load.timeout,
        check=False,
        preexec_fn=pinnedTo(cpus),
    )
    if done.returncode not in (0, 1):  # 1: mismatches or stalls, reported in the JSON
        raise LoadgenError(f"{' '.join(load.command())} exited {done.returncode}: {done.stderr}")
    return _parse(done.stdout, load)


class Background:
    """
    A load generator run in the background, for measurements that act on
    the server while the load runs: count a burst's connections, reload.
    """

    def __init__(self, load: Load, cpus: set[int]) -> None:
        self.load = load
        self.process = subprocess.Popen(
            load.command(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            preexec_fn=pinnedTo(cpus),
        )
        #: stderr read so far and not yet taken as lines.
        self._pending = b""

    def waitOpen(self) -> int:
        """
        Burst mode: block until every connect has finished (the client's
        "# open N" line on stderr); return how many succeeded.
        """
        return self._waitFor("# open ")

    def waitServed(self) -> int:
        """
        Burst mode, after L{waitOpen}: block until every connection has had
        its byte echoed or failed ("# served N"); return how many were
        echoed.
        """
        return self._waitFor("# served ")

    def _waitFor(self, prefix: str) -> int:
        """
        Read the client's stderr up to a line starting with C{prefix} and
        return its number.  From the descriptor, not the pipe's file object:
        two lines written together would otherwise both sit in the file's
        buffer after the first readline, where select() cannot see them.
        """
        assert self.process.stderr is not None
        fd = self.process.stderr.fileno()
        deadline = time.monotonic() + self.load.timeout
        other: list[str] = []
        while time.monotonic() < deadline:
            line, newline, rest = self._pending.partition(b"\n")
            if newline:
                self._pending = rest
                if line.startswith(prefix.encode()):
                    return int(line.split()[2])
                other.append(line.decode(errors="replace"))
                continue
            ready, _, _ = select.select([fd], [], [], 0.1)
            if ready:
                chunk = os.read(fd, 4096)
                if not chunk:
                    break
                self._pending += chunk
        command = " ".join(self.load.command())
        said = "; it said: " + " | ".join(other[-5:]) if other else ""
        raise LoadgenError(f"burst never reported {prefix.strip('# ')!r}: {command}{said}")

    def finish(self, early: bool = False) -> dict[str, Any]:
        """
        Wait for the run to end, or with C{early} end it now (SIGTERM makes
        the client report and exit), and return its report.  A client that
        overruns its time is killed.
        """
        if early and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            stdout, _ = self.process.communicate(timeout=self.load.timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            stdout, _ = self.process.communicate()
        return _parse(stdout, self.load)
