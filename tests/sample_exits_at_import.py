"""
A protocol module that ends the process while it is imported (a script
named as C{--protocol} by mistake), for the command-line tests.
"""

import sys

sys.exit(3)
