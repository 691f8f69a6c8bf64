# -*- test-case-name: tests.test_ctl,tests.test_observability -*-
"""
C{maccept-ctl PATH COMMAND}: see and steer a running pool through its
control socket (C{twistd maccept --control PATH}).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Awaitable, Callable
from typing import Any, NoReturn

from twisted.internet import defer, task
from twisted.internet.endpoints import UNIXClientEndpoint, connectProtocol
from twisted.internet.error import ConnectError, ConnectionClosed
from twisted.logger import ILogObserver, LogEvent, globalLogBeginner
from twisted.protocols import amp
from zope.interface import provider

from maccept._control import ControlError, Reload, Scale, Status, Stop
from maccept._output import dropStdout
from maccept._socketpath import pathProblem

#: Exit statuses: a command the pool refused, and no pool to talk to.
EXIT_REFUSED = 1
EXIT_UNREACHABLE = 2


class _OneLineParser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(2, f"maccept-ctl: {message} (see maccept-ctl --help)\n")


def seconds(text: str) -> float:
    """
    A positive number of seconds, for C{--timeout}.
    """
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(
            f"must be a finite number of seconds more than 0, got {text}"
        )
    return value


def parser() -> argparse.ArgumentParser:
    p = _OneLineParser(
        prog="maccept-ctl",
        description="See and steer a running maccept pool through its control socket.",
        epilog="Exit status: 0 done, 1 the pool refused the request (or the reload that "
        "reload --wait waited for did not serve), 2 no pool at PATH.",
    )
    p.add_argument("path", help="the control socket (twistd maccept --control PATH)")
    p.add_argument(
        "--timeout",
        type=seconds,
        default=10.0,
        help="seconds to wait to connect, and for the pool's answer (default 10); "
        "before the command",
    )
    commands = p.add_subparsers(
        dest="command", required=True, metavar="COMMAND", parser_class=_OneLineParser
    )
    status = commands.add_parser("status", help="list the workers")
    status.add_argument("--json", action="store_true", help="print JSON for machines")
    scale = commands.add_parser("scale", help="set the number of workers")
    scale.add_argument("workers", type=int)
    reload = commands.add_parser("reload", help="replace every worker, new ones first")
    reload.add_argument(
        "--wait",
        action="store_true",
        help="wait until the new workers serve (exit 0) or the reload fails (exit 1)",
    )
    commands.add_parser("stop", help="stop gracefully")
    return p


def formatStatus(status: dict[str, Any]) -> str:
    """
    The C{status} table a person reads.
    """
    lines = [f"pool: {status['state']}, {status['size']} workers wanted"]
    if status.get("reloadFailure"):
        lines.append(
            f"last reload (generation {status['lastReloadDone']}) failed: "
            f"{_oneLine(status['reloadFailure'])}; generation "
            f"{status['generation']} serves"
        )
    lines += [
        f"{'WORKER':>6} {'PID':>8} {'STATE':<9} {'GEN':>3} {'OPEN':>6} "
        f"{'ACCEPTED':>9} {'RSS MiB':>8} {'UPTIME s':>9}",
    ]
    for w in status["workers"]:
        lines.append(
            f"{w['number']:>6} {w['pid']:>8} {w['state']:<9} {w['generation']:>3} "
            f"{w['open']:>6} {w['accepted']:>9} {w['rss'] / 2**20:>8.1f} {w['uptime']:>9.0f}"
        )
    return "\n".join(lines)


async def run(reactor: Any, options: argparse.Namespace) -> int:
    if not options.path:
        print("maccept-ctl: the control socket's path is empty", file=sys.stderr)
        return EXIT_UNREACHABLE
    problem = pathProblem(options.path)
    if problem is not None:
        # Said once: some problems name the path themselves.
        where = "" if options.path in problem else f"{options.path}: "
        print(f"maccept-ctl: {where}{problem}", file=sys.stderr)
        return EXIT_UNREACHABLE
    endpoint = UNIXClientEndpoint(reactor, options.path, timeout=options.timeout)
    try:
        control = await connectProtocol(endpoint, amp.AMP())
    except (ConnectError, ConnectionClosed) as e:
        return _unreachable(options.path, e)

    def call(command: type[amp.Command], **arguments: Any) -> defer.Deferred[Any]:
        # A parent whose reactor is blocked accepts (the kernel does) but
        # never answers: give up rather than hang.
        answer: defer.Deferred[Any] = control.callRemote(command, **arguments)
        return answer.addTimeout(options.timeout, reactor)

    try:
        return await _COMMANDS[options.command](reactor, call, options)
    except ControlError as e:
        print(f"maccept-ctl: {options.command}: {e}", file=sys.stderr)
        return EXIT_REFUSED
    except defer.TimeoutError:
        print(
            f"maccept-ctl: {options.path}: no answer within {options.timeout:g} s "
            "(is the parent blocked?)",
            file=sys.stderr,
        )
        return EXIT_UNREACHABLE
    except ConnectionClosed as e:
        print(
            f"maccept-ctl: {options.path}: the connection closed before the answer ({e})",
            file=sys.stderr,
        )
        return EXIT_UNREACHABLE
    except BrokenPipeError:
        # Our own output was closed (`| head`): the parent answered, and
        # what was asked is done.  Quietly, as other tools end there.
        dropStdout()
        return 0
    except Exception as e:
        # What answers there is not maccept's control protocol, or is
        # garbled: an undecodable box, an unknown error code, a bad value.
        print(
            f"maccept-ctl: {options.path}: not an answer maccept gives "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'no detail'})",
            file=sys.stderr,
        )
        return EXIT_UNREACHABLE
    finally:
        # AMP lets go of a transport that has closed.
        if control.transport is not None:
            control.transport.loseConnection()


#: Asks the parent one control command, its answer bounded by C{--timeout}.
Call = Callable[..., defer.Deferred[Any]]


async def _status(reactor: Any, call: Call, options: argparse.Namespace) -> int:
    status = await call(Status)
    print(json.dumps(status, indent=2) if options.json else formatStatus(status))
    return 0


async def _scale(reactor: Any, call: Call, options: argparse.Namespace) -> int:
    result = await call(Scale, workers=options.workers)
    print(f"scaling to {result['size']} workers")
    return 0


async def _reload(reactor: Any, call: Call, options: argparse.Namespace) -> int:
    result = await call(Reload)
    if not options.wait:
        # As the parent's log says: a reload asked for while the pool starts
        # or reloads waits its turn.
        print(
            "reload queued: it starts once the pool has started or reloaded"
            if result.get("queued")
            else "reloading"
        )
        return 0
    if result.get("generation") is None:
        # A parent of a version before --wait: asked, not awaited.
        print(
            "maccept-ctl: reload: asked for, but this parent is too old to say how it "
            "ends (see its log)",
            file=sys.stderr,
        )
        return EXIT_REFUSED
    return await _waitForReload(reactor, call, result["generation"])


async def _stop(reactor: Any, call: Call, options: argparse.Namespace) -> int:
    await call(Stop)
    print("stopping")
    return 0


#: What each command does once connected; its exit status.
_COMMANDS: dict[str, Callable[[Any, Call, argparse.Namespace], Awaitable[int]]] = {
    "status": _status,
    "scale": _scale,
    "reload": _reload,
    "stop": _stop,
}


async def _waitForReload(reactor: Any, call: Call, generation: int) -> int:
    """
    Ask for the pool's status until C{generation} serves, or will not: it
    failed, an upgrade dropped it while it was queued, or the pool stops.
    A reload is bounded by the pool's C{--start-timeout}; a parent that
    stops answering fails the status call on C{--timeout}.
    """
    while True:
        status = await call(Status)
        if status["generation"] >= generation:
            print(f"reloaded: generation {status['generation']} serves")
            return 0
        lastDone = status["lastReloadDone"] or 0
        if lastDone >= generation:
            # The pool keeps only the last failure's reason: a queued
            # reload that failed within one poll of ours has replaced it.
            why = _oneLine(status["reloadFailure"] or "unknown")
            if lastDone > generation:
                why = f"generation {lastDone}, started since, failed too: {why}"
            print(
                f"maccept-ctl: reload: generation {generation} failed, "
                f"generation {status['generation']} serves on: {why}",
                file=sys.stderr,
            )
            return EXIT_REFUSED
        if (status["reloadDropped"] or 0) >= generation:
            print(
                "maccept-ctl: reload: dropped before it started: an upgrade (USR2) "
                "starts the new code instead",
                file=sys.stderr,
            )
            return EXIT_REFUSED
        if status["state"] in ("stopping", "stopped"):
            print(
                f"maccept-ctl: reload: the pool is stopping; generation {generation} "
                "will not serve",
                file=sys.stderr,
            )
            return EXIT_REFUSED
        await task.deferLater(reactor, _POLL_INTERVAL)


def _oneLine(text: str) -> str:
    """
    C{text} (why a reload failed: a worker's last words, say) on one line.
    """
    return " ".join(text.split())


#: How often C{reload --wait} asks how the reload goes.
_POLL_INTERVAL = 0.1


def _unreachable(path: str, error: Exception) -> int:
    text = str(error).lower()
    if "no such file" in text:
        why = "no control socket there (is maccept running with --control?)"
    elif "refused" in text:
        why = "nothing listens there (a stale socket?)"
    elif "permission" in text:
        why = "permission denied"
    else:
        why = str(error)
    print(f"maccept-ctl: {path}: {why}", file=sys.stderr)
    return EXIT_UNREACHABLE


@provider(ILogObserver)
def _ignoreEvent(event: LogEvent) -> None:
    pass


def main(argv: list[str] | None = None) -> NoReturn:
    options = parser().parse_args(argv)
    # maccept-ctl speaks in its own lines; what Twisted would log (the
    # traceback of a box maccept never sends) is not for its user.
    globalLogBeginner.beginLoggingTo([_ignoreEvent], redirectStandardIO=False)

    def _main(reactor: Any) -> defer.Deferred[None]:
        return defer.Deferred.fromCoroutine(run(reactor, options)).addCallback(_exitWith)

    task.react(_main)


def _exitWith(code: int) -> None:
    """
    L{task.react} exits with the code of a C{SystemExit} its Deferred fails with.
    """
    if code:
        raise SystemExit(code)
