# -*- test-case-name: tests.test_plugins -*-
"""
The protocols maccept ships as plugins besides echo: discard (RFC 863),
chargen (RFC 864), daytime (RFC 867) and a static web site.
"""

from __future__ import annotations

import os
import time
from typing import Any

from twisted.internet.interfaces import IProtocolFactory, IPullProducer
from twisted.internet.protocol import Factory, Protocol
from twisted.protocols import wire
from twisted.python import usage
from zope.interface import implementer


def discardFactory(options: usage.Options) -> IProtocolFactory:
    return Factory.forProtocol(wire.Discard)


class Daytime(Protocol):
    """
    RFC 867: one line with the date and time (UTC), then close.
    (Twisted's C{wire.Daytime} adds bytes to a str and fails on Python 3.)
    """

    def connectionMade(self) -> None:
        now = time.strftime("%A, %B %d, %Y %H:%M:%S-UTC", time.gmtime())
        self.transport.write(now.encode("ascii") + b"\r\n")  # type: ignore[union-attr]
        self.transport.loseConnection()  # type: ignore[union-attr]


def daytimeFactory(options: usage.Options) -> IProtocolFactory:
    return Factory.forProtocol(Daytime)


#: RFC 864's rotating pattern: 72 of the 95 printable characters per line,
#: starting one character later on each line.
_PRINTABLE = bytes(range(32, 127))
_LINES = b"".join(
    (_PRINTABLE * 2)[start : start + 72] + b"\r\n" for start in range(len(_PRINTABLE))
)


@implementer(IPullProducer)
class Chargen(Protocol):
    """
    RFC 864: an endless stream of text, written only as fast as the client
    reads (a pull producer: the transport asks for the next chunk when the
    last one has gone).
    """

    chunk = _LINES * 9  # about 70 KiB: a whole cycle of lines, nine times

    def connectionMade(self) -> None:
        self.transport.registerProducer(self, False)  # type: ignore[union-attr]

    def resumeProducing(self) -> None:
        self.transport.write(self.chunk)  # type: ignore[union-attr]

    def stopProducing(self) -> None:
        pass


def chargenFactory(options: usage.Options) -> IProtocolFactory:
    return Factory.forProtocol(Chargen)


class WebOptions(usage.Options):
    optParameters = [["path", None, None, "The directory to serve."]]

    def postOptions(self) -> None:
        path = self["path"]
        if path is None:
            raise usage.UsageError("path: missing (use --protocol-option path=DIR)")
        if not os.path.isdir(path):
            raise usage.UsageError(f"path: no such directory: {path}")
        self["path"] = os.path.abspath(path)


def webFactory(options: usage.Options) -> Any:
    from twisted.web.resource import NoResource
    from twisted.web.server import Site
    from twisted.web.static import File

    class Files(File):
        """
        Twisted's L{File}, answering 404 to a path segment with a NUL byte
        (C{GET /%00}), on which C{stat} raises: a 500 and a traceback per
        request otherwise.
        """

        def getChild(self, path: bytes, request: Any) -> Any:
            if b"\0" in path:
                return NoResource()
            return super().getChild(path, request)

    site = Site(Files(options["path"]))
    site.noisy = False
    return site
