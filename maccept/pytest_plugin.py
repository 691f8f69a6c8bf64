"""
The C{maccept_pool} fixture for pytest with pytest-twisted, registered
through the C{pytest11} entry point::

    import pytest_twisted  # type: ignore[import-untyped]

    @pytest_twisted.inlineCallbacks
    def test_echo(maccept_pool):
        pool = yield maccept_pool(protocol="echo", workers=2)
        ...  # connect to pool.address.host, pool.address.port

The fixture is a factory with the arguments of
L{maccept.testing.startPool}; every pool it started is stopped at teardown,
and teardown waits until no process is left.  A test that fails shows each
of its pools' logs in its report, as pytest shows captured output: a
worker's traceback is there, where the test saw only a wrong answer.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
from twisted.internet import defer

from maccept.testing import RunningPool, startPool

PoolFactory = Callable[..., defer.Deferred[RunningPool]]


@pytest.fixture
def maccept_pool(request: pytest.FixtureRequest) -> Iterator[PoolFactory]:
    pools: list[RunningPool] = []
    request.node.macceptPools = pools  # for the failure report
    settled: list[defer.Deferred[None]] = []

    def factory(*args: Any, **kwargs: Any) -> defer.Deferred[RunningPool]:
        d = startPool(*args, **kwargs)
        done: defer.Deferred[None] = defer.Deferred()
        settled.append(done)

        def keep(pool: RunningPool) -> RunningPool:
            pools.append(pool)
            done.callback(None)
            return pool

        def lost(failure: Any) -> Any:
            done.callback(None)
            return failure

        return d.addCallbacks(keep, lost)

    yield factory

    # pytest-twisted is needed only by those who use the fixture.
    import pytest_twisted  # type: ignore[import-untyped]

    for done in settled:
        pytest_twisted.blockon(done)
    for pool in pools:
        pytest_twisted.blockon(pool.stop())
    report = getattr(request.node, "macceptCallReport", None)
    if report is not None and report.failed:
        for pool in pools:
            report.sections.append((f"maccept pool (pid {pool.pid}) log", pool.log))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[Any]:
    """
    Keep the report of a test that uses the fixture, for its teardown to
    add the pools' logs to once it has stopped them (their last lines, a
    worker's traceback among them, reach the log only then).  pytest shows
    a failed test's sections at the end of the run.
    """
    outcome: Any = yield
    report = outcome.get_result()
    if report.when == "call" and hasattr(item, "macceptPools"):
        item.macceptCallReport = report  # type: ignore[attr-defined]
