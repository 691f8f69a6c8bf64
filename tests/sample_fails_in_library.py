"""
A protocol module whose import fails inside the standard library (bad JSON
in its configuration), for the tests of the one-line error.
"""

import json

settings = json.loads("{not json")
