"""
Run the real C{twistd -n maccept} for integration tests, and look at it
from outside: its workers, its log, which process owns which connection.

Every server is started in a process group of its own and stopped by pid,
then by that group, so a test never leaves a process behind.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from prometheus_client.parser import text_string_to_metric_families

from maccept.testing import childrenOf, groupMembers

TWISTD = str(Path(sys.executable).with_name("twistd"))
READY = re.compile(r"all (\d+) workers ready on (.+)$", re.M)
HERE = Path(__file__).resolve().parent

T = TypeVar("T")


def waitFor(predicate: Callable[[], T], timeout: float = 20.0, what: str = "") -> T:
    """
    Poll C{predicate} until it returns something true; fail after C{timeout}
    seconds (a bound on a hang, not a speed requirement).
    """
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or predicate}")
        time.sleep(0.05)


def alive(pid: int) -> bool:
    """
    Whether C{pid} is a running process (a zombie counts as gone).
    """
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def socketInodes(pid: int) -> set[int]:
    """
    Inodes of the sockets C{pid} holds open.
    """
    inodes = set()
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(int(target[8:-1]))
    except OSError:
        pass
    return inodes


def serverSideInodes(serverPort: int) -> dict[int, int]:
    """
    Map each client port connected to C{serverPort} on IPv4 loopback to the
    inode of the server's socket for that connection (from /proc/net/tcp).
    """
    mapping = {}
    with open("/proc/net/tcp") as f:
        next(f)
        for line in f:
            fields = line.split()
            local, remote, state, inode = fields[1], fields[2], fields[3], int(fields[9])
            if state != "01":  # ESTABLISHED
                continue
            if int(local.split(":")[1], 16) == serverPort and inode:
                mapping[int(remote.split(":")[1], 16)] = inode
    return mapping


class MacceptServer:
    """
    One C{twistd -n maccept} process, its log in a file.
    """

    def __init__(
        self,
        args: Sequence[str] = (),
        twistdArgs: Sequence[str] = (),
        env: dict[str, str] | None = None,
        passFds: Sequence[int] = (),
        twistd: Sequence[str] = (TWISTD,),
        cwd: str | None = None,
        runner: Sequence[str] | None = None,
    ) -> None:
        """
        C{twistd} is the command that runs twistd; the repository goes on the
        front of C{PYTHONPATH} unless C{env} sets C{PYTHONPATH} itself.  It
        runs in C{cwd}, by default the temporary directory.  C{runner}, if
        given, runs the plugin instead of C{twistd -n} (C{python -m twisted}).
        """
        self.args = list(args)
        self.logFile = tempfile.NamedTemporaryFile(  # noqa: SIM115 (closed in cleanup)
            prefix="maccept-", suffix=".log", delete=False
        )
        fullEnv = {**os.environ, **(env or {})}
        if "PYTHONPATH" not in (env or {}):
            fullEnv["PYTHONPATH"] = os.pathsep.join(
                [str(HERE.parent), fullEnv.get("PYTHONPATH", "")]
            )
        self.process = subprocess.Popen(
            [*(runner or (*twistd, "-n", "--pidfile=", *twistdArgs)), "maccept", *self.args],
            stdout=self.logFile,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=cwd or tempfile.gettempdir(),
            env=fullEnv,
            pass_fds=passFds,
            start_new_session=True,
        )
        self.pid = self.process.pid
        self.addresses: list[str] = []

    def log(self) -> str:
        return Path(self.logFile.name).read_text(errors="replace")

    def waitReady(self, timeout: float = 30.0) -> MacceptServer:
        def ready() -> re.Match[str] | None:
            if self.process.poll() is not None:
                raise AssertionError(f"maccept exited early:\n{self.log()}")
            return READY.search(self.log())

        match = waitFor(ready, timeout, "all workers ready")
        assert isinstance(match, re.Match)
        self.addresses = match.group(2).split()
        return self

    @property
    def port(self) -> int:
        return int(self.addresses[0].rsplit(":", 1)[1])

    def workers(self) -> list[int]:
        return childrenOf(self.pid)

    def connect(self, address: str | None = None) -> socket.socket:
        address = address or self.addresses[0]
        if address.startswith("/"):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(address)
            return s
        host, port = address.rsplit(":", 1)
        return socket.create_connection((host.strip("[]"), int(port)), timeout=10)

    def stop(self, timeout: float = 20.0) -> int:
        """
        SIGTERM the parent and wait; then make sure nothing of the group is
        left.  Returns the parent's exit status.
        """
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.cleanup()
        return self.process.returncode

    def cleanup(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pid, signal.SIGKILL)
        if self.process.poll() is None:
            self.process.wait()
        if not self.logFile.closed:
            self.logFile.close()
            os.unlink(self.logFile.name)


def withoutBindCapability() -> None:
    """
    For C{preexec_fn}: drop C{CAP_NET_BIND_SERVICE} from the bounding set,
    so that even root cannot bind a port below 1024 after C{exec}.
    """
    import ctypes

    PR_CAPBSET_DROP, CAP_NET_BIND_SERVICE = 24, 10
    if ctypes.CDLL(None).prctl(PR_CAPBSET_DROP, CAP_NET_BIND_SERVICE, 0, 0, 0) != 0:
        raise OSError("prctl(PR_CAPBSET_DROP) failed")


def runMaccept(
    args: Sequence[str],
    timeout: float = 30.0,
    preexec: Callable[[], None] | None = None,
) -> subprocess.CompletedProcess[str]:
    """
    Run C{twistd -n maccept ARGS} to completion (for start-up failures) and
    check that it left no process of its group behind.
    """
    process = subprocess.Popen(
        [TWISTD, "-n", "--pidfile=", "maccept", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
        cwd=tempfile.gettempdir(),
        env={**os.environ, "PYTHONPATH": str(HERE.parent)},
        start_new_session=True,
        preexec_fn=preexec,
    )
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    finally:
        leftovers = groupMembers(process.pid)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    assert not leftovers, f"processes left behind: {leftovers}"
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def closeAll(sockets: Iterable[socket.socket]) -> None:
    """
    Close each of C{sockets}, in order (a test's cleanup).
    """
    for s in sockets:
        s.close()


def echoRoundTrip(sock: socket.socket, payload: bytes) -> bytes:
    """
    Send C{payload}, half-close, and read everything echoed back.
    """
    sock.sendall(payload)
    sock.shutdown(socket.SHUT_WR)
    chunks: list[bytes] = []
    while True:
        data = sock.recv(65536)
        if not data:
            return b"".join(chunks)
        chunks.append(data)


METRICS_AT = re.compile(r"--metrics \S+: listening on (http://\S+/)")


def metric(server: MacceptServer, name: str, **labels: str) -> float:
    """
    The value of the sample C{name} (with C{labels}, if given) on the
    server's C{/metrics} (started with C{--metrics}).
    """
    import urllib.request

    match = METRICS_AT.search(server.log())
    assert match is not None, "the server has no --metrics"
    with urllib.request.urlopen(match.group(1) + "metrics", timeout=10) as response:
        text = response.read().decode()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and labels.items() <= sample.labels.items():
                return float(sample.value)
    raise AssertionError(f"no {name} in /metrics")


def takenPort(test: Any) -> int:
    """
    A loopback TCP port some other socket listens on, for the duration of
    C{test}.
    """
    taken = socket.socket()
    test.addCleanup(taken.close)
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port: int = taken.getsockname()[1]
    return port


def freePort() -> int:
    """
    A loopback TCP port nothing listens on right now.
    """
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def killGroup(pgid: int) -> None:
    """
    Kill what is left of process group C{pgid} (a daemon's, or a new
    parent's: it stays in its old parent's group).
    """
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGKILL)
