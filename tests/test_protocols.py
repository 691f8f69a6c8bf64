"""
How a C{--protocol} value names a factory, and the built-in echo protocol.
"""

from __future__ import annotations

import errno
import os
import shutil
import sys
import tempfile
from types import SimpleNamespace
from typing import Any

from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.address import IPv4Address
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import StringTransport
from twisted.logger import capturedLogs, formatEvent
from twisted.trial.unittest import SynchronousTestCase

from maccept._builtins import DatagramEcho, Echo, echoFactory
from maccept._protocols import BUILTIN_PROTOCOLS, ProtocolSpecError, resolveProtocol

HERE = __name__


# Targets for module:attribute values.


class Shout(Protocol):
    def dataReceived(self, data: bytes) -> None:
        self.transport.write(data.upper())  # type: ignore[union-attr]


class ShoutFactory(Factory):
    protocol = Shout


SHARED_FACTORY = ShoutFactory()


def makeFactory() -> Factory:
    return Factory.forProtocol(Shout)


BARE_FACTORY = Factory()


class _LazyImports:
    """
    What a module whose C{__getattr__} imports an optional dependency looks
    like to C{getattr}.
    """

    def __getattr__(self, name: str) -> object:
        raise ImportError("optional dependency 'foo' is not installed")


LAZY = _LazyImports()


def makeBareFactory() -> Factory:
    return Factory()


class SetsItInInit(Factory):
    def __init__(self) -> None:
        self.protocol = Protocol


class SetsItOnStart(Factory):
    def startFactory(self) -> None:
        self.protocol = Protocol


OWN_BUILD_ATTRIBUTE = Factory()
OWN_BUILD_ATTRIBUTE.buildProtocol = lambda addr: Protocol()  # type: ignore[method-assign]


class ForgetsItsProtocol(Factory):
    def __init__(self) -> None:
        self.ready = True


class BuildsItsOwn(Factory):
    def buildProtocol(self, addr: object) -> Protocol:
        return Protocol()


def makeWithConfig(path: str) -> Factory:
    return Factory.forProtocol(Protocol)


def makeNothing() -> object:
    return 42


class NotAProtocol:
    pass


class Namespace:
    factory = SHARED_FACTORY


def build(spec: str) -> Factory:
    factory = resolveProtocol(spec)()
    assert isinstance(factory, Factory)
    return factory


