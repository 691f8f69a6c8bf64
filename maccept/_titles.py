"""
Process titles, when the optional C{setproctitle} is installed: C{ps}
then shows C{maccept: master ...} and C{maccept: worker N}.
"""

from __future__ import annotations


def setTitle(title: str) -> None:
    """
    Set this process's title; do nothing without C{setproctitle}.
    """
    try:
        from setproctitle import setproctitle
    except ImportError:
        return
    setproctitle(title)
