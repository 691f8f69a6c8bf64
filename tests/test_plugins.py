"""
Protocol plugins: discovery, options, the built-in protocols served by a
real pool, a third party's plugin, and bad input.
"""

from __future__ import annotations

import io
import shutil
import sys
import tempfile
import textwrap
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import StringTransport
from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from maccept import _plugins
from maccept._builtins import Chargen
from maccept._options import CommandLineOptions
from maccept._plugins import ProtocolPlugin, optionArguments, pluginFactoryMaker, pluginsByName
from maccept._protocols import ProtocolSpecError, resolveProtocol
from maccept.interfaces import IProtocolPlugin
from tests.server import MacceptServer, runMaccept

LOOPBACK = "tcp:0:interface=127.0.0.1"
BUILT_IN = {"echo", "discard", "chargen", "daytime", "web"}


def bareFactoryFromOptions(options: object) -> Factory:
    """
    A plugin's factory maker that returns Twisted's bare C{Factory}.
    """
    return Factory()


def protocolClassFromOptions(options: object) -> type:
    """
    A plugin's factory maker that returns a protocol class by mistake.
    """
    from tests.sample_protocols import Sleepy

    return Sleepy


class Versioned(usage.Options):
    """
    A plugin's options with a C{--version} of their own: each use recorded
    in L{VERSIONS_SHOWN}.
    """

    def opt_version(self) -> None:
        VERSIONS_SHOWN.append(True)


VERSIONS_SHOWN: list[bool] = []


class VersionFlag(usage.Options):
    """
    A plugin's options with a C{version} flag.
    """

    optFlags = [["version", None, "Speak the old version of the protocol."]]


class VersionParameter(usage.Options):
    """
    A plugin's options with a C{version} parameter.
    """

    optParameters = [["version", None, "1", "The protocol version to speak."]]


def madeWith(options: usage.Options) -> Any:
    """
    A factory that remembers the options it was made with.
    """
    factory: Any = Factory.forProtocol(Protocol)
    factory.options = options
    return factory