class ResolveTests(SynchronousTestCase):
    def test_echo(self) -> None:
        """
        C{echo} names the built-in echo plugin (and is built in even where
        plugin discovery finds nothing).
        """
        self.assertIs(BUILTIN_PROTOCOLS["echo"], echoFactory)
        self.assertIsInstance(build("echo").buildProtocol(None), Echo)

    def test_factoryInstance(self) -> None:
        """
        An attribute that is a factory is used as it is, every time.
        """
        maker = resolveProtocol(f"{HERE}:SHARED_FACTORY")
        self.assertIs(maker(), SHARED_FACTORY)
        self.assertIs(maker(), SHARED_FACTORY)

    def test_dottedAttribute(self) -> None:
        """
        The attribute may be a dotted path inside the module.
        """
        self.assertIs(build(f"{HERE}:Namespace.factory"), SHARED_FACTORY)

    def test_factoryClass(self) -> None:
        """
        A factory class is instantiated to make the factory.
        """
        factory = build(f"{HERE}:ShoutFactory")
        self.assertIsInstance(factory, ShoutFactory)
        self.assertIsNot(factory, SHARED_FACTORY)

    def test_protocolClass(self) -> None:
        """
        A protocol class gets a plain factory that builds it.
        """
        self.assertIsInstance(build(f"{HERE}:Shout").buildProtocol(None), Shout)

    def test_callable(self) -> None:
        """
        A zero-argument callable is called to make the factory.
        """
        self.assertIsInstance(build(f"{HERE}:makeFactory").buildProtocol(None), Shout)

    def test_unknownName(self) -> None:
        """
        A bare name that is not built in is refused, listing what is.
        """
        e = self.assertRaises(ProtocolSpecError, resolveProtocol, "nosuchname")
        self.assertIn("unknown protocol 'nosuchname'", str(e))
        self.assertIn("echo", str(e))

    def test_missingModule(self) -> None:
        """
        A module that cannot be imported is named.
        """
        e = self.assertRaises(ProtocolSpecError, resolveProtocol, "no.such.module:factory")
        self.assertIn("cannot import module 'no.such.module'", str(e))
        # Not found at all: most often a module of the current directory,
        # which twistd does not put on sys.path.
        self.assertIn("(is its directory on sys.path?", str(e))
        e = self.assertRaises(ProtocolSpecError, resolveProtocol, "tests.no_such_module:f")
        self.assertNotIn("sys.path", str(e))
        # A name its package lacks: the package was found.
        e = self.assertRaises(ProtocolSpecError, resolveProtocol, "tests.sample_imports_nothing:f")
        self.assertIn("cannot import name 'nothing_here' from 'tests'", str(e))
        self.assertNotIn("sys.path", str(e))

    def test_moduleFailsAtImport(self) -> None:
        """
        A module that raises while imported is refused with the error and
        the file and line that raised it.
        """
        e = self.assertRaises(
            ProtocolSpecError, resolveProtocol, "tests.sample_fails_at_import:factory"
        )
        self.assertIn(
            "importing module 'tests.sample_fails_at_import' failed: "
            "RuntimeError: broken on purpose",
            str(e),
        )
        self.assertRegex(str(e), r"\(at .*tests/sample_fails_at_import\.py:6\)$")

    def test_failureInALibraryNamesTheUsersLine(self) -> None:
        """
        An import that fails inside a library the module called names the
        module's own line, not the library's.
        """
        e = self.assertRaises(
            ProtocolSpecError, resolveProtocol, "tests.sample_fails_in_library:factory"
        )
        self.assertIn("JSONDecodeError", str(e))
        self.assertRegex(str(e), r"\(at .*tests/sample_fails_in_library\.py:8\)$")

    def failedImport(self, module: str, source: str) -> tuple[str, str]:
        """
        Write C{source} as C{module} in a new folder on C{sys.path}; return
        the error resolving C{module:factory} gives, and the folder.
        """
        directory = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, directory)
        with open(os.path.join(directory, f"{module}.py"), "w") as f:
            f.write(source)
        sys.path.insert(0, directory)
        self.addCleanup(sys.path.remove, directory)
        e = self.assertRaises(ProtocolSpecError, resolveProtocol, f"{module}:factory")
        return str(e), directory

    def test_syntaxErrorNamesTheUsersLine(self) -> None:
        """
        A module that does not compile is refused naming its own file and
        line (the compiler raises from no frame of that file).
        """
        source = "from twisted.internet.protocol import Factory\n\ndef f(:\n"
        message, directory = self.failedImport("maccept_sample_bad_syntax", source)
        self.assertIn("SyntaxError", message)
        self.assertTrue(message.endswith(f"(at {directory}/maccept_sample_bad_syntax.py:3)"))

    def test_syntaxErrorInAStringNamesTheUsersLine(self) -> None:
        """
        A string the module compiles (C{ast.literal_eval}) has no file of
        its own: the module's line that compiled it is named.
        """
        source = "import ast\n\nSETTINGS = ast.literal_eval('{1: ')\n"
        message, directory = self.failedImport("maccept_sample_bad_literal", source)
        self.assertTrue(message.endswith(f"(at {directory}/maccept_sample_bad_literal.py:3)"))

    def test_moduleExitsAtImport(self) -> None:
        """
        A module that calls C{sys.exit} while imported is refused with its
        status, instead of ending the process.
        """
        e = self.assertRaises(
            ProtocolSpecError, resolveProtocol, "tests.sample_exits_at_import:factory"
        )
        self.assertEqual(
            str(e),
            "importing module 'tests.sample_exits_at_import' exited (sys.exit(3)): is it a script?",
        )

    def test_missingAttribute(self) -> None:
        """
        A missing attribute is named with its module.
        """
        e = self.assertRaises(ProtocolSpecError, resolveProtocol, f"{HERE}:nothingHere")
        self.assertEqual(str(e), f"module {HERE!r} has no attribute 'nothingHere'")

    def test_lookupRaises(self) -> None:
        """
        An attribute whose lookup raises (a module's lazy C{__getattr__}
        missing an optional dependency) is refused with the reason, not a
        traceback.
        """
        e = self.assertRaises(ProtocolSpecError, resolveProtocol, f"{HERE}:LAZY.factory")
        self.assertTrue(
            str(e).startswith(
                f"looking up 'LAZY.factory' in module {HERE!r} failed:"
                " ImportError: optional dependency 'foo' is not installed (at "
            ),
            str(e),
        )

    def test_emptyParts(self) -> None:
        """
        An empty module or attribute is refused as malformed.
        """
        for spec in [":factory", f"{HERE}:"]:
            e = self.assertRaises(ProtocolSpecError, resolveProtocol, spec)
            self.assertIn("is not of the form module:attribute", str(e))

    def test_notAFactory(self) -> None:
        """
        Something that is neither a factory nor a callable (C{os:path}, a
        module), or a class that is neither a factory nor a protocol, is
        refused.
        """
        for spec in ["os:path", f"{HERE}:NotAProtocol"]:
            e = self.assertRaises(ProtocolSpecError, resolveProtocol, spec)
            self.assertIn("neither a protocol factory nor a callable", str(e))

    def test_needsArguments(self) -> None:
        """
        A factory class or a callable that cannot be called with no
        arguments (Twisted's C{Site} wants a resource) is refused at once,
        rather than failing every worker alike.
        """
        for spec in ["twisted.web.server:Site", f"{HERE}:makeWithConfig"]:
            e = self.assertRaises(ProtocolSpecError, resolveProtocol, spec)
            self.assertIn("cannot be called with no arguments", str(e))

    def test_callableReturningNonFactory(self) -> None:
        """
        A callable is accepted when resolved, but calling it fails if it
        returns something that is not a factory.
        """
        maker = resolveProtocol(f"{HERE}:makeNothing")
        e = self.assertRaises(ProtocolSpecError, maker)
        self.assertIn("returned 42, not a protocol factory", str(e))

    def test_factoryWithoutProtocol(self) -> None:
        """
        A factory with no protocol to build (Twisted's own C{Factory}, its
        class or an instance, or one a callable returns) is refused, rather
        than asserting at every connection; one whose C{buildProtocol} is
        its own is taken.
        """
        for spec in ["twisted.internet.protocol:ServerFactory", f"{HERE}:BARE_FACTORY"]:
            e = self.assertRaises(ProtocolSpecError, resolveProtocol, spec)
            self.assertIn("has no protocol to build (its protocol attribute is None)", str(e))
        for spec in [f"{HERE}:makeBareFactory", f"{HERE}:ForgetsItsProtocol"]:
            e = self.assertRaises(ProtocolSpecError, resolveProtocol(spec))
            self.assertIn("returned a factory with no protocol to build", str(e))
        self.assertIsInstance(resolveProtocol(f"{HERE}:BuildsItsOwn")(), BuildsItsOwn)
        # Set later, or built otherwise: taken.
        for spec in [f"{HERE}:SetsItOnStart", f"{HERE}:OWN_BUILD_ATTRIBUTE"]:
            resolveProtocol(spec)()
        # Its __init__ sets the protocol, as Twisted code often does.
        made = resolveProtocol(f"{HERE}:SetsItInInit")()
        self.assertIsInstance(made, SetsItInInit)
        self.assertIsInstance(made.buildProtocol(IPv4Address("TCP", "127.0.0.1", 1)), Protocol)


