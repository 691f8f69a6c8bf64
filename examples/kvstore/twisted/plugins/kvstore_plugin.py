"""
Makes the key-value service available as C{twistd maccept --protocol kv}.
"""

from maccept.plugins import ProtocolPlugin

kv = ProtocolPlugin(
    "kv",
    "a line-based key-value service over a shared directory (--protocol-option dir=PATH)",
    "kvstore.protocol:kvFactory",
    options="kvstore.protocol:KVOptions",
)
