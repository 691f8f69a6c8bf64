"""
The C{maccept} twistd plugin.  Only names the module that builds the
service, so scanning plugins imports neither a reactor nor maccept's
service; in a new parent started by SIGUSR2 it greets the old one, the
earliest maccept can (see C{maccept._handover}).
"""

from twisted.application.service import ServiceMaker

from maccept._handover import greetOldParent

greetOldParent()

maccept = ServiceMaker(
    "maccept",
    "maccept._tap",
    "A pre-fork server: worker processes all accepting on one listening socket.",
    "maccept",
)
