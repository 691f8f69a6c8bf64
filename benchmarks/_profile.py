"""
Where one maccept worker's time goes during a timed run.

The accept-path counters say how often the balance governor pauses; they
cannot say what that costs.  With C{--profile}, py-spy samples one worker's
Python stacks through the measured window, each sample is charged to the
part of the server its innermost frame belongs to (a frame that makes a
system call carries that call's time), and the report spreads the run's
measured CPU per request over those parts, so that ``even`` and ``greedy``
balancing can be compared part by part (README, Even load).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections import Counter
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
            "maccept/_protocols.py",
            "twisted/internet/tcp.py",
            "twisted/internet/abstract.py",
            "twisted/internet/posixbase.py",
            "twisted/internet/protocol.py",
            "socket.py",
        ),
        None,
    ),
)
OTHER = "other"
NAMES = (*(name for name, _, _ in PARTS), OTHER)
#: Samples a second: enough for a few thousand in a 2-second window, few
#: enough that py-spy (on the client's CPUs) reads the worker's memory
#: without slowing it measurably.
RATE = 250


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


def samplesByPart(raw: str) -> Counter[str]:
    """
    Samples per part from py-spy's raw output: one line per distinct stack,
    its frames outermost first and separated by semicolons, then a space
    and how many samples had that stack.
    """
    parts: Counter[str] = Counter()
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        parts[partOf(stack.rpartition(";")[2])] += int(count)
    return parts


class Recording:
    """
    py-spy recording one worker for a while, in the background.
    """

    def __init__(
        self, pySpy: str, pid: int, seconds: float, output: Path, preexec: Any = None
    ) -> None:
        self.output = output
        self.seconds = seconds
        output.parent.mkdir(parents=True, exist_ok=True)
        self._process = subprocess.Popen(
            [
                pySpy,
                "record",
                "--pid",
                str(pid),
                "--duration",
                str(max(1, round(seconds))),
                "--rate",
                str(RATE),
                "--format",
                "raw",
                "--nonblocking",
                "--output",
                str(output),
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            preexec_fn=preexec,
        )

    def finish(self) -> dict[str, Any]:
        """
        Wait for py-spy; the share of samples in each part, or why there
        are none.
        """
        try:
            _, errors = self._process.communicate(timeout=self.seconds + 15)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.communicate()
            return {"error": "py-spy did not finish"}
        if self._process.returncode != 0 or not self.output.exists():
            lines = [line for line in errors.splitlines() if line.strip()]
            return {"error": lines[-1] if lines else f"py-spy exited {self._process.returncode}"}
        parts = samplesByPart(self.output.read_text())
        total = sum(parts.values())
        if not total:
            return {"error": "py-spy took no samples"}
        return {
            "samples": total,
            "shares": {name: round(parts[name] / total, 4) for name in NAMES if parts[name]},
        }
