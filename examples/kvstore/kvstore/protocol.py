"""
The C{kv} protocol, its options, and its factory.
"""

from __future__ import annotations

import os
import re
import tempfile
from typing import Any

from twisted.internet.protocol import Factory
from twisted.protocols.basic import LineOnlyReceiver
from twisted.python import usage

#: Not starting with a dot: neither C{.} nor C{..}, nor the temporary files.
KEY = re.compile(rb"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,199}$")


class KVOptions(usage.Options):
    optParameters = [["dir", None, None, "The directory that holds the keys."]]

    def postOptions(self) -> None:
        if self["dir"] is None:
            raise usage.UsageError("dir: missing (use --protocol-option dir=PATH)")
        if not os.path.isdir(self["dir"]):
            raise usage.UsageError(f"dir: no such directory: {self['dir']}")
        self["dir"] = os.path.abspath(self["dir"])


class KVProtocol(LineOnlyReceiver):
    delimiter = b"\n"
    MAX_LENGTH = 64 * 1024

    def __init__(self, directory: str) -> None:
        self.directory = directory

    def lineReceived(self, line: bytes) -> None:
        command, _, rest = line.rstrip(b"\r").partition(b" ")
        handler = getattr(self, f"do_{command.decode('ascii', 'replace').upper()}", None)
        if handler is None:
            self.answer(b"ERROR unknown command")
            return
        try:
            self.answer(handler(rest))
        except OSError as e:  # a key that names a directory, a full disk...
            self.answer(b"ERROR " + (e.strerror or "cannot").encode())

    def answer(self, line: bytes) -> None:
        self.sendLine(line)

    def _path(self, key: bytes) -> str | None:
        if not KEY.match(key):
            return None
        return os.path.join(self.directory, key.decode("ascii"))

    def do_SET(self, rest: bytes) -> bytes:
        key, _, value = rest.partition(b" ")
        path = self._path(key)
        if path is None:
            return b"ERROR bad key"
        # Write then rename: a reader in another worker sees the old value
        # or the new one, never half of one.
        fd, temporary = tempfile.mkstemp(dir=self.directory, prefix=".set-")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(value)
            os.replace(temporary, path)
        except OSError:
            os.unlink(temporary)
            raise
        return b"OK"

    def do_GET(self, key: bytes) -> bytes:
        path = self._path(key)
        if path is None:
            return b"ERROR bad key"
        try:
            with open(path, "rb") as f:
                return b"VALUE " + f.read()
        except FileNotFoundError:
            return b"NOT_FOUND"

    def do_DEL(self, key: bytes) -> bytes:
        path = self._path(key)
        if path is None:
            return b"ERROR bad key"
        try:
            os.remove(path)
        except FileNotFoundError:
            return b"NOT_FOUND"
        return b"DELETED"

    def lineLengthExceeded(self, line: bytes) -> None:
        self.answer(b"ERROR line too long")
        self.transport.loseConnection()  # type: ignore[union-attr]


def kvFactory(options: Any) -> Factory:
    directory = options["dir"]
    return Factory.forProtocol(lambda: KVProtocol(directory))
