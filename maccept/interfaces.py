"""
The public interfaces of maccept.
"""

from __future__ import annotations

from typing import Any

from zope.interface import Interface

__all__ = ["IWorkerLifecycle"]


class IWorkerLifecycle(Interface):
    """
    Code a protocol runs in each worker process at the edges of its life:
    provide it on the protocol factory that C{--protocol} names (for
    example, to open a database pool per worker and close it again).

    Each method may return a L{twisted.internet.defer.Deferred}; the worker
    waits for it.
    """

    def workerStarting(reactor: Any) -> Any:
        """
        The worker has adopted its listening sockets but accepts nothing
        yet; it starts accepting once this returns (or its Deferred fires).
        If it raises (or its Deferred fails), the worker fails to start, and
        the parent logs why.
        """

    def workerDraining() -> Any:
        """
        The worker stopped accepting and now finishes its open connections.
        """

    def workerStopping() -> Any:
        """
        The last connection has closed (or the drain deadline passed); the
        worker exits once this returns (or its Deferred fires).
        """
