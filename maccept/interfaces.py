"""
The public interfaces of maccept.
"""

from __future__ import annotations

from typing import Any

from zope.interface import Attribute, Interface

__all__ = ["IProtocolPlugin", "IWorkerLifecycle"]


class IProtocolPlugin(Interface):
    """
    A protocol that C{--protocol NAME} picks by name.  Provide it (and
    L{twisted.plugin.IPlugin}) on an object in a module under
    C{twisted/plugins/}; C{twistd maccept --help-protocols} lists every one
    found.  Keep that module cheap to import: plugin discovery imports it.
    """

    name = Attribute("What --protocol calls it.")
    description = Attribute("One line for --help-protocols.")

    def options() -> Any:
        """
        A new L{twisted.python.usage.Options} for the protocol's own
        options, given as C{--protocol-option KEY=VALUE} (C{--KEY VALUE} to
        these options).  Its C{postOptions} may reject values with
        L{twisted.python.usage.UsageError}: the parent checks them at
        start-up, before any worker starts.
        """

    def makeFactory(options: Any) -> Any:
        """
        Build the protocol factory from the parsed C{options}; called in
        every worker as it starts (the parent only parses the options, so
        that it never imports the protocol's code), and must return an
        C{IProtocolFactory}: anything else fails the worker's start.
        """


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
