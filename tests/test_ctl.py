"""
Unit tests of L{maccept._ctl}: how C{maccept-ctl reload --wait} reads the
pool's status (the command against a real pool is in test_observability).
"""

from __future__ import annotations

import argparse
import contextlib
import io
from typing import Any

from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from maccept._ctl import EXIT_REFUSED, _reload, _waitForReload


def status(**fields: Any) -> dict[str, Any]:
    """
    A status reply of a pool whose generation 2 serves, with C{fields}.
    """
    reply: dict[str, Any] = {
        "generation": 2,
        "state": "reloading",
        "lastReloadDone": None,
        "reloadFailure": None,
        "reloadDropped": None,
    }
    reply.update(fields)
    return reply


class WaitForReloadTests(SynchronousTestCase):
    def wait(self, replies: list[dict[str, Any]], generation: int) -> tuple[int, str, str]:
        """
        Run C{_waitForReload} for C{generation} against a pool that answers
        C{replies} in turn, one per poll; return its exit status and output.
        """
        clock = Clock()
        answers = iter(replies)

        def call(command: object) -> defer.Deferred[dict[str, Any]]:
            return defer.succeed(next(answers))

        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            waiting = defer.Deferred.fromCoroutine(_waitForReload(clock, call, generation))
            for _ in replies:
                clock.advance(1)
            code = self.successResultOf(waiting)
        return code, out.getvalue(), err.getvalue()

    def test_served(self) -> None:
        """
        Once the generation serves: exit 0, said on stdout.
        """
        code, out, err = self.wait([status(), status(generation=3, state="running")], 3)
        self.assertEqual((code, out, err), (0, "reloaded: generation 3 serves\n", ""))

    def test_failed(self) -> None:
        """
        The generation failed: exit 1, and the pool's reason.
        """
        failed = status(state="running", lastReloadDone=3, reloadFailure="worker 1 died:\n boom")
        code, out, err = self.wait([status(), failed], 3)
        self.assertEqual((code, out), (EXIT_REFUSED, ""))
        self.assertEqual(
            err,
            "maccept-ctl: reload: generation 3 failed, generation 2 serves on: "
            "worker 1 died: boom\n",
        )

    def test_laterFailureNamed(self) -> None:
        """
        A queued reload that failed too within one poll replaced the reason:
        the reason given is said to be the later generation's, not ours.
        """
        failed = status(state="running", lastReloadDone=4, reloadFailure="worker 2 died: boom")
        code, out, err = self.wait([failed], 3)
        self.assertEqual((code, out), (EXIT_REFUSED, ""))
        self.assertEqual(
            err,
            "maccept-ctl: reload: generation 3 failed, generation 2 serves on: "
            "generation 4, started since, failed too: worker 2 died: boom\n",
        )


class ReloadTests(SynchronousTestCase):
    def reload(self, answer: dict[str, Any]) -> tuple[int, str]:
        """
        Run C{maccept-ctl reload} (no C{--wait}) against a parent that
        answers C{answer}; return its exit status and standard output.
        """

        def call(command: object) -> defer.Deferred[dict[str, Any]]:
            return defer.succeed(answer)

        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            done = defer.Deferred.fromCoroutine(
                _reload(Clock(), call, argparse.Namespace(wait=False))
            )
            code = self.successResultOf(done)
        return code, out.getvalue()

    def test_saysQueued(self) -> None:
        """
        A reload the pool queues (it starts or reloads) is said to be
        queued, as the parent's log says; one that starts now, or asked of
        a parent too old to say, is "reloading".
        """
        self.assertEqual(
            self.reload({"generation": 2, "queued": True}),
            (0, "reload queued: it starts once the pool has started or reloaded\n"),
        )
        self.assertEqual(self.reload({"generation": 2, "queued": False}), (0, "reloading\n"))
        self.assertEqual(self.reload({"generation": 2}), (0, "reloading\n"))
