# -*- test-case-name: tests.test_tls -*-
"""
TLS on C{ssl:} listeners: Twisted's L{TLSMemoryBIOFactory}, plus what a
pre-fork server owes a bad client: a failed handshake (garbage, plain
HTTP, no shared cipher) drops that connection, as Twisted does, and is
also logged in one line and counted.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from OpenSSL import SSL
from twisted.internet.interfaces import IOpenSSLServerConnectionCreator, IProtocolFactory
from twisted.internet.protocol import connectionDone
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory, TLSMemoryBIOProtocol
from twisted.python.failure import Failure

from maccept._connections import resetByClient
from maccept._protocols import PassesRefusals
from maccept._tally import Tally

_log = Logger(namespace="maccept")


class _HandshakeWatchingProtocol(TLSMemoryBIOProtocol):
    factory: HandshakeCountingFactory
    #: Whether the client sent anything: one that connects and closes (a
    #: TCP health check) or is closed idle never began a handshake, which
    #: OpenSSL still reports as an unexpected EOF.
    _spoke = False
    #: Whether the client reset the connection: counted as a reset (by
    #: the same test, L{resetByClient}), not as a failed handshake as well.
    _reset = False

    def dataReceived(self, bytes: bytes) -> None:
        self._spoke = True
        super().dataReceived(bytes)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._reset = resetByClient(self.transport, reason)
        super().connectionLost(reason)

    def _tlsShutdownFinished(self, reason: Failure | None) -> None:
        if (
            reason is not None
            and self._spoke
            and not self._handshakeDone
            and reason.check(SSL.Error)
            # Not one this worker aborted itself (--idle-timeout, the drain
            # deadline): that is counted where it is decided.
            and not getattr(self.transport, "_aborting", False)
            and not self._reset
        ):
            self.factory.handshakeFailed(self, reason)
        super()._tlsShutdownFinished(reason)


class HandshakeCountingFactory(PassesRefusals, TLSMemoryBIOFactory):
    """
    Server-side TLS that calls C{onFailed} for each connection whose
    handshake fails, and logs the failures at most every 10 s, with how
    many there were (L{Tally}): anyone who can connect can fail one.
    """

    protocol = _HandshakeWatchingProtocol

    def __init__(
        self,
        contextFactory: IOpenSSLServerConnectionCreator,
        wrappedFactory: IProtocolFactory,
        onFailed: Callable[[], None],
    ) -> None:
        super().__init__(contextFactory, False, wrappedFactory)
        self.onFailed = onFailed
        self.failures = Tally(_log, "{count} TLS handshake(s) failed, the last from {peer}: {why}")

    def handshakeFailed(self, protocol: Any, reason: Failure) -> None:
        self.failures.add(
            peer=protocol.transport.getPeer() if protocol.transport else None,
            why=handshakeProblem(reason.value or Exception()),
        )
        self.onFailed()


def openSSLReasons(error: BaseException) -> list[tuple[str, str]]:
    """
    The C{(library, reason)} of each entry on the error stack an OpenSSL
    error carries (C{[(library, function, reason)]}), innermost first.
    """
    stack = error.args[0] if error.args and isinstance(error.args[0], list) else []
    return [
        (str(entry[0] or ""), str(entry[-1]))
        for entry in stack
        if isinstance(entry, tuple) and entry and entry[-1]
    ]


def handshakeProblem(error: BaseException) -> str:
    """
    OpenSSL's reason, short: C{wrong version number}, C{no shared cipher};
    or that the client closed the connection before the handshake was
    done (OpenSSL's C{(-1, 'Unexpected EOF')}).
    """
    if isinstance(error, SSL.SysCallError):
        if error.args and error.args[0] == -1:
            return "the client closed the connection before the handshake was done"
        return f"system error {error.args[-1] if error.args else error}"
    reasons = openSSLReasons(error)
    if reasons:
        return reasons[-1][1]
    return str(error) or error.__class__.__name__
