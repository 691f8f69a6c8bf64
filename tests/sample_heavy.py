"""
A protocol module that needs 64 MiB as soon as it is imported (a large
model or table loaded at import), named as C{tests.sample_heavy:factory}.
"""

from __future__ import annotations

from twisted.internet.protocol import Factory

from maccept._builtins import Echo

#: Bytes, not a zeroed bytearray: every page is touched, so resident.
_table = b"x" * (64 * 2**20)


def factory() -> Factory:
    return Factory.forProtocol(Echo)