class LifecycleDeclaredTests(SynchronousTestCase):
    def test_halfHookedRefused(self) -> None:
        """
        A factory that declares IWorkerLifecycle but writes only some of its
        hooks is refused naming those it lacks: at start-up for an instance
        or a class, in the worker for what a callable returns (each missing
        hook would have failed a start or logged a traceback at each stop).
        """
        lacks = (
            "declares IWorkerLifecycle but has no workerDraining, workerStopping"
            " (a hook with nothing to do may return None)"
        )
        for name in ("half_hooked", "HalfHookedFactory"):
            spec = f"tests.sample_protocols:{name}"
            e = self.assertRaises(ProtocolSpecError, resolveProtocol, spec)
            self.assertEqual(str(e), f"{spec!r} {lacks}")
        spec = "tests.sample_protocols:makesHalfHooked"
        e = self.assertRaises(ProtocolSpecError, resolveProtocol(spec))
        self.assertEqual(str(e), f"{spec!r} returned a factory that {lacks}")


class EchoTests(SynchronousTestCase):
    def connect(self) -> tuple[Echo, StringTransport]:
        protocol = echoFactory().buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
        assert isinstance(protocol, Echo)
        transport = StringTransport()
        protocol.makeConnection(transport)
        return protocol, transport

    def test_echoes(self) -> None:
        """
        Every byte received is written back.
        """
        protocol, transport = self.connect()
        protocol.dataReceived(b"hello ")
        protocol.dataReceived(b"\x00\xffworld")
        self.assertEqual(transport.value(), b"hello \x00\xffworld")

    def test_backpressure(self) -> None:
        """
        The transport is registered as its own streaming producer, so a
        full write buffer pauses reading from the client.
        """
        _, transport = self.connect()
        self.assertIs(transport.producer, transport)
        self.assertTrue(transport.streaming)

    def test_halfClose(self) -> None:
        """
        Echo handles half-close: when the client stops sending, what was
        received has been written and the connection is closed.
        """
        protocol, transport = self.connect()
        self.assertIs(IHalfCloseableProtocol(protocol, None), protocol)
        protocol.dataReceived(b"last words")
        protocol.readConnectionLost()
        self.assertEqual(transport.value(), b"last words")
        self.assertTrue(transport.disconnecting)

    def test_halfCloseOnlyWhileSending(self) -> None:
        """
        Echo takes the half-close only while echoed bytes are still queued;
        with nothing queued the connection may close at once.
        """
        protocol, transport = self.connect()
        transport.dataBuffer = b""  # type: ignore[attr-defined]
        transport._tempDataLen = 0  # type: ignore[attr-defined]
        self.assertIsNone(IHalfCloseableProtocol(protocol, None))
        transport._tempDataLen = 10  # type: ignore[attr-defined]
        self.assertIs(IHalfCloseableProtocol(protocol, None), protocol)
        transport._tempDataLen = 0  # type: ignore[attr-defined]
        transport.dataBuffer = b"queued"  # type: ignore[attr-defined]
        self.assertIs(IHalfCloseableProtocol(protocol, None), protocol)

    def test_writeSideClosed(self) -> None:
        """
        When the client stops reading for good, the connection is closed.
        """
        protocol, transport = self.connect()
        protocol.writeConnectionLost()
        self.assertTrue(transport.disconnecting)

    @given(st.lists(st.binary()))
    def test_anyChunks(self, chunks: list[bytes]) -> None:
        """
        Whatever the bytes and however they arrive, the same bytes come
        back in the same order.
        """
        protocol, transport = self.connect()
        for chunk in chunks:
            protocol.dataReceived(chunk)
        self.assertEqual(transport.value(), b"".join(chunks))


