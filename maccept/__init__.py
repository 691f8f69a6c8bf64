"""
maccept: a pre-fork "multiple accept()" server for Twisted.

The parent creates the listening sockets and a pool of worker processes;
every worker runs its own reactor, adopts the sockets and accepts on them.
Run it as C{twistd -n maccept}.
"""

__version__ = "0.1.0"
