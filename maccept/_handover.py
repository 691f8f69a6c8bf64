# -*- test-case-name: tests.test_upgrade_unit,tests.test_options -*-
"""
The new parent's side of an upgrade (SIGUSR2); the old parent's is
L{maccept._upgrade}.  The new parent finds the sockets the old one handed
over in L{INHERIT}, and talks to it on a pipe: it says C{hello} as soon as
it runs maccept's code, and C{serving} once its workers all accept
(L{takeOver}).  Standard library only: the twistd plugin greets from here
before anything heavy is imported, to keep short the moment in which a new
parent cannot yet be told from one of older code (which hands over with
SIGTERM, and says nothing).

C{MACCEPT_UPGRADE_PIPE} is C{OLDPID:FD}: a parent of older code keeps the
variable it was given in its environment and passes it on, so the pid
says which old parent the descriptor leads to, and a stale one is ignored.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
from collections.abc import Mapping, MutableMapping
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from twisted.logger import Logger

#: What the old parent tells the new one: the sockets it hands over, by
#: description, as JSON (C{[{"fd": FD, "description": DESCRIPTION}]}).
INHERIT = "MACCEPT_INHERIT"
#: The old parent's pid, which the new one stops once its workers accept.
UPGRADE_FROM = "MACCEPT_UPGRADE_FROM"
#: C{OLDPID:FD}: where the new parent writes its lines.
UPGRADE_PIPE = "MACCEPT_UPGRADE_PIPE"
#: How many workers the old parent ran (after TTIN, TTOU or maccept-ctl
#: scale), which the new one runs instead of its --workers.
UPGRADE_WORKERS = "MACCEPT_UPGRADE_WORKERS"
HELLO = b"hello"
SERVING = b"serving"
#: Before a line that says why the new parent gives up (its command line
#: refused, say), which a daemon's standard error would lose.
ERROR = b"error "


def pipeValue(fd: int) -> str:
    """
    L{UPGRADE_PIPE}'s value for this process's pipe at C{fd}.
    """
    return f"{os.getpid()}:{fd}"


def oldParentOffersPipe(environ: Mapping[str, str]) -> bool:
    """
    Whether the old parent named by L{UPGRADE_FROM} runs this code: it set
    L{UPGRADE_PIPE} itself (one of older code passes on a stale one, with
    another pid), and with it L{UPGRADE_WORKERS}.
    """
    old = environ.get(UPGRADE_PIPE, "").partition(":")[0]
    return bool(old) and old == environ.get(UPGRADE_FROM)


def pipeToOldParent(environ: Mapping[str, str]) -> int | None:
    """
    The descriptor of the pipe to the old parent named by L{UPGRADE_FROM},
    or C{None} if that parent offered none (older code, or no upgrade), or
    this process is not its child: the new parent's workers inherit the
    variables, not the descriptor, and its number may be another file there.
    """
    fd = environ.get(UPGRADE_PIPE, "").partition(":")[2]
    if oldParentOffersPipe(environ) and environ[UPGRADE_FROM] == str(os.getppid()):
        return int(fd) if fd.isdigit() else None
    return None


def workersAfterUpgrade(environ: MutableMapping[str, str], wanted: int) -> int:
    """
    In a new parent: the pool size the old parent ran, which a scale made
    since the command line's --workers (a HUP keeps it; so does USR2);
    C{wanted} without an upgrade.  Forgotten once read.
    """
    size = environ.pop(UPGRADE_WORKERS, "")
    if oldParentOffersPipe(environ) and size.isdigit() and int(size) > 0:
        return int(size)
    return wanted


def greetOldParent(environ: Mapping[str, str] = os.environ) -> None:
    """
    In a new parent, as early as it can: tell the old one that this parent
    will say when it serves, so that a stop the old one gets before then
    is a stop (of both), not the hand-over.  (Said twice, it means the
    same.)
    """
    _tellOldParent(HELLO, environ)


def tellOldParentWhy(message: str, environ: Mapping[str, str] = os.environ) -> None:
    """
    In a new parent about to exit on an error: tell the old parent why, so
    that its log says so (a daemon's standard error goes nowhere).
    """
    line = " ".join(message.split())[:500]
    _tellOldParent(ERROR + line.encode(errors="replace"), environ)


def _tellOldParent(line: bytes, environ: Mapping[str, str]) -> None:
    # Nothing to tell without a pipe (no upgrade, or an old parent of older
    # code); the old parent may be gone (EPIPE): nothing to tell either.
    fd = pipeToOldParent(environ)
    if fd is None:
        return
    with contextlib.suppress(OSError):
        os.write(fd, line + b"\n")


def inheritedListeners(environ: MutableMapping[str, str] = os.environ) -> dict[str, int]:
    """
    In a new parent: the sockets the old parent handed over, by description
    (a listener's, or a service port's label such as C{--metrics DESC}; and
    forget them, so that this parent's own children do not inherit
    the claim).
    """
    return _handedOver(environ.pop(INHERIT, None))


def inheritedDescriptions(environ: Mapping[str, str] = os.environ) -> list[str]:
    """
    In a new parent, before L{inheritedListeners} takes them: what the old
    parent handed over.
    """
    return list(_handedOver(environ.get(INHERIT)))


class HandOverError(ValueError):
    """
    L{INHERIT} holds something no old parent writes.
    """


def _handedOver(raw: str | None) -> dict[str, int]:
    """
    L{INHERIT}'s value: descriptors by description.

    @raise HandOverError: if it is not what an old parent writes.
    """
    if not raw:
        return {}
    try:
        return {str(each["description"]): int(each["fd"]) for each in json.loads(raw)}
    except (ValueError, TypeError, KeyError) as e:
        raise HandOverError(
            f"{INHERIT} is not a hand-over from an old parent ({type(e).__name__}: {e}); unset it"
        ) from None


def takeOver(environ: MutableMapping[str, str], log: Logger) -> None:
    """
    In a new parent whose workers all accept: tell the old parent, which
    then stops (and forget the upgrade, so that this parent's next workers
    do not inherit it).
    """
    pipe, offered = pipeToOldParent(environ), oldParentOffersPipe(environ)
    old = environ.pop(UPGRADE_FROM, "")
    environ.pop(UPGRADE_PIPE, None)
    if not old.isdigit():
        return
    if pipe is None and (offered or int(old) != os.getppid()):
        # Not this process's parent (any more): gone, or never the one that
        # started it (a stray variable).  The pid may be another process's,
        # not to be signalled.
        log.warn("upgrade: serving; the old parent (pid {pid}) has gone already", pid=old)
        return
    try:
        if pipe is not None:
            try:
                os.write(pipe, SERVING + b"\n")
            finally:
                os.close(pipe)
        else:
            os.kill(int(old), signal.SIGTERM)
    except OSError as e:
        log.warn("upgrade: cannot stop the old parent (pid {pid}): {error}", pid=old, error=e)
        return
    log.info("upgrade: serving; the old parent (pid {pid}) drains and exits", pid=old)
