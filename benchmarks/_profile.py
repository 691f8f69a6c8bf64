"""
Where maccept's workers spend their time during a timed run.

The accept-path counters say how often the balance governor pauses; they
cannot say what that costs.  With C{--profile}, py-spy samples the Python
stacks of every worker through the measured window, each sample is charged
to the part of the server its innermost frame belongs to (a frame that
makes a system call carries that call's time), and each worker's CPU time
is spread over the parts in the shares of its own samples, so that
``even`` and ``greedy`` balancing can be compared part by part (README,
Even load).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

#: The parts of a worker: a name, the files of its frames, and (for a part
#: that is one function of such a file) the function's name; the first part
#: that matches the innermost frame takes the sample.
PARTS: tuple[tuple[str, tuple[str, ...], str | None], ...] = (
    ("governor", ("maccept/_accepting.py", "maccept/_board.py"), None),
    ("accept loop", ("maccept/_acceptloop.py",), None),
    # epoll_wait and the loop over the events it returns.
    ("poll", ("maccept/_reactor.py", "twisted/internet/epollreactor.py"), "doPoll"),
    # Timers, the loop around the poll, and epoll_ctl as readers come and go.
    (
        "reactor",
        (
            "maccept/_reactor.py",
            "twisted/internet/base.py",
            "twisted/internet/epollreactor.py",
            "twisted/internet/task.py",
        ),
        None,
    ),
    (
        "connections",
        (
            "maccept/_connections.py",
            "maccept/_builtins.py",
            "maccept/_protocols.py",
            "twisted/internet/tcp.py",
            "twisted/internet/abstract.py",
            "twisted/internet/posixbase.py",
            "twisted/internet/protocol.py",
            "twisted/internet/_newtls.py",
            "twisted/internet/unix.py",
            "twisted/internet/address.py",
            "twisted/python/util.py",
            "twisted/python/failure.py",
            "socket.py",
        ),
        None,
    ),
)
OTHER = "other"
NAMES = (*(name for name, _, _ in PARTS), OTHER)
#: Samples a second per worker: 500 of each in a 2-second window, few
#: enough that py-spy reads a worker's memory without slowing it measurably.
#: py-spy itself runs on the client's CPUs and costs them about a tenth of a
#: CPU per worker sampled, so a profiled run leaves the client a little less.
RATE = 250
#: The frame py-spy puts before a process's own frames with --subprocesses.
_PROCESS = re.compile(r'process (\d+):".*"')


def findPySpy(given: str) -> str:
    """
    The py-spy to run: C{given} as a path or a name on C{PATH}, or the one
    installed beside this interpreter.

    @raise SystemExit: if there is none.
    """
    found = shutil.which(given) or shutil.which(given, path=str(Path(sys.executable).parent))
    if found is None:
        raise SystemExit(f"benchmark: --profile: no py-spy at {given!r} (pip install py-spy)")
    return found


def cannotProfile(pySpy: str) -> str | None:
    """
    Why C{pySpy} cannot read a process here (it needs the right to trace
    it: root, or C{kernel.yama.ptrace_scope} 0), tried on this process; or
    C{None} if it can.
    """
    try:
        done = subprocess.run(
            [pySpy, "dump", "--pid", str(os.getpid()), "--nonblocking"],
            capture_output=True,
            text=True,
            timeout=30,
            env=_quiet(),
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"{pySpy}: {e}"
    return None if done.returncode == 0 else _errorLine(done.stderr, done.returncode)


def _quiet() -> dict[str, str]:
    # A backtrace would bury py-spy's one line of error.
    return {**os.environ, "RUST_BACKTRACE": "0"}


def _errorLine(stderr: str, returncode: int) -> str:
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    said = [line for line in lines if line.startswith(("Error", "Permission"))]
    return (said or lines or [f"py-spy exited {returncode}"])[0]


def partOf(frame: str) -> str:
    """
    The part of the server a py-spy frame (C{"function (file.py:line)"})
    belongs to.
    """
    function, _, location = frame.rpartition(" (")
    where = location.rstrip(")").rpartition(":")[0]
    for name, files, only in PARTS:
        if only is not None and function.rpartition(".")[2] != only:
            continue
        if any(where == f or where.endswith("/" + f) for f in files):
            return name
    return OTHER


def samplesByProcess(raw: str) -> dict[int, Counter[str]]:
    """
    Samples per process and part from py-spy's raw output with
    C{--subprocesses}: one line per distinct stack, its frames outermost
    first and separated by semicolons (the first ones C{process PID:"..."},
    the innermost of them the sampled process), then a space and how many
    samples had that stack.  A sample with no Python frame counts as other.
    """
    processes: dict[int, Counter[str]] = {}
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        frames = stack.split(";") if stack.strip() else []
        pid = 0
        python = []
        for frame in frames:
            header = _PROCESS.fullmatch(frame)
            if header:
                pid = int(header.group(1))
            else:
                python.append(frame)
        part = partOf(python[-1]) if python else OTHER
        processes.setdefault(pid, Counter())[part] += int(count)
    return processes


def spread(
    processes: dict[int, Counter[str]], cpuSeconds: dict[int, float], requests: int
) -> dict[str, Any]:
    """
    Each worker's CPU seconds spread over the parts in the shares of its
    own samples, summed over the workers, per request: µs of CPU per
    request in each part.  A worker py-spy took no samples of is counted
    as unsampled.
    """
    perPart: dict[str, float] = dict.fromkeys(NAMES, 0.0)
    unsampled = 0.0
    samples = 0
    for pid, seconds in cpuSeconds.items():
        parts = processes.get(pid)
        total = sum(parts.values()) if parts else 0
        if not parts or not total:
            unsampled += seconds
            continue
        samples += total
        for name, count in parts.items():
            perPart[name] = perPart.get(name, 0.0) + seconds * count / total
    scale = 1e6 / requests if requests else 0.0
    return {
        "samples": samples,
        "us_per_request": {
            name: round(perPart[name] * scale, 2) for name in NAMES if perPart[name]
        },
        "unsampled_us_per_request": round(unsampled * scale, 2),
    }


class Recording:
    """
    py-spy recording a server's workers (the children of C{pid}) from now
    until L{stop}, in the background.
    """

    def __init__(
        self,
        pySpy: str,
        pid: int,
        output: Path,
        preexec: Callable[[], None] | None = None,
    ) -> None:
        self.output = output
        self.error: str | None = None
        self._process: subprocess.Popen[bytes] | None = None
        output.parent.mkdir(parents=True, exist_ok=True)
        # A file, not a pipe: py-spy's warnings over a long window must not
        # fill a pipe that nobody reads until the end.
        self._errors = output.with_suffix(".stderr")
        command = [pySpy, "record", "--pid", str(pid), "--subprocesses", "--rate", str(RATE)]
        command += ["--format", "raw", "--nonblocking", "--output", str(output)]
        try:
            with self._errors.open("wb") as errors:
                self._process = subprocess.Popen(
                    command,
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    stderr=errors,
                    preexec_fn=preexec,
                    env=_quiet(),
                )
        except OSError as e:
            self.error = f"{pySpy}: {e}"

    def stop(self) -> dict[int, Counter[str]] | str:
        """
        Stop sampling (py-spy writes what it took when interrupted); the
        samples per process and part, or why there are none.
        """
        process = self._process
        if process is None:
            return self.error or "py-spy did not start"
        if process.poll() is None:
            process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            return "py-spy did not stop"
        if not self.output.exists():
            errors = self._errors.read_text(errors="replace")
            return _errorLine(errors, process.returncode)
        try:
            processes = samplesByProcess(self.output.read_text(errors="replace"))
        except ValueError as e:
            return f"py-spy's samples could not be read: {e}"
        return processes or "py-spy took no samples"