class UnanswerableTransport:
    """
    A datagram transport on port 7007 whose sends fail as C{sendto} does
    for a forged source (port 0): C{EINVAL}.
    """

    def getHost(self) -> IPv4Address:
        return IPv4Address("UDP", "127.0.0.1", 7007)

    def write(self, datagram: bytes, addr: Any) -> None:
        raise OSError(errno.EINVAL, "Invalid argument")


class SendingTransport(UnanswerableTransport):
    def __init__(self) -> None:
        self.sent: list[tuple[bytes, Any]] = []

    def write(self, datagram: bytes, addr: Any) -> None:
        self.sent.append((datagram, addr))


class DatagramEchoTests(SynchronousTestCase):
    def test_unanswerableDropped(self) -> None:
        """
        A datagram that cannot be answered is dropped, not raised; the
        drops are logged once per interval with their count, and only the
        bytes sent count as sent.
        """
        counts = SimpleNamespace(bytesReceived=0, bytesSent=0)
        echo = DatagramEcho(counts)
        echo.transport = UnanswerableTransport()  # type: ignore[assignment]
        with capturedLogs() as events:
            for _ in range(3):
                echo.datagramReceived(b"forged", ("127.0.0.1", 0))
        self.assertEqual(len(events), 1)
        self.assertIn("dropped 1 datagram", formatEvent(events[0]))
        self.assertEqual((counts.bytesReceived, counts.bytesSent), (18, 0))
        self.assertEqual((echo.unanswered.total, echo.unanswered.unlogged), (3, 2))

    def test_loopsRefused(self) -> None:
        """
        A datagram from a port that would echo the answer back (an echo,
        chargen... service's, or this socket's own port: a forged source)
        is dropped and logged once per interval; others are echoed.
        """
        counts = SimpleNamespace(bytesReceived=0, bytesSent=0)
        echo = DatagramEcho(counts)
        transport = SendingTransport()
        echo.makeConnection(transport)  # type: ignore[arg-type]
        with capturedLogs() as events:
            for source in [("127.0.0.1", 7007), ("10.0.0.1", 7), ("10.0.0.1", 19)]:
                echo.datagramReceived(b"ping", source)
            echo.datagramReceived(b"real", ("127.0.0.1", 40000))
        self.assertEqual(transport.sent, [(b"real", ("127.0.0.1", 40000))])
        self.assertEqual(
            [formatEvent(e) for e in events],
            [
                "dropped 1 datagram(s) from a port that would answer the echo back"
                " (a loop a forged source sets up), the last from ('127.0.0.1', 7007)"
            ],
        )
        self.assertEqual((echo.looping.total, counts.bytesSent), (3, 4))
        # One from another UDP listener of the worker: the two would loop.
        echo = DatagramEcho(counts, echoPorts={7008})
        echo.makeConnection(SendingTransport())  # type: ignore[arg-type]
        echo.datagramReceived(b"ping", ("127.0.0.1", 7008))
        self.assertEqual(echo.looping.total, 1)
