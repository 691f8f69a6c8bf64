"""
The example extension under C{examples/kvstore}: its plugin is found next
to maccept's own, and its own tests, written with the testing kit, pass.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from tests.server import TWISTD

KVSTORE = Path(__file__).resolve().parent.parent / "examples" / "kvstore"


class KVStoreExampleTests(SynchronousTestCase):
    def test_pluginListed(self) -> None:
        """
        With the example on the path, C{--help-protocols} lists C{kv}.
        """
        result = subprocess.run(
            [TWISTD, "maccept", "--help-protocols"],
            env={**os.environ, "PYTHONPATH": str(KVSTORE)},
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertIn("kv ", result.stdout)

    def test_itsOwnTestsPass(self) -> None:
        """
        The example's tests (pytest with the C{maccept_pool} fixture) pass.
        """
        done = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests"],
            cwd=KVSTORE,
            env={**os.environ, "PYTHONPATH": str(KVSTORE)},
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        self.assertEqual(done.returncode, 0, done.stdout + done.stderr)
        self.assertIn("1 passed", done.stdout)
