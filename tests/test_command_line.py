"""
Every bad command line gets one clear line naming the option, a non-zero
exit, no traceback and no process left behind.
"""

from __future__ import annotations

import subprocess

from twisted.trial.unittest import SynchronousTestCase

from tests.server import runMaccept, takenPort, withoutBindCapability


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
            ["--listen", "unix:/no/such/dir/s.sock"], "--listen unix:/no/such/dir", "cannot listen"
        )

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
            "TERM or INT stop gracefully",
            "HUP reloads",
            "TTIN adds",
            "TTOU removes",
            "USR2 upgrades",
        ):
            self.assertIn(signal, text)
