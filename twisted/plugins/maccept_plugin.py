"""
The C{maccept} twistd plugin.  Only names the module that builds the
service, so scanning plugins imports neither maccept nor a reactor.
"""

from twisted.application.service import ServiceMaker

maccept = ServiceMaker(
    "maccept",
    "maccept._tap",
    "A pre-fork server: worker processes all accepting on one listening socket.",
    "maccept",
)
