"""
Imports a name its package lacks (the tests of --protocol).
"""

from . import nothing_here  # type: ignore[attr-defined]  # noqa: F401
