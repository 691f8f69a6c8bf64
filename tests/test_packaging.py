"""
C{pip install .}, C{pip install -e .} and an install from the sdist each
make C{twistd --help} list maccept in a fresh virtual environment.

The fresh environments borrow Twisted and the build backend from the
running one through a C{.pth} line (which, unlike a site directory, does
not load that environment's own C{.pth} files, so the maccept installed
there stays invisible), then install maccept with pip, offline.
"""

from __future__ import annotations

import os
import site
import subprocess
import sys
import tempfile
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

REPO = Path(__file__).resolve().parent.parent
LISTS_MACCEPT = "A pre-fork server"


def _freshVenv() -> Path:
    root = Path(tempfile.mkdtemp(prefix="maccept-venv-"))
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root)], check=True)
    python = root / "bin" / "python"
    target = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    borrowed = "\n".join(site.getsitepackages())
    Path(target, "borrowed.pth").write_text(borrowed + "\n")
    return python


def _twistdHelp(python: Path) -> str:
    return subprocess.run(
        [str(python), "-c", "from twisted.scripts.twistd import run; run()", "--help"],
        capture_output=True,
        text=True,
        cwd=tempfile.gettempdir(),
        check=True,
    ).stdout


def _pipInstall(python: Path, *args: str) -> None:
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            str(python),
            "install",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            *args,
        ],
        check=True,
        capture_output=True,
        cwd=tempfile.gettempdir(),
        env={**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"},
    )


class PackagingTests(SynchronousTestCase):
    def assertInstallListsPlugin(self, *pipArgs: str) -> Path:
        python = _freshVenv()
        self.assertNotIn(LISTS_MACCEPT, _twistdHelp(python), "maccept visible before install")
        _pipInstall(python, *pipArgs)
        self.assertIn(LISTS_MACCEPT, _twistdHelp(python))
        return python

    def test_installLists(self) -> None:
        """
        A regular install puts the plugin module, and no
        C{twisted/plugins/__init__.py}, into site-packages.
        """
        python = self.assertInstallListsPlugin(str(REPO))
        purelib = python.parent.parent / "lib"
        [plugins] = purelib.glob("python*/site-packages/twisted/plugins")
        self.assertTrue((plugins / "maccept_plugin.py").exists())
        self.assertFalse((plugins / "__init__.py").exists())

    def test_editableInstallLists(self) -> None:
        self.assertInstallListsPlugin("-e", str(REPO))

    def test_sdistInstallHasEveryPlugin(self) -> None:
        """
        A wheel built from the sdist, as an index would, still has the
        built-in protocol plugins (their module was once left out of it).
        """
        out = tempfile.mkdtemp(prefix="maccept-sdist-")
        subprocess.run(
            [sys.executable, "-m", "hatchling", "build", "-t", "sdist", "-d", out],
            check=True,
            capture_output=True,
            cwd=REPO,
        )
        [sdist] = Path(out).glob("maccept-*.tar.gz")
        python = self.assertInstallListsPlugin(str(sdist))
        twistd = [str(python), "-c", "from twisted.scripts.twistd import run; run()"]
        protocols = subprocess.run(
            [*twistd, "maccept", "--help-protocols"],
            capture_output=True,
            text=True,
            cwd=tempfile.gettempdir(),
            check=True,
        ).stdout
        for name in ("echo", "discard", "chargen", "daytime", "web"):
            self.assertIn(name, protocols.split())
