"""
Every bad command line gets one clear line naming the option, a non-zero
exit, no traceback and no process left behind.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from tests.server import HERE, TWISTD, runMaccept, takenPort, withoutBindCapability


class BadInputTests(SynchronousTestCase):
    def assertOneLineError(
        self, result: subprocess.CompletedProcess[str], option: str, problem: str
    ) -> None:
        output = result.stdout + result.stderr
        self.assertNotEqual(result.returncode, 0)
        self.assertNotIn("Traceback", output)
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        self.assertEqual(len(lines), 1, output)
        self.assertIn(option, lines[0])
        self.assertIn(problem, lines[0])

    def check(self, args: list[str], option: str, problem: str) -> None:
        self.assertOneLineError(runMaccept(args), option, problem)

    def test_workersZero(self) -> None:
        self.check(["--workers", "0"], "--workers", "at least 1")

    def test_workersNegative(self) -> None:
        self.check(["--workers", "-1"], "--workers", "at least 1")

    def test_workersNotANumber(self) -> None:
        self.check(["--workers", "abc"], "--workers", "'abc'")

    def test_protocolUnknownName(self) -> None:
        self.check(["--protocol", "nosuchname"], "--protocol", "unknown protocol 'nosuchname'")

    def test_protocolMissingModule(self) -> None:
        self.check(["--protocol", "no.such.module:factory"], "--protocol", "cannot import module")

    def test_protocolModuleExits(self) -> None:
        self.check(
            ["--protocol", "tests.sample_exits_at_import:factory"], "--protocol", "sys.exit(3)"
        )

    def test_protocolNotAFactory(self) -> None:
        self.check(["--protocol", "os:path"], "--protocol", "neither a protocol factory")

    def test_listenNotAPort(self) -> None:
        self.check(["--listen", "tcp:notaport"], "--listen tcp:notaport", "expected a number")

    def test_listenUnknownType(self) -> None:
        self.check(["--listen", "bogus:1"], "--listen bogus:1", "unknown endpoint type")

    def test_cpuAffinityUnavailable(self) -> None:
        self.check(
            ["--cpu-affinity", "100000"], "--cpu-affinity", "CPU 100000 is not one this process"
        )

    def test_unknownOption(self) -> None:
        self.check(["--no-such-option"], "--no-such-option", "not recognized")

    def test_portInUse(self) -> None:
        description = f"tcp:{takenPort(self)}:interface=127.0.0.1"
        self.check(["--listen", description], f"--listen {description}", "address already in use")

    def test_unixPathInMissingDirectory(self) -> None:
        self.check(
            ["--listen", "unix:/no/such/dir/s.sock"],
            "--listen unix:/no/such/dir",
            "directory /no/such/dir does not exist",
        )

    def test_unixPathsThatCannotBeSockets(self) -> None:
        """
        A path too long for a socket address, or taken by something that
        is not a socket (for --listen, --control and --metrics alike), is
        refused with its reason, and no PATH.lock is left behind.
        """
        # Short: the path must fit in a socket address but for its length.
        directory = Path(tempfile.mkdtemp(prefix="maccept-paths-"))
        self.addCleanup(shutil.rmtree, directory, True)
        regular = directory / "regular.file"
        regular.write_text("")
        tooLong = directory / ("x" * 120 + ".sock")
        cases = [
            (["--listen", f"unix:{tooLong}"], "--listen", "longer than the 107 bytes"),
            (["--control", str(regular)], "--control", "exists and is not a socket"),
            (["--control", str(directory)], "--control", "exists and is not a socket"),
            (["--metrics", f"unix:{directory}/none/m.sock"], "--metrics", "does not exist"),
        ]
        for args, option, problem in cases:
            self.check([*args, "--listen", "tcp:0:interface=127.0.0.1"], option, problem)
        self.assertEqual(sorted(p.name for p in directory.iterdir()), ["regular.file"])

    def test_listenDescriptionProblems(self) -> None:
        """
        What Twisted's parser would take silently, or report in its own
        terms, is named in the description's terms.
        """
        cases = [
            ("udp:0:interface=999.1.1.1", "'999.1.1.1' is not an IP address"),
            ("udp:0:interface=127.0.0.1:backlog=5", "unknown option 'backlog=5' (udp takes"),
            ("tcp", "port is missing"),
            ("tcp:0:interface=::1", "escape the colons of an IPv6 address"),
            ("tcp:0:interface=127.0.0.1:foo=bar", "unknown option foo="),
            ("tcp:0:backlog=0", "backlog must be at least 1"),
            ("tcp:0:backlog=99999999999999999999", "is too large"),
            ("tcp:port=0:port=1", "port= is given twice"),
            ("tcp:0:interface=", "interface= is empty"),
            ("haproxy:haproxy:tcp:0", "haproxy: is given twice"),
            ("ssl:0:privateKey=/no/such/key.pem", "cannot read"),
            ("tcp:0:interface=127.0.0.1\n", "line break"),
            ("tcp:0\\", "ends in a backslash, which escapes nothing"),
            ("haproxy:unix:/tmp/x.sock\\", "ends in a backslash"),
            ("unix:", "the socket's path is missing or empty"),
            ("unix:address=:mode=600", "the socket's path is missing or empty"),
            ("unix:mode=600", "the socket's path is missing or empty"),
            ("tcp:0:sslmethod=TLS_METHOD", "unknown option sslmethod="),
            ("tcp:0:privateKey=/no/such.pem", "unknown option privateKey="),
        ]
        for description, problem in cases:
            self.check(["--listen", description], "--listen", problem)
        self.check(["--metrics", "tcp:0\\"], "--metrics", "ends in a backslash")

    def test_tlsFilesChecked(self) -> None:
        """
        A key that is not PEM, and a dhParameters= file that cannot be
        read, fail at start-up.
        """
        directory = Path(tempfile.mkdtemp(prefix="maccept-tls-"))
        self.addCleanup(shutil.rmtree, directory, True)
        garbage = directory / "garbage.pem"
        garbage.write_text("garbage\n")
        cases = [
            (f"ssl:0:privateKey={garbage}", "cannot load the certificate or key"),
            (f"ssl:0:privateKey={garbage}:dhParameters={directory}/dh.pem", "dhParameters="),
        ]
        for description, problem in cases:
            self.check(["--listen", description], "--listen", problem)

    def test_metricsOverUDP(self) -> None:
        self.check(
            ["--metrics", "udp:0:interface=127.0.0.1"], "--metrics", "served over HTTP, not UDP"
        )

    def test_metricsBehindProxy(self) -> None:
        self.check(
            ["--metrics", "haproxy:tcp:0:interface=127.0.0.1"],
            "--metrics",
            "the PROXY protocol (haproxy:) is for --listen",
        )

    def test_emptyProtocolOption(self) -> None:
        self.check(["--protocol-option", "=x"], "--protocol-option", "expected KEY=VALUE")

    def test_strayArgument(self) -> None:
        self.check(["--workers", "2", "four"], "'four'", "every option starts with --")

    def test_brokenHandOver(self) -> None:
        """
        A hand-over variable no old parent wrote is one line, not a
        traceback.
        """
        listen = "tcp:0:interface=127.0.0.1"
        for value, args, option in [
            ("not json", [], "MACCEPT_INHERIT"),
            (f'[{{"description": "{listen}", "fd": 999}}]', ["--listen", listen], "--listen"),
        ]:
            os.environ["MACCEPT_INHERIT"] = value
            try:
                self.check(args, option, "unset")
            finally:
                del os.environ["MACCEPT_INHERIT"]

    def test_unprintableDescriptionEscaped(self) -> None:
        """
        A description holding a terminal escape is shown escaped in the
        line of a listen that fails, as in the line of one that does not
        parse: nothing reaches the terminal raw.
        """
        for option in ("--listen", "--metrics"):
            description = "tcp:0:interface=127.0.0.1\x1b[31m"
            result = runMaccept([option, description])
            self.assertOneLineError(result, option, repr(description))
            self.assertNotIn("\x1b", result.stderr)

    def test_builtinProtocol(self) -> None:
        self.check(["--protocol", "os:getpid"], "--protocol", "built-in function")

    def test_workerStartFailureOnStderr(self) -> None:
        """
        A protocol maker that fails in the worker stops the pool with one
        line on standard error, and exit status 1.
        """
        result = runMaccept(
            [
                "--protocol",
                "tests.sample_protocols:failsInWorker",
                "--listen",
                "tcp:0:interface=127.0.0.1",
            ]
        )
        self.assertEqual(result.returncode, 1)
        [line] = [line for line in result.stderr.splitlines() if line.strip()]
        self.assertRegex(line, r"worker \d+ failed to start: RuntimeError: boom in worker start-up")

    def test_privilegedPortWithoutPrivileges(self) -> None:
        """
        Without the privilege to bind ports below 1024 (as root, with
        CAP_NET_BIND_SERVICE dropped), such a port is refused with
        'permission denied'.
        """
        with open("/proc/sys/net/ipv4/ip_unprivileged_port_start") as f:
            firstUnprivileged = int(f.read())
        if firstUnprivileged <= 1:
            self.skipTest("this kernel lets anyone bind low ports")
        description = "tcp:1:interface=127.0.0.1"
        result = runMaccept(["--listen", description], preexec=withoutBindCapability)
        self.assertOneLineError(result, f"--listen {description}", "permission denied")


class HelpTests(SynchronousTestCase):
    def test_helpNamesOptionsAndSignals(self) -> None:
        """
        C{twistd maccept --help} lists the options and says what each signal
        does, and exits 0.
        """
        result = runMaccept(["--help"])
        self.assertEqual(result.returncode, 0, result.stderr)
        for option in ("--listen", "--workers", "--protocol", "--metrics", "--control"):
            self.assertIn(option, result.stdout)
        text = " ".join(result.stdout.split())
        for signal in (
            "TERM, INT or QUIT stop gracefully",
            "HUP reloads",
            "TTIN adds",
            "TTOU removes",
            "USR2 upgrades",
        ):
            self.assertIn(signal, text)

    def test_helpToAClosedOutput(self) -> None:
        """
        C{--help}, C{--help-protocols}, C{--version} and a plugin's
        C{--protocol-option help} printed to an output whose reader has
        gone (C{| head}) end quietly with status 0, not a traceback.
        """
        for args in (
            ["--help"],
            ["--help-protocols"],
            ["--version"],
            ["--protocol", "web", "--protocol-option", "help"],
        ):
            readEnd, writeEnd = os.pipe()
            os.close(readEnd)
            try:
                done = subprocess.run(
                    [TWISTD, "maccept", *args],
                    stdout=writeEnd,
                    stderr=subprocess.PIPE,
                    text=True,
                    timeout=60,
                    env={**os.environ, "PYTHONPATH": str(HERE.parent)},
                )
            finally:
                os.close(writeEnd)
            self.assertEqual((done.returncode, done.stderr), (0, ""), args)
