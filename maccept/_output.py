# -*- test-case-name: tests.test_command_line -*-
"""
Printing to an output whose reader may have gone (C{| head}): the command
ends there, quietly, as other tools do, not with a traceback.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator


def dropStdout() -> None:
    """
    Point standard output at C{/dev/null}, so that the interpreter's last
    flush at exit does not fail on the closed pipe too.
    """
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


@contextlib.contextmanager
def endsQuietlyIfClosed() -> Iterator[None]:
    """
    Run a block that prints (and may exit, as C{--help} does); should the
    output's reader have gone, exit with status 0 and no traceback.
    """
    try:
        try:
            yield
        finally:
            sys.stdout.flush()
    except BrokenPipeError:
        dropStdout()
        raise SystemExit(0) from None
