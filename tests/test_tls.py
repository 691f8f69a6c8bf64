"""
TLS on C{--listen ssl:...}: the parent checks the certificate at start-up,
every worker loads it and serves TLS on the shared socket.
"""

from __future__ import annotations

import datetime
import os
import shutil
import signal
import socket
import ssl
import tempfile
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from twisted.internet.address import IPv4Address
from twisted.internet.endpoints import serverFromString
from twisted.internet.error import ConnectionAborted, ConnectionDone, ConnectionLost
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import StringTransport
from twisted.logger import capturedLogs, formatEvent
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from maccept._tls import HandshakeCountingFactory
from tests.server import MacceptServer, metric, runMaccept, waitFor
from tests.test_proxy import v1Header


def selfSignedCertificate(directory: Path) -> tuple[Path, Path]:
    """
    A key and a certificate for C{localhost}, valid for a day.
    """
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
        .sign(key, hashes.SHA256())
    )
    keyPath, certificatePath = directory / "key.pem", directory / "cert.pem"
    keyPath.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    certificatePath.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    return keyPath, certificatePath


#: RFC 7919's ffdhe2048 group: Diffie-Hellman parameters OpenSSL takes,
#: without the seconds that generating some would cost.
FFDHE2048 = b"""-----BEGIN DH PARAMETERS-----
MIIBCAKCAQEA//////////+t+FRYortKmq/cViAnPTzx2LnFg84tNpWp4TZBFGQz
+8yTnc4kmz75fS/jY2MMddj2gbICrsRhetPfHtXV/WVhJDP1H18GbtCFY2VVPe0a
87VXE15/V8k1mE8McODmi3fipona8+/och3xWKE2rec1MKzKT0g6eXq8CrGCsyT7
YdEIqUuyyOP7uWrat2DX9GgdT0Kj3jlN9K5W7edjcrsZCwenyO4KbXCeAvzhzffi
7MA0BM0oNC9hkXL+nOmFg/+OTxIy7vKBg8P+OxtMb61zO7X8vC7CIAXFjvGDfRaD
ssbzSibBsu/6iGtCOGEoXJf//////////wIBAg==
-----END DH PARAMETERS-----
"""


