"""
The C{twistd maccept} options: defaults, repeatable C{--listen}, and one
clear line naming the option for each bad value.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st
from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase

from maccept._affinity import availableCPUs
from maccept._board import MAX_WORKERS
from maccept._handover import INHERIT
from maccept._options import DEFAULT_LISTEN, CommandLineOptions, Options
from tests.test_tls import selfSignedCertificate


def parsed(*args: str) -> Options:
    options = Options()
    options.parseOptions(list(args))
    return options


def isInteger(text: str) -> bool:
    try:
        int(text)
    except ValueError:
        return False
    return True


class DefaultTests(SynchronousTestCase):
    def test_defaults(self) -> None:
        """
        With no options: one worker per usable CPU, echo, on the default
        loopback address.
        """
        options = parsed()
        self.assertEqual(options["workers"], len(os.sched_getaffinity(0)))
        self.assertEqual(options["protocol"], "echo")
        self.assertEqual(options["listen"], [DEFAULT_LISTEN])
        self.assertEqual(DEFAULT_LISTEN, "tcp:7007:interface=127.0.0.1")

    def test_workersAuto(self) -> None:
        """
        C{--workers auto} is the number of usable CPUs.
        """
        self.assertEqual(parsed("--workers", "auto")["workers"], len(os.sched_getaffinity(0)))

    def test_workersNumber(self) -> None:
        """
        A number of workers is taken as given, long or short option.
        """
        self.assertEqual(parsed("--workers", "3")["workers"], 3)
        self.assertEqual(parsed("-w", "5")["workers"], 5)

    def test_listenRepeatable(self) -> None:
        """
        C{--listen} (or C{-l}) may be given many times; every description
        is kept in order and the default is not added.
        """
        options = parsed("--listen", "tcp:8080", "-l", "unix:/tmp/m.sock", "--listen", "tcp6:0")
        self.assertEqual(options["listen"], ["tcp:8080", "unix:/tmp/m.sock", "tcp6:0"])

    def test_listenNotShared(self) -> None:
        """
        Each options object has its own list of listeners.
        """
        parsed("--listen", "tcp:8080")
        self.assertEqual(parsed()["listen"], [DEFAULT_LISTEN])

    def test_protocolModuleAttribute(self) -> None:
        """
        A C{module:attribute} protocol that resolves is kept as given.
        """
        spec = "tests.test_protocols:ShoutFactory"
        self.assertEqual(parsed("--protocol", spec)["protocol"], spec)


class BadValueTests(SynchronousTestCase):
    def assertRejected(self, option: str, *args: str) -> str:
        """
        Parsing C{args} raises L{usage.UsageError} whose message starts by
        naming C{option}; return the message.
        """
        e = self.assertRaises(usage.UsageError, parsed, *args)
        message = str(e)
        self.assertTrue(message.startswith(option), message)
        self.assertNotIn("\n", message)
        return message

    def test_cpuAffinity(self) -> None:
        """
        A CPU list that does not parse, or names a CPU this process may not
        run on, is refused; C{auto} and a good list are kept as CPUs.
        """
        self.assertIn("'x'", self.assertRejected("--cpu-affinity", "--cpu-affinity", "x"))
        message = self.assertRejected("--cpu-affinity", "--cpu-affinity", "100000")
        self.assertIn("CPU 100000 is not one this process may run on", message)
        self.assertEqual(parsed("--cpu-affinity", "auto")["cpu-affinity"], availableCPUs())
        first = availableCPUs()[0]
        self.assertEqual(parsed("--cpu-affinity", str(first))["cpu-affinity"], (first,))
        self.assertIsNone(parsed()["cpu-affinity"])

    def test_workers(self) -> None:
        """
        Zero, negative and non-numeric worker counts are refused.
        """
        self.assertIn("at least 1", self.assertRejected("--workers", "--workers", "0"))
        self.assertIn("at least 1", self.assertRejected("--workers", "--workers", "-1"))
        self.assertIn("'abc'", self.assertRejected("--workers", "--workers", "abc"))

    def test_armor(self) -> None:
        """
        C{--max-concurrent} must be a positive integer and C{--idle-timeout}
        a number of seconds, zero or more.
        """
        self.assertIn(
            "at least 1", self.assertRejected("--max-concurrent", "--max-concurrent", "0")
        )
        self.assertIn("'x'", self.assertRejected("--max-concurrent", "--max-concurrent", "x"))
        self.assertIn("-1", self.assertRejected("--idle-timeout", "--idle-timeout", "-1"))
        self.assertIn("'soon'", self.assertRejected("--idle-timeout", "--idle-timeout", "soon"))
        for endless in ("1e400", "inf", "nan"):
            self.assertIn(
                f"expected a finite number, got {endless!r}",
                self.assertRejected("--idle-timeout", "--idle-timeout", endless),
            )
        options = parsed("--max-concurrent", "10", "--idle-timeout", "2.5")
        self.assertEqual((options["max-concurrent"], options["idle-timeout"]), (10, 2.5))

    def test_stopDelay(self) -> None:
        """
        C{--stop-delay} is 0 unless given, and never negative.
        """
        self.assertEqual(parsed()["stop-delay"], 0)
        self.assertEqual(parsed("--stop-delay", "2.5")["stop-delay"], 2.5)
        self.assertIn("at least 0", self.assertRejected("--stop-delay", "--stop-delay", "-1"))

    def test_startTimeout(self) -> None:
        """
        C{--start-timeout} is 10 s unless given, and at least a second.
        """
        self.assertEqual(parsed()["start-timeout"], 10)
        self.assertEqual(parsed("--start-timeout", "45")["start-timeout"], 45)
        self.assertIn("at least 1", self.assertRejected("--start-timeout", "--start-timeout", "0"))
        self.assertIn("'later'", self.assertRejected("--start-timeout", "--start-timeout", "later"))

    def test_workerReactor(self) -> None:
        """
        An unknown worker reactor is refused, naming the known ones.
        """
        self.assertEqual(
            self.assertRejected("--worker-reactor", "--worker-reactor", "kqueue"),
            "--worker-reactor: expected one of fast, epoll, asyncio, got 'kqueue'",
        )

    def test_protocol(self) -> None:
        """
        An unknown name, a missing module and an attribute that is no
        factory are refused, each saying which.
        """
        self.assertIn(
            "unknown protocol 'nosuchname'",
            self.assertRejected("--protocol", "--protocol", "nosuchname"),
        )
        self.assertIn(
            "cannot import module 'no.such.module'",
            self.assertRejected("--protocol", "--protocol", "no.such.module:factory"),
        )
        self.assertIn(
            "neither a protocol factory nor a callable",
            self.assertRejected("--protocol", "--protocol", "os:path"),
        )

    def test_control(self) -> None:
        """
        An empty C{--control} path, or one holding a line break, is
        refused (it would split the log line that names it).
        """
        for path in ["", "/run/m\n.sock"]:
            message = self.assertRejected("--control", "--control", path)
            self.assertIn("empty or holds a line break", message)

    def test_oneUNIXPathPerSocket(self) -> None:
        """
        Two of maccept's sockets at one UNIX path are refused before any
        listens, naming both (the second would only fail to take the
        path's lock).
        """
        sock = os.path.join(tempfile.mkdtemp(), "m.sock")
        self.addCleanup(shutil.rmtree, os.path.dirname(sock))
        self.assertEqual(
            self.assertRejected("--control", "--listen", f"unix:{sock}", "--control", sock),
            f"--control {sock}: the same path as --listen unix:{sock}",
        )
        self.assertEqual(
            self.assertRejected(
                "--listen", "--listen", f"unix:{sock}", "--listen", f"haproxy:unix:address={sock}"
            ),
            f"--listen haproxy:unix:address={sock}: the same path as --listen unix:{sock}",
        )
        relative = os.path.relpath(sock)
        self.assertEqual(
            self.assertRejected("--control", "--metrics", f"unix:{sock}", "--control", relative),
            f"--control {relative}: the same path as --metrics unix:{sock}",
        )
        parsed("--listen", f"unix:{sock}", "--control", sock + ".control")

    def test_jitterWithoutMaxConnections(self) -> None:
        """
        C{--max-connections-jitter} alone would do nothing: refused.
        """
        message = self.assertRejected("--max-connections-jitter", "--max-connections-jitter", "10")
        self.assertIn("--max-connections, which is not given", message)
        parsed("--max-connections", "100", "--max-connections-jitter", "10")

    def test_listen(self) -> None:
        """
        A port that is not a number and an unknown endpoint type are
        refused, naming the description.
        """
        self.assertEqual(
            self.assertRejected("--listen", "--listen", "tcp:notaport"),
            "--listen tcp:notaport: expected a number, got 'notaport'",
        )
        self.assertEqual(
            self.assertRejected("--listen", "--listen", "bogus:1"),
            "--listen bogus:1: unknown endpoint type 'bogus'",
        )
        self.assertEqual(
            self.assertRejected("--listen", "--listen", "TCP:1"),
            "--listen TCP:1: unknown endpoint type 'TCP' (endpoint types are lower case)",
        )
        self.assertEqual(
            self.assertRejected("--listen", "--listen", "systemd:domain=INET:index=-1"),
            "--listen systemd:domain=INET:index=-1: index must be 0 or more, got -1",
        )
        self.assertEqual(
            self.assertRejected("--listen", "--listen", "unix:/tmp/m.sock:mode=999"),
            "--listen unix:/tmp/m.sock:mode=999: mode must be an octal file mode such as 0660, "
            "got '999'",
        )
        for mode in ["0660", "660", "0o660", "0O660"]:
            parsed("--listen", f"unix:/tmp/m.sock:mode={mode}")

    def test_listenKnownButUnsupported(self) -> None:
        """
        An endpoint type Twisted knows but a worker cannot adopt is refused
        with one line, whatever parsing it would involve.
        """
        for description in ["stdio:"]:
            message = self.assertRejected("--listen", "--listen", description)
            self.assertIn("is not supported", message)

    def test_oneBadListenAmongGood(self) -> None:
        """
        The bad one of several descriptions is the one named.
        """
        self.assertEqual(
            self.assertRejected("--listen", "--listen", "tcp:0", "--listen", "bogus:1"),
            "--listen bogus:1: unknown endpoint type 'bogus'",
        )


class CommandLineTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.stderr = io.StringIO()
        self.patch(sys, "stderr", self.stderr)

    def test_badValueExits(self) -> None:
        """
        A bad value exits with status 2 and one line on stderr, naming the
        option, instead of twistd's usage text.
        """
        for args in [["--workers", "0"], ["--listen", "bogus:1"], ["--protocol", "nope"]]:
            self.stderr.truncate(0)
            self.stderr.seek(0)
            e = self.assertRaises(SystemExit, CommandLineOptions().parseOptions, args)
            self.assertEqual(e.code, 2)
            output = self.stderr.getvalue()
            self.assertTrue(output.startswith("maccept: error: --" + args[0][2:]), output)
            self.assertEqual(output.count("\n"), 1)
            self.assertTrue(output.endswith("\n"))

    def test_goodValues(self) -> None:
        """
        Good values parse as with L{Options}, printing nothing.
        """
        options = CommandLineOptions()
        options.parseOptions(["--workers", "2"])
        self.assertEqual(options["workers"], 2)
        self.assertEqual(self.stderr.getvalue(), "")


class WorkersPropertyTests(SynchronousTestCase):
    @given(st.integers(min_value=1, max_value=MAX_WORKERS))
    def test_positiveAccepted(self, count: int) -> None:
        """
        Any integer from 1 to L{MAX_WORKERS} is that many workers.
        """
        self.assertEqual(parsed(f"--workers={count}")["workers"], count)

    @given(st.integers(min_value=MAX_WORKERS + 1, max_value=10**30))
    def test_tooManyRejected(self, count: int) -> None:
        """
        More than L{MAX_WORKERS} (half the load board's slots: a reload runs
        two generations) is refused, naming C{--workers}.
        """
        e = self.assertRaises(usage.UsageError, parsed, f"--workers={count}")
        self.assertEqual(str(e), f"--workers: at most {MAX_WORKERS}, got {count}")

    @given(st.integers(max_value=0, min_value=-(10**30)))
    def test_nonPositiveRejected(self, count: int) -> None:
        """
        Any integer below 1 is refused, naming C{--workers}.
        """
        e = self.assertRaises(usage.UsageError, parsed, f"--workers={count}")
        self.assertTrue(str(e).startswith("--workers:"), str(e))

    @given(st.text().filter(lambda text: text != "auto" and not isInteger(text)))
    def test_nonNumericRejected(self, text: str) -> None:
        """
        Any text that is not a number (nor C{auto}) is refused, naming
        C{--workers}.
        """
        e = self.assertRaises(usage.UsageError, parsed, f"--workers={text}")
        self.assertTrue(str(e).startswith("--workers:"), str(e))


class InheritedListenerTests(SynchronousTestCase):
    """
    A new parent (USR2) skips the checks of the sockets it inherits, but
    not the certificate and key of an ssl: one.
    """

    def inherit(self, *descriptions: str) -> None:
        os.environ[INHERIT] = json.dumps([{"description": d, "fd": 99} for d in descriptions])
        self.addCleanup(os.environ.pop, INHERIT, None)

    def test_systemdSkipped(self) -> None:
        """
        An inherited systemd: listener no longer finds LISTEN_FDS, and is
        not asked to.
        """
        self.inherit("systemd:domain=INET:index=0")
        self.assertEqual(
            parsed("--listen", "systemd:domain=INET:index=0")["listen"],
            ["systemd:domain=INET:index=0"],
        )

    def test_mismatchedCertificateRefused(self) -> None:
        """
        An inherited ssl: listener whose key no longer matches its
        certificate (replaced on disk since) stops the new parent with one
        line, before any worker starts.
        """
        first, second = (Path(tempfile.mkdtemp(prefix="maccept-inherit-")) for _ in range(2))
        for directory in (first, second):
            self.addCleanup(shutil.rmtree, directory, True)
        key, _ = selfSignedCertificate(first)
        _, certificate = selfSignedCertificate(second)
        description = f"haproxy:ssl:0:privateKey={key}:certKey={certificate}"
        self.inherit(description)
        message = str(self.assertRaises(usage.UsageError, parsed, "--listen", description))
        self.assertTrue(message.startswith("--listen haproxy:ssl:0:"), message)
        self.assertIn("do not match", message)
