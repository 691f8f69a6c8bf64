"""
A protocol module that raises while it is imported (a deploy that broke
it), for the tests of the one-line error.
"""

raise RuntimeError("broken on purpose")
