"""
The protocols maccept ships, as L{maccept.interfaces.IProtocolPlugin}s.
Naming their code by string keeps this module cheap to import.
"""

from maccept.plugins import ProtocolPlugin

echo = ProtocolPlugin(
    "echo", "RFC 862 echo, with backpressure (the default)", "maccept._builtins:echoPlugin"
)
discard = ProtocolPlugin(
    "discard",
    "RFC 863 discard: read everything, answer nothing",
    "maccept._builtins:discardFactory",
)
chargen = ProtocolPlugin(
    "chargen",
    "RFC 864 character generator, as fast as the client reads",
    "maccept._builtins:chargenFactory",
)
daytime = ProtocolPlugin(
    "daytime", "RFC 867 daytime: the date and time, then close", "maccept._builtins:daytimeFactory"
)
web = ProtocolPlugin(
    "web",
    "a directory over HTTP with twisted.web (--protocol-option path=DIR)",
    "maccept._builtins:webFactory",
    options="maccept._builtins:WebOptions",
)
