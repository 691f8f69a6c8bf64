"""
What a protocol plugin's dropin (a module under C{twisted/plugins/})
imports: L{ProtocolPlugin} does an L{maccept.interfaces.IProtocolPlugin}'s
bookkeeping and names the plugin's code by C{module:attribute} strings, so
that plugin discovery imports nothing heavy.
"""

from maccept._plugins import ProtocolPlugin

__all__ = ["ProtocolPlugin"]