class DiscoveryTests(SynchronousTestCase):
    myWeb = ProtocolPlugin("web", "My web", "tests.sample_protocols:Sleepy")

    def test_builtInsFound(self) -> None:
        """
        Every built-in protocol is found as an L{IProtocolPlugin}.
        """
        plugins = pluginsByName()
        self.assertLessEqual(BUILT_IN, set(plugins))
        for name in BUILT_IN:
            [plugin] = plugins[name]
            self.assertTrue(verifyObject(IProtocolPlugin, plugin))
            self.assertEqual(plugin.name, name)

    def test_optionArguments(self) -> None:
        """
        C{KEY=VALUE} becomes C{--KEY VALUE}; a bare C{KEY} is a flag; the
        value keeps any further C{=}.
        """
        self.assertEqual(
            optionArguments(["path=/srv", "verbose", "q=a=b"]),
            ["--path", "/srv", "--verbose", "--q", "a=b"],
        )

    def test_pluginOptionsChecked(self) -> None:
        """
        A plugin's options are checked when the protocol is resolved, with
        the plugin's name in the message.
        """
        e = self.assertRaises(ProtocolSpecError, resolveProtocol, "web", ["path=/no/such/dir"])
        self.assertEqual(str(e), "web: path: no such directory: /no/such/dir")
        e = self.assertRaises(ProtocolSpecError, resolveProtocol, "echo", ["speed=9"])
        self.assertEqual(str(e), "echo: option --speed not recognized")

    def test_noTwistedVersionOption(self) -> None:
        """
        C{version} is no plugin option (usage.Options' own C{--version}
        would print Twisted's version and exit the parent): refused as
        unknown, and not listed in the plugin's help; a plugin that defines
        its own C{opt_version} keeps it.
        """
        e = self.assertRaises(ProtocolSpecError, resolveProtocol, "web", ["version"])
        self.assertEqual(str(e), "web: option --version not recognized")
        plugin = ProtocolPlugin(
            "versioned", "d", "maccept._builtins:echoPlugin", options=f"{__name__}:Versioned"
        )
        pluginFactoryMaker(plugin, ["version"])
        self.assertEqual(VERSIONS_SHOWN, [True])

    def test_declaredVersionOption(self) -> None:
        """
        A plugin that declares C{version} as a flag or a parameter gets it,
        not Twisted's C{--version} (which shadows it in usage.Options), and
        its help says what the plugin says of it.
        """
        for optionsClass, given, expected in [
            ("VersionFlag", "version", 1),
            ("VersionParameter", "version=2", "2"),
        ]:
            plugin = ProtocolPlugin(
                "versioned", "d", f"{__name__}:madeWith", options=f"{__name__}:{optionsClass}"
            )
            factory: Any = pluginFactoryMaker(plugin, [given])()
            self.assertEqual(factory.options["version"], expected)
            help = str(factory.options)
            self.assertNotIn("Twisted version", help)
            self.assertIn("version", help)

    def test_optionForms(self) -> None:
        """
        A flag given a value, and a key written with its dashes, are named
        as such, not with getopt's words ("Wrong number of arguments",
        "option ----version not recognized").
        """
        plugin = ProtocolPlugin(
            "versioned", "d", f"{__name__}:madeWith", options=f"{__name__}:VersionFlag"
        )
        for given, message in [
            ("version=yes", "--protocol-option version=yes: version is a flag, given without a"),
            ("--version", "--protocol-option --version: give it as version..., without dashes"),
        ]:
            e = self.assertRaises(usage.UsageError, pluginFactoryMaker, plugin, [given])
            self.assertIn(message, str(e))

    def test_pluginWhoseOptionsFail(self) -> None:
        """
        A plugin whose options class cannot be loaded is refused with the
        reason, as a bad option is, not with a traceback.
        """
        broken = ProtocolPlugin("broken", "d", "no_such_module:f", options="no_such_module:O")
        self.patch(_plugins, "pluginsByName", lambda: {"broken": [broken]})
        with self.assertRaises(ProtocolSpecError) as caught:
            resolveProtocol("broken")
        self.assertEqual(
            str(caught.exception),
            "broken: it names no_such_module:O, but there is no module 'no_such_module'",
        )

    def test_pluginNamesNoAttribute(self) -> None:
        """
        A plugin whose C{module:attribute} names nothing is refused naming
        that string, not a line of maccept's where the lookup failed: its
        options class at once, its factory when a worker builds it.
        """
        missing = "but module 'tests.sample_protocols' has no attribute"
        broken = ProtocolPlugin("broken", "d", "x:y", "tests.sample_protocols:NoSuchOptions")
        self.patch(_plugins, "pluginsByName", lambda: {"broken": [broken]})
        with self.assertRaises(ProtocolSpecError) as caught:
            resolveProtocol("broken")
        self.assertEqual(
            str(caught.exception),
            f"broken: it names tests.sample_protocols:NoSuchOptions, {missing} 'NoSuchOptions'",
        )
        broken = ProtocolPlugin("broken", "d", "x:y", "json.nosuchpackage.module:Options")
        self.patch(_plugins, "pluginsByName", lambda: {"broken": [broken]})
        with self.assertRaises(ProtocolSpecError) as caught:
            resolveProtocol("broken")
        self.assertEqual(
            str(caught.exception),
            "broken: it names json.nosuchpackage.module:Options, but there is no module"
            " 'json.nosuchpackage.module'",
        )
        broken = ProtocolPlugin("broken", "d", "tests.sample_protocols:nothing")
        self.patch(_plugins, "pluginsByName", lambda: {"broken": [broken]})
        with self.assertRaises(ProtocolSpecError) as made:
            resolveProtocol("broken")()
        self.assertEqual(
            str(made.exception),
            f"broken: it names tests.sample_protocols:nothing, {missing} 'nothing'",
        )

    def test_twoPluginsOfOneName(self) -> None:
        """
        A name that two installed plugins share is refused with both their
        descriptions, rather than serving whichever was found last.
        """
        both = {"web": [pluginsByName()["web"][0], self.myWeb]}
        self.patch(_plugins, "pluginsByName", lambda: both)
        with self.assertRaises(ProtocolSpecError) as caught:
            resolveProtocol("web")
        message = str(caught.exception)
        self.assertIn("2 protocol plugins are named 'web'", message)
        self.assertIn("'My web'", message)
        self.assertIn("name the factory you mean as module:attribute", message)

    def test_makeFactoryReturnsAFactory(self) -> None:
        """
        A plugin whose C{makeFactory} returns something else than a factory
        (a protocol class, say) fails when the factory is made, naming the
        plugin, rather than deep in Twisted when the port starts.
        """
        wrong = ProtocolPlugin("wrong", "d", "tests.test_plugins:protocolClassFromOptions")
        self.patch(_plugins, "pluginsByName", lambda: {"wrong": [wrong]})
        make = resolveProtocol("wrong")
        with self.assertRaises(TypeError) as caught:
            make()
        self.assertIn("protocol plugin 'wrong': makeFactory returned", str(caught.exception))
        self.assertIn("not a protocol factory", str(caught.exception))

    def test_makeFactoryReturnsAFactoryThatBuilds(self) -> None:
        """
        A plugin whose C{makeFactory} returns a factory with no protocol to
        build fails when the factory is made, not at every connection.
        """
        bare = ProtocolPlugin("bare", "d", "tests.test_plugins:bareFactoryFromOptions")
        self.patch(_plugins, "pluginsByName", lambda: {"bare": [bare]})
        with self.assertRaises(TypeError) as caught:
            resolveProtocol("bare")()
        self.assertEqual(
            str(caught.exception),
            "protocol plugin 'bare': makeFactory returned a factory with no protocol to build",
        )

    def test_onePluginFoundTwice(self) -> None:
        """
        One plugin object that getPlugins yields twice (an alias, or a
        dropin importing another's plugin) is one plugin, not a clash.
        """
        echo = pluginsByName()["echo"][0]
        self.patch(_plugins, "getPlugins", lambda interface, package: iter([echo, echo]))
        self.assertEqual(_plugins.pluginsByName(), {"echo": [echo]})
        self.assertIsNotNone(resolveProtocol("echo"))

    def test_pluginOptionsModuleExits(self) -> None:
        """
        A plugin whose options module calls C{sys.exit} at import is
        refused with the status, as a C{module:attribute} is.
        """
        scripty = ProtocolPlugin("scripty", "d", "x:f", options="tests.sample_exits_at_import:O")
        self.patch(_plugins, "pluginsByName", lambda: {"scripty": [scripty]})
        with self.assertRaises(ProtocolSpecError) as caught:
            resolveProtocol("scripty")
        self.assertEqual(str(caught.exception), "scripty: its options exited (sys.exit(3))")

    def test_twoPluginsOfOneNameListed(self) -> None:
        """
        C{--help-protocols} lists both plugins of one name, each marked.
        """
        both = {"web": [pluginsByName()["web"][0], self.myWeb]}
        self.patch(_plugins, "pluginsByName", lambda: both)
        printed = io.StringIO()
        self.patch(sys, "stdout", printed)
        self.assertRaises(SystemExit, CommandLineOptions().parseOptions, ["--help-protocols"])
        lines = printed.getvalue().splitlines()
        self.assertEqual(len(lines), 2)
        marked = "(ambiguous: several plugins have this name)"
        self.assertTrue(all(line.endswith(marked) for line in lines))
        self.assertIn("My web", lines[1])

    def test_moduleAttributeTakesNoOptions(self) -> None:
        """
        C{--protocol-option} goes with plugins only.
        """
        e = self.assertRaises(
            ProtocolSpecError, resolveProtocol, "tests.sample_protocols:Sleepy", ["a=1"]
        )
        self.assertIn("takes no --protocol-option", str(e))


