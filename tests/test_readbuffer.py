"""
A worker's 256 KiB reads come from glibc's heap, not from a fresh mapping
per read: checked in a new interpreter, by the page faults 1 KiB messages
cost before and after L{keepReadsOffMmap}.
"""

from __future__ import annotations

import json
import platform
import subprocess
import sys
from pathlib import Path

from twisted.trial.unittest import SkipTest, SynchronousTestCase

ROOT = Path(__file__).resolve().parent.parent

PROBE = """
import json, resource, socket, sys
sys.path.insert(0, sys.argv[1])
from maccept._connections import READ_SIZE, keepReadsOffMmap

a, b = socket.socketpair()

def faultsPerRead(count=2000):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(count):
        a.send(b"x" * 1024)
        b.recv(READ_SIZE)
    return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / count

first = faultsPerRead()
keepReadsOffMmap()
print(json.dumps([first, faultsPerRead()]))
"""


class ReadBufferTests(SynchronousTestCase):
    def test_readsStayOnTheHeap(self) -> None:
        """
        In a new interpreter each 256 KiB read of a 1 KiB message faults
        in fresh pages (glibc maps the buffer); once the transport module
        has primed the allocator, reads fault nothing.
        """
        if platform.libc_ver()[0] != "glibc":
            raise SkipTest("glibc's mmap threshold; other allocators differ")
        done = subprocess.run(
            [sys.executable, "-c", PROBE, str(ROOT)],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        before, after = json.loads(done.stdout)
        self.assertGreaterEqual(before, 1.0)
        self.assertLess(after, 0.1)
