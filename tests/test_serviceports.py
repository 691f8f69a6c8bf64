"""
The parent's own ports as the log names them.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.trial.unittest import SynchronousTestCase

from maccept._serviceports import describe


class FakePort:
    def __init__(self, address: Any) -> None:
        self.address = address
        self.factory = None

    def getHost(self) -> Any:
        return self.address


class DescribeTests(SynchronousTestCase):
    def test_urls(self) -> None:
        """
        A TCP port is a URL an operator can paste, IPv6 hosts in brackets;
        a UNIX socket is its path.
        """
        for address, expected in [
            (IPv4Address("TCP", "127.0.0.1", 9107), "http://127.0.0.1:9107/"),
            (IPv6Address("TCP", "::1", 9107), "http://[::1]:9107/"),
            (UNIXAddress(b"/run/m.sock"), "/run/m.sock"),
        ]:
            self.assertEqual(describe(FakePort(address)), expected)  # type: ignore[arg-type]