class ChargenTests(SynchronousTestCase):
    def test_pullsRfc864Lines(self) -> None:
        """
        Chargen is a pull producer: it writes one chunk each time the
        transport asks; the text is RFC 864's 72-character lines, each
        starting one character after the last.
        """
        transport = StringTransport()
        chargen = Chargen()
        chargen.makeConnection(transport)
        self.assertIs(transport.producer, chargen)
        self.assertFalse(transport.streaming)
        chargen.resumeProducing()
        lines = transport.value().split(b"\r\n")[:96]
        self.assertTrue(all(len(line) == 72 for line in lines))
        self.assertEqual(lines[0][:3], b' !"')
        self.assertEqual(lines[1][:3], b'!"#')
        self.assertEqual(lines[95], lines[0])


class BuiltInServingTests(SynchronousTestCase):
    def start(self, *args: str, env: dict[str, str] | None = None) -> MacceptServer:
        server = MacceptServer(["--listen", LOOPBACK, "--workers", "1", *args], env=env)
        self.addCleanup(server.cleanup)
        return server.waitReady()

    def test_discard(self) -> None:
        """
        Discard reads everything and answers nothing; the connection stays
        open until the client closes it.
        """
        server = self.start("--protocol", "discard")
        with server.connect() as client:
            client.sendall(b"x" * 100_000)
            client.settimeout(0.2)
            self.assertRaises(TimeoutError, client.recv, 1)

    def test_chargen(self) -> None:
        """
        Chargen streams RFC 864 lines for as long as the client reads.
        """
        server = self.start("--protocol", "chargen")
        with server.connect() as client:
            client.settimeout(10)
            received = b""
            while len(received) < 300_000:
                chunk = client.recv(65536)
                self.assertTrue(chunk)
                received += chunk
        lines = received.split(b"\r\n")[:-1]
        self.assertGreater(len(lines), 3000)
        self.assertTrue(all(len(line) == 72 for line in lines))

    def test_daytime(self) -> None:
        """
        Daytime sends one line with the date and closes.
        """
        server = self.start("--protocol", "daytime")
        with server.connect() as client:
            client.settimeout(10)
            received = b""
            while chunk := client.recv(100):
                received += chunk
        self.assertTrue(received.endswith(b"\r\n"))
        self.assertIn(str(time.gmtime().tm_year).encode(), received)

    def test_web(self) -> None:
        """
        The web plugin serves the directory named by its path option,
        answers 404 to a path it cannot look up, and 413 to a request with a
        body.
        """
        root = tempfile.mkdtemp(prefix="maccept-web-")
        self.addCleanup(shutil.rmtree, root, True)
        Path(root, "hello.txt").write_text("hello from the web plugin\n")
        server = self.start("--protocol", "web", "--protocol-option", f"path={root}")
        url = f"http://127.0.0.1:{server.port}/hello.txt"
        with urllib.request.urlopen(url, timeout=10) as response:
            self.assertEqual(response.read(), b"hello from the web plugin\n")
        # A NUL in the path is a 404, not a 500 and a traceback.
        with self.assertRaises(urllib.error.HTTPError) as caught:
            urllib.request.urlopen(f"http://127.0.0.1:{server.port}/%00", timeout=10)
        self.assertEqual(caught.exception.code, 404)
        caught.exception.close()
        # Static files take no body: one would be spooled to a temporary file.
        post = urllib.request.Request(url, data=b"x" * 50000)
        with self.assertRaises(urllib.error.HTTPError) as caught:
            urllib.request.urlopen(post, timeout=10)
        self.assertEqual(caught.exception.code, 413)
        caught.exception.close()
        self.assertNotIn("Traceback", server.log())

    def test_thirdPartyPlugin(self) -> None:
        """
        A plugin in another distribution's C{twisted/plugins/} is found and
        served, with its own options.
        """
        top = tempfile.mkdtemp(prefix="maccept-plugin-")
        plugins = Path(top, "twisted", "plugins")
        plugins.mkdir(parents=True)
        Path(top, "shout.py").write_text(
            textwrap.dedent(
                """
                from twisted.internet.protocol import Factory, Protocol
                from twisted.python import usage

                class ShoutOptions(usage.Options):
                    optParameters = [["suffix", None, "!", "added to each answer"]]

                def factory(options):
                    suffix = options["suffix"].encode()

                    class Shout(Protocol):
                        def dataReceived(self, data):
                            self.transport.write(data.upper() + suffix)

                    return Factory.forProtocol(Shout)
                """
            )
        )
        (plugins / "shout_plugin.py").write_text(
            "from maccept._plugins import ProtocolPlugin\n"
            "shout = ProtocolPlugin('shout', 'answers in capitals', 'shout:factory',"
            " options='shout:ShoutOptions')\n"
        )
        env = {"PYTHONPATH": top}
        self.addCleanup(shutil.rmtree, top, True)
        server = self.start("--protocol", "shout", "--protocol-option", "suffix=?!", env=env)
        with server.connect() as client:
            client.settimeout(10)
            client.sendall(b"hi")
            self.assertEqual(client.recv(10), b"HI?!")


