"""
The key-value service, tested with maccept's testing kit against a real
pool of two workers.
"""

from __future__ import annotations

from typing import Any

import pytest_twisted  # type: ignore[import-untyped]
from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.protocols.basic import LineOnlyReceiver


class Client(LineOnlyReceiver):
    delimiter = b"\n"

    def __init__(self) -> None:
        self.waiting: list[defer.Deferred[bytes]] = []

    def ask(self, line: bytes) -> defer.Deferred[bytes]:
        d: defer.Deferred[bytes] = defer.Deferred()
        self.waiting.append(d)
        self.sendLine(line)
        return d

    def lineReceived(self, line: bytes) -> None:
        self.waiting.pop(0).callback(line)


@defer.inlineCallbacks
def connect(pool: Any) -> Any:
    endpoint = TCP4ClientEndpoint(reactor, pool.address.host, pool.address.port)
    client = yield connectProtocol(endpoint, Client())
    return client


@pytest_twisted.inlineCallbacks  # type: ignore[untyped-decorator]
def test_setGetDelAcrossConnections(maccept_pool: Any, tmp_path: Any) -> Any:
    """
    A value stored on one connection is read on others, whichever worker
    serves them, and is gone once deleted.
    """
    pool = yield maccept_pool(
        protocol="kv", workers=2, extraArgs=["--protocol-option", f"dir={tmp_path}"]
    )
    writer = yield connect(pool)
    assert (yield writer.ask(b"SET colour blue")) == b"OK"
    readers = []
    for _ in range(6):
        reader = yield connect(pool)
        readers.append(reader)
        assert (yield reader.ask(b"GET colour")) == b"VALUE blue"
    assert (yield readers[0].ask(b"DEL colour")) == b"DELETED"
    assert (yield readers[1].ask(b"GET colour")) == b"NOT_FOUND"
    assert (yield writer.ask(b"FLY away")) == b"ERROR unknown command"
    assert (yield writer.ask(b"GET ../etc/passwd")) == b"ERROR bad key"
    for line in [b"GET .", b"SET .. x", b"DEL ..", b"SET .set-x y"]:
        assert (yield writer.ask(line)) == b"ERROR bad key"
    (tmp_path / "adirectory").mkdir()
    assert (yield writer.ask(b"SET adirectory x")) == b"ERROR Is a directory"
    assert (yield writer.ask(b"GET adirectory")) == b"ERROR Is a directory"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adirectory"]
    for client in [writer, *readers]:
        client.transport.loseConnection()
