"""
Client load for lifecycle tests: connection churn and long-lived streams,
each checking every byte and recording every failure.  Bounded: each runs
until told to stop, or for at most C{limit} seconds.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Iterable


class _Load(threading.Thread):
    def __init__(self, host: str, port: int, limit: float = 120.0) -> None:
        super().__init__(daemon=True)
        self.address = (host, port)
        self.limit = limit
        self.stopping = threading.Event()
        self.ok = 0
        self.errors: list[str] = []

    def stop(self) -> None:
        self.stopping.set()
        self.join(30)

    def running(self, started: float) -> bool:
        return not self.stopping.is_set() and time.monotonic() - started < self.limit


def stopAll(loads: Iterable[_Load]) -> None:
    """
    Stop each of C{loads}, in order (a test's cleanup).
    """
    for load in loads:
        load.stop()


def _recvExactly(sock: socket.socket, size: int) -> bytes:
    chunks = []
    while size:
        data = sock.recv(size)
        if not data:
            raise ConnectionError("closed early")
        chunks.append(data)
        size -= len(data)
    return b"".join(chunks)


class Churn(_Load):
    """
    Connect, send 64 random bytes, read them back, close; again and again.
    """

    def run(self) -> None:
        started = time.monotonic()
        while self.running(started):
            payload = os.urandom(64)
            try:
                with socket.create_connection(self.address, timeout=10) as s:
                    s.sendall(payload)
                    if _recvExactly(s, 64) != payload:
                        self.errors.append("altered echo")
                        continue
                self.ok += 1
            except OSError as e:
                self.errors.append(repr(e))


class Stream(_Load):
    """
    One long-lived connection streaming 16 KiB blocks and checking each
    echo, until stopped.
    """

    def run(self) -> None:
        started = time.monotonic()
        try:
            with socket.create_connection(self.address, timeout=10) as s:
                while self.running(started):
                    block = os.urandom(16384)
                    s.sendall(block)
                    if _recvExactly(s, len(block)) != block:
                        self.errors.append("altered echo")
                        return
                    self.ok += 1
        except OSError as e:
            self.errors.append(repr(e))
