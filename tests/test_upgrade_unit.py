"""
The pieces of an upgrade that need no process: the command line that
starts twistd again, the pidfile's rename, the inherited sockets.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from maccept._upgrade import INHERIT, Upgrade, commandLine, inheritedListeners


class CommandLineTests(SynchronousTestCase):
    def test_script(self) -> None:
        """
        A twistd started as a script is started again the same way.
        """
        argv = ["/venv/bin/twistd", "-n", "maccept", "--workers", "2"]
        self.assertEqual(commandLine(argv), [sys.executable, *argv])

    def test_dashC(self) -> None:
        """
        A twistd started with C{python -c} (the testing kit) gets its code
        back.
        """
        command = commandLine(["-c", "-n", "maccept"])
        self.assertEqual(command[:2], [sys.executable, "-c"])
        self.assertIn("twistd import run", command[2])
        self.assertEqual(command[3:], ["-n", "maccept"])

    def test_daemonRunsInForeground(self) -> None:
        """
        A daemon's new parent runs with C{--nodaemon}, logging where the
        daemon would have (its C{--logfile}, else twistd's default file).
        """
        argv = ["/venv/bin/twistd", "--pidfile=p", "maccept"]
        daemon = {"nodaemon": False, "logfile": None}
        self.assertEqual(
            commandLine(argv, daemon),
            [sys.executable, argv[0], "--nodaemon", "--logfile=twistd.log", *argv[1:]],
        )
        logged = {"nodaemon": False, "logfile": "/var/log/m.log"}
        self.assertEqual(
            commandLine(argv, logged), [sys.executable, argv[0], "--nodaemon", *argv[1:]]
        )
        foreground = {"nodaemon": True, "logfile": None}
        self.assertEqual(commandLine(argv, foreground), [sys.executable, *argv])


class PidfileTests(SynchronousTestCase):
    def test_renamedAndBack(self) -> None:
        """
        The pidfile moves aside to C{.oldbin} and back, and twistd's own
        config follows it, so twistd removes the right file at exit.
        """
        directory = tempfile.mkdtemp()
        pidfile = Path(directory, "twistd.pid")
        pidfile.write_text("123")
        config = {"pidfile": str(pidfile)}
        upgrade = Upgrade(Clock(), [], config, lambda: True)
        upgrade._movePidfile(".oldbin")
        self.assertEqual(config["pidfile"], f"{pidfile}.oldbin")
        self.assertFalse(pidfile.exists())
        upgrade._movePidfile("")
        self.assertEqual((config["pidfile"], pidfile.read_text()), (str(pidfile), "123"))
        os.remove(pidfile)
        os.rmdir(directory)

    def test_noPidfile(self) -> None:
        """
        Without a pidfile there is nothing to move.
        """
        config = {"pidfile": ""}
        Upgrade(Clock(), [], config, lambda: True)._movePidfile(".oldbin")
        self.assertEqual(config, {"pidfile": ""})


class InheritedTests(SynchronousTestCase):
    def test_readAndForgotten(self) -> None:
        """
        The inherited sockets are read by description, and the variable is
        removed so that this parent's children do not see it.
        """
        environ = {INHERIT: json.dumps([{"fd": 7, "description": "tcp:7007"}]), "OTHER": "x"}
        self.assertEqual(inheritedListeners(environ), {"tcp:7007": 7})
        self.assertEqual(environ, {"OTHER": "x"})
        self.assertEqual(inheritedListeners({}), {})