class PluginCommandLineTests(SynchronousTestCase):
    def test_helpProtocols(self) -> None:
        """
        C{--help-protocols} lists every plugin with its description, and
        exits 0.
        """
        result = runMaccept(["--help-protocols"])
        self.assertEqual(result.returncode, 0, result.stderr)
        names = {line.split()[0] for line in result.stdout.splitlines() if line.strip()}
        self.assertLessEqual(BUILT_IN, names)

    def test_version(self) -> None:
        """
        C{--version} names maccept's version first, then Twisted's and
        Python's, and exits 0.
        """
        result = runMaccept(["--version"])
        self.assertEqual(result.returncode, 0, result.stderr)
        line = result.stdout.strip()
        self.assertRegex(line, r"^maccept \S+ \(Twisted \S+, Python \S+\)$")

    def test_pluginOptionHelp(self) -> None:
        """
        C{--protocol-option help} prints the plugin's own options and exits
        0, as C{--help} does, under a usage line that says how to give them.
        """
        result = runMaccept(["--protocol", "web", "--protocol-option", "help"])
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertIn("--path", result.stdout)
        self.assertNotIn("--version", result.stdout)
        self.assertEqual(
            result.stdout.splitlines()[0],
            "Usage: twistd maccept --protocol web --protocol-option KEY=VALUE ...",
        )

    def assertOneLine(self, args: list[str], expected: str) -> None:
        result = runMaccept(args)
        self.assertEqual(result.returncode, 2)
        self.assertNotIn("Traceback", result.stdout + result.stderr)
        self.assertEqual(result.stderr.strip().splitlines(), [f"maccept: error: {expected}"])

    def test_unknownPluginListsKnown(self) -> None:
        self.assertOneLine(
            ["--protocol", "gopher"],
            "--protocol: unknown protocol 'gopher': use one of chargen, daytime, discard, "
            "echo, web or module:attribute",
        )

    def test_wrongPluginOption(self) -> None:
        self.assertOneLine(
            ["--protocol", "echo", "--protocol-option", "loud=yes"],
            "--protocol: echo: option --loud not recognized",
        )

    def test_webRootMissing(self) -> None:
        self.assertOneLine(
            ["--protocol", "web", "--protocol-option", "path=/no/such/root"],
            "--protocol: web: path: no such directory: /no/such/root",
        )