class TLSTests(SynchronousTestCase):
    def setUp(self) -> None:
        directory = Path(tempfile.mkdtemp(prefix="maccept-tls-"))
        self.addCleanup(shutil.rmtree, directory, True)
        self.key, self.certificate = selfSignedCertificate(directory)
        self.context = ssl.create_default_context(cafile=str(self.certificate))

    def description(self, prefix: str = "") -> str:
        return f"{prefix}ssl:0:interface=127.0.0.1:privateKey={self.key}:certKey={self.certificate}"

    def roundTrips(self, server: MacceptServer, header: bytes = b"") -> None:
        for n in range(10):
            raw = socket.create_connection(("127.0.0.1", server.port), timeout=10)
            if header:
                raw.sendall(header)
            with self.context.wrap_socket(raw, server_hostname="localhost") as client:
                message = f"secret {n} ".encode() * 1000
                client.sendall(message)
                received = b""
                while len(received) < len(message):
                    received += client.recv(65536)
                self.assertEqual(received, message)

    def test_echoOverTLS(self) -> None:
        """
        Clients that verify the certificate get a byte-exact echo from any
        of the workers.
        """
        server = MacceptServer(["--workers", "2", "--listen", self.description()])
        self.addCleanup(server.cleanup)
        server.waitReady()
        self.roundTrips(server)

    def test_badHandshakesCounted(self) -> None:
        """
        Clients that do not speak TLS (plain HTTP, random bytes) are
        dropped, each logged in one line and counted; the same worker goes
        on serving TLS clients.  Clients that connect and close without a
        byte (a load balancer's TCP health check) are not failed handshakes.
        """
        server = MacceptServer(
            [
                *("--workers", "1", "--listen", self.description()),
                *("--metrics", "tcp:0:interface=127.0.0.1"),
            ]
        )
        self.addCleanup(server.cleanup)
        server.waitReady()
        [worker] = server.workers()
        for _ in range(3):
            socket.create_connection(("127.0.0.1", server.port), timeout=10).close()
        for garbage in [b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", bytes(range(256)) * 4]:
            with socket.create_connection(("127.0.0.1", server.port), timeout=10) as client:
                client.sendall(garbage)
                try:
                    while client.recv(65536):
                        pass
                except ConnectionResetError:
                    pass
        waitFor(lambda: metric(server, "maccept_tls_handshakes_failed_total") == 2, what="count")
        # One line: failures are logged at most every 10 s, with how many.
        self.assertEqual(server.log().count("TLS handshake(s) failed, the last from"), 1)
        self.assertNotIn("Traceback", server.log())
        self.roundTrips(server)
        self.assertEqual(server.workers(), [worker])
        self.assertEqual(metric(server, "maccept_tls_handshakes_failed_total"), 2)

    def test_tlsBehindProxyHeader(self) -> None:
        """
        With C{haproxy:ssl:...} the PROXY header comes first, in the clear,
        then the TLS handshake; closed connections are gone from the
        worker.
        """
        server = MacceptServer(
            [
                *("--workers", "1", "--listen", self.description("haproxy:")),
                *("--metrics", "tcp:0:interface=127.0.0.1"),
            ]
        )
        self.addCleanup(server.cleanup)
        server.waitReady()
        self.roundTrips(server, v1Header("192.0.2.5", 999, server.port))
        # Each closed connection is let go of (the half-close question once
        # went round between the TLS protocol and the PROXY wrapper).
        waitFor(lambda: metric(server, "maccept_connections_open") == 0, what="all closed")
        self.assertNotIn("Traceback", server.log())

    def test_missingCertificate(self) -> None:
        """
        A certificate that cannot be read is one line at start-up.
        """
        description = f"ssl:0:privateKey={self.key}:certKey=/no/such/cert.pem"
        result = runMaccept(["--listen", description])
        self.assertEqual(result.returncode, 2)
        self.assertNotIn("Traceback", result.stdout + result.stderr)
        self.assertEqual(
            result.stderr.strip(),
            f"maccept: error: --listen {description}: cannot read certKey=/no/such/cert.pem",
        )

    def test_unusableOptionsRefused(self) -> None:
        """
        Diffie-Hellman parameters OpenSSL will not load, and an sslmethod
        that is no server method of OpenSSL's, are one line at start-up,
        not a failure at every handshake.
        """
        garbage = self.key.with_name("dh.pem")
        garbage.write_bytes(b"not PEM\n")
        for option, problem in [
            (f"dhParameters={garbage}", f"cannot load dhParameters={garbage}: PEM routines"),
            ("sslmethod=BOGUS", "sslmethod must be one of "),
            ("sslmethod=DTLS_METHOD", "sslmethod must be one of "),
        ]:
            description = f"{self.description()}:{option}"
            result = runMaccept(["--listen", description])
            self.assertEqual(result.returncode, 2, result.stderr)
            [line] = result.stderr.splitlines()
            self.assertTrue(
                line.startswith(f"maccept: error: --listen {description}: {problem}"), line
            )
            self.assertNotIn("Traceback", result.stdout + result.stderr)

    def test_parametersSpoiledBeforeReload(self) -> None:
        """
        Parameters spoiled on disk after the start fail the reload's new
        workers as they start, with the reason, rather than every handshake
        of theirs: the old workers serve on.
        """
        parameters = self.key.with_name("dh.pem")
        parameters.write_bytes(FFDHE2048)
        server = MacceptServer(
            ["--workers", "1", "--listen", f"{self.description()}:dhParameters={parameters}"]
        )
        self.addCleanup(server.cleanup)
        server.waitReady()
        self.roundTrips(server)
        parameters.write_bytes(b"not PEM\n")
        os.kill(server.pid, signal.SIGHUP)
        waitFor(lambda: "reload failed, keeping the old workers" in server.log(), what="failure")
        self.assertIn("no start line", server.log())
        self.roundTrips(server)


class HandshakeWatchingTests(SynchronousTestCase):
    """
    What counts as a failed handshake, on a string transport.
    """

    def setUp(self) -> None:
        directory = Path(tempfile.mkdtemp(prefix="maccept-tls-"))
        self.addCleanup(shutil.rmtree, directory, True)
        key, certificate = selfSignedCertificate(directory)
        endpoint: Any = serverFromString(None, f"ssl:0:privateKey={key}:certKey={certificate}")
        self.failed: list[None] = []
        self.factory = HandshakeCountingFactory(
            endpoint._sslContextFactory,
            Factory.forProtocol(Protocol),
            lambda: self.failed.append(None),
        )

    def connect(self) -> Any:
        protocol = self.factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
        protocol.makeConnection(StringTransport())
        return protocol

    def test_silentCloseIsNoFailure(self) -> None:
        """
        A client that closes, or is closed idle, before sending a byte
        began no handshake.
        """
        for why in [ConnectionDone(), ConnectionAborted()]:
            self.connect().connectionLost(Failure(why))
        self.assertEqual(self.failed, [])

    def test_abortedMidHandshakeIsNoFailure(self) -> None:
        """
        A client this worker aborted mid-handshake (--idle-timeout, the
        drain deadline) is counted there, not as a failed handshake too.
        """
        protocol = self.connect()
        protocol.dataReceived(b"\x16\x03\x01\x00")  # the start of a ClientHello
        protocol.transport._aborting = True
        protocol.connectionLost(Failure(ConnectionAborted()))
        self.assertEqual(self.failed, [])

    def test_closedMidHandshakeIsAFailure(self) -> None:
        """
        A client that closes after the start of a ClientHello failed its
        handshake, and the log says so in words, not OpenSSL's tuple.
        """
        protocol = self.connect()
        protocol.dataReceived(b"\x16\x03\x01\x00")
        with capturedLogs() as events:
            protocol.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(self.failed, [None])
        self.assertIn(
            ": the client closed the connection before the handshake was done",
            " ".join(formatEvent(event) for event in events),
        )

    def test_resetMidHandshakeIsAReset(self) -> None:
        """
        A client that resets the connection mid-handshake is counted once,
        as a reset (where every connection's reset is), not as a failed
        handshake too.
        """
        protocol = self.connect()
        protocol.dataReceived(b"\x16\x03\x01\x00")
        protocol.connectionLost(Failure(ConnectionLost()))
        self.assertEqual(self.failed, [])

    def test_garbageIsAFailure(self) -> None:
        """
        Bytes that are not TLS are.
        """
        protocol = self.connect()
        protocol.dataReceived(b"GET / HTTP/1.1\r\n\r\n")
        if protocol.transport.connected:
            protocol.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(self.failed, [None])

    def test_refusalPassedOn(self) -> None:
        """
        A wrapped factory that refuses a connection (returns C{None}) has
        it refused, not wrapped.
        """
        self.factory.wrappedFactory = RefusingFactory()
        self.assertIsNone(self.factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 1)))


class RefusingFactory(Factory):
    def buildProtocol(self, addr: Any) -> None:
        return None
