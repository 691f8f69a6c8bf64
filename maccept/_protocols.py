# -*- test-case-name: tests.test_protocols -*-
"""
The protocols a worker serves, and how a C{--protocol} value names one.

A value is either a protocol plugin's name (C{echo}) or C{module:attribute}, where
the attribute is an L{IProtocolFactory} provider, a factory class, a protocol
class, or a zero-argument callable that returns a factory.  The parent
resolves the value once at start-up so that a typo fails before any worker
starts; every worker resolves it again, so a reload picks up new code.
"""

from __future__ import annotations

import importlib
import inspect
import sys
import sysconfig
from collections.abc import Callable, Sequence
from typing import Any, cast

from twisted.internet.interfaces import (
    IAddress,
    IProtocol,
    IProtocolFactory,
)
from twisted.internet.protocol import Factory, Protocol
from twisted.protocols.policies import WrappingFactory
from twisted.python import usage

from maccept._builtins import echoFactory
from maccept.interfaces import IWorkerLifecycle


class ProtocolSpecError(ValueError):
    """
    A C{--protocol} value names nothing usable; the message says why.
    """


class PassesRefusals(WrappingFactory):
    """
    A wrapping factory (TLS, PROXY header) that refuses a connection when
    the wrapped factory does (its C{buildProtocol} returns C{None}, as
    Twisted allows), so that the port closes it; Twisted's own wrappers
    would wrap the C{None} and fail on the first event.
    """

    def buildProtocol(self, addr: IAddress | None) -> Any:
        wrapped = self.wrappedFactory.buildProtocol(addr)
        return None if wrapped is None else self.protocol(self, wrapped)


#: Served even where plugin discovery finds nothing (a broken install).
BUILTIN_PROTOCOLS: dict[str, Callable[[], IProtocolFactory]] = {
    "echo": echoFactory,
}

FactoryMaker = Callable[[], IProtocolFactory]


def _where(error: BaseException) -> str:
    """
    Where C{error} was raised, as " (at FILE:LINE)": the one line of the
    message must lead the user to the line of their code that failed.
    """
    if isinstance(error, SyntaxError) and error.filename and not error.filename.startswith("<"):
        # Raised by the compiler, from no frame of the file it names (but
        # a string that eval or literal_eval compiles has no file: frames).
        return f" (at {error.filename}:{error.lineno})"
    frames = []
    traceback = error.__traceback__
    while traceback is not None:
        frames.append((traceback.tb_frame.f_code.co_filename, traceback.tb_lineno))
        traceback = traceback.tb_next
    # The innermost frame outside the standard library (json's decoder, say)
    # and the import system's frozen frames: the user's own line, installed
    # or not.
    paths = sysconfig.get_paths()
    standard = (paths["stdlib"], paths["platstdlib"], "<frozen")
    theirs = [f for f in frames if not f[0].startswith(standard)]
    if not (theirs or frames):
        return ""
    filename, line = (theirs or frames)[-1]
    return f" (at {filename}:{line})"


def resolveProtocol(spec: str, protocolOptions: Sequence[str] = ()) -> FactoryMaker:
    """
    Turn a C{--protocol} value (and its C{--protocol-option}s) into a
    callable that builds the factory.

    @raise ProtocolSpecError: if C{spec} names no plugin, no module, no
        attribute, or something that is neither a factory nor a callable;
        or if the plugin refuses its options.
    """
    if ":" not in spec:
        from maccept._plugins import pluginFactoryMaker, pluginsByName

        plugins = pluginsByName()
        if len(plugins.get(spec, ())) > 1:
            descriptions = "; ".join(repr(plugin.description) for plugin in plugins[spec])
            raise ProtocolSpecError(
                f"{len(plugins[spec])} protocol plugins are named {spec!r} ({descriptions}):"
                " uninstall one, or name the factory you mean as module:attribute"
            )
        if spec in plugins:
            try:
                return pluginFactoryMaker(plugins[spec][0], protocolOptions)
            except usage.UsageError as e:
                raise ProtocolSpecError(f"{spec}: {e}") from None
            except SystemExit as e:
                if e.code in (None, 0):
                    raise  # --protocol-option help: its usage is printed
                raise ProtocolSpecError(
                    f"{spec}: its options exited (sys.exit({e.code!r}))"
                ) from None
            except Exception as e:
                # Its module fails to import, its options' postOptions raises.
                failed = (
                    "its code failed to import"
                    if isinstance(e, ImportError)
                    else ("its options failed")
                )
                raise ProtocolSpecError(
                    f"{spec}: {failed}: {type(e).__name__}: {e}{_where(e)}"
                ) from None
        if spec in BUILTIN_PROTOCOLS and not protocolOptions:
            return BUILTIN_PROTOCOLS[spec]
        known = ", ".join(sorted(set(plugins) | set(BUILTIN_PROTOCOLS)))
        raise ProtocolSpecError(
            f"unknown protocol {spec!r}: use one of {known} or module:attribute"
        )
    if protocolOptions:
        raise ProtocolSpecError(f"{spec!r} takes no --protocol-option (only protocol plugins do)")
    moduleName, _, attributeName = spec.partition(":")
    if not moduleName or not attributeName:
        raise ProtocolSpecError(f"{spec!r} is not of the form module:attribute")
    try:
        module = importlib.import_module(moduleName)
    except ImportError as e:
        hint = ""
        # Its first part not found at all ("cannot import name" from a
        # package found is another story).
        if isinstance(e, ModuleNotFoundError) and e.name == moduleName.partition(".")[0]:
            # twistd does not put the current directory on sys.path.
            hint = " (is its directory on sys.path? for one in the current directory: PYTHONPATH=.)"
        raise ProtocolSpecError(f"cannot import module {moduleName!r}: {e}{hint}") from None
    except SystemExit as e:
        # A script named by mistake: without this the whole command exits
        # with the script's status and no word of why.
        raise ProtocolSpecError(
            f"importing module {moduleName!r} exited (sys.exit({e.code!r})): is it a script?"
        ) from None
    except Exception as e:
        raise ProtocolSpecError(
            f"importing module {moduleName!r} failed: {type(e).__name__}: {e}{_where(e)}"
        ) from None
    try:
        target: object = module
        for part in attributeName.split("."):
            target = getattr(target, part)
    except AttributeError:
        raise ProtocolSpecError(
            f"module {moduleName!r} has no attribute {attributeName!r}"
        ) from None
    except Exception as e:
        # A module's __getattr__ that imports lazily, a property that raises.
        raise ProtocolSpecError(
            f"looking up {attributeName!r} in module {moduleName!r} failed:"
            f" {type(e).__name__}: {e}{_where(e)}"
        ) from None
    return _asFactoryMaker(spec, target)


def buildsNothing(factory: object) -> bool:
    """
    Whether C{factory} (a L{Factory}, or a subclass) would build from no
    protocol class: Twisted's own C{Factory}, say, which asserts in every
    C{buildProtocol}, a traceback per connection.  Only when nothing of its
    own could build or set C{protocol} later: its C{buildProtocol}, its
    C{startFactory} or C{doStart}, and for a class its C{__init__}.
    """
    factoryClass = factory if isinstance(factory, type) else type(factory)
    if not issubclass(factoryClass, Factory):
        return False
    build = getattr(factory, "buildProtocol", None)
    if getattr(build, "__func__", build) is not Factory.buildProtocol:
        return False
    hooks = ["startFactory", "doStart"] + (["__init__"] if isinstance(factory, type) else [])
    if any(getattr(factoryClass, hook) is not getattr(Factory, hook) for hook in hooks):
        return False
    return getattr(factory, "protocol", None) is None


def madeFactoryProblem(made: object) -> str | None:
    """
    What is wrong with what a factory maker returned (a callable named by
    C{--protocol}, a plugin's C{makeFactory}), as the end of a sentence
    naming the maker; C{None} for a factory that can serve.
    """
    if not IProtocolFactory.providedBy(made):
        # Else Twisted fails later, deep in startListening.
        return f"returned {made!r}, not a protocol factory (a Factory instance)"
    if buildsNothing(made):
        return "returned a factory with no protocol to build"
    missing = missingHooks(made)
    if missing:
        return f"returned a factory that {missing}"
    return None


def missingHooks(factory: object) -> str | None:
    """
    What a factory (or its class) that declares L{IWorkerLifecycle} lacks
    of it, as the end of a sentence; C{None} if nothing: the worker calls
    all three, and each missing one would fail a start or log a traceback
    at each stop.
    """
    declared = IWorkerLifecycle.providedBy(factory) or (
        isinstance(factory, type) and IWorkerLifecycle.implementedBy(factory)
    )
    if not declared:
        return None
    missing = [
        name for name in IWorkerLifecycle.names() if not callable(getattr(factory, name, None))
    ]
    if not missing:
        return None
    return (
        f"declares IWorkerLifecycle but has no {', '.join(sorted(missing))}"
        " (a hook with nothing to do may return None)"
    )


def _asFactoryMaker(spec: str, target: object) -> FactoryMaker:
    if buildsNothing(target):
        raise ProtocolSpecError(
            f"{spec!r} has no protocol to build (its protocol attribute is None)"
        )
    missing = missingHooks(target)
    if missing:
        raise ProtocolSpecError(f"{spec!r} {missing}")
    if IProtocolFactory.providedBy(target):
        factory = target
        return lambda: factory
    if isinstance(target, type) and IProtocolFactory.implementedBy(target):
        # A factory class: calling it makes an instance, checked in the
        # worker (its __init__ may set the protocol, or not).
        return _checkedMaker(spec, target)
    if isinstance(target, type) and IProtocol.implementedBy(target):
        protocolClass = cast(type[Protocol], target)
        return lambda: Factory.forProtocol(protocolClass)
    if inspect.isbuiltin(target) and getattr(target, "__module__", None) in sys.stdlib_module_names:
        # os:getpid, sys:exit...: callable, but never a factory maker.  (A
        # compiled function of the user's own, Cython or C, is built-in too.)
        raise ProtocolSpecError(f"{spec!r} is a built-in function, not a protocol factory")
    if callable(target) and not isinstance(target, type):
        return _checkedMaker(spec, target)
    raise ProtocolSpecError(f"{spec!r} is neither a protocol factory nor a callable returning one")


def _checkedMaker(spec: str, maker: Callable[[], object]) -> FactoryMaker:
    try:
        inspect.signature(maker).bind()
    except TypeError as e:
        # Site (it wants a resource), say: each worker would fail alike.
        raise ProtocolSpecError(
            f"{spec!r} cannot be called with no arguments ({e}): name a factory instance, "
            "or a callable that makes one"
        ) from None
    except ValueError:
        pass  # no signature to read (a C function): the worker finds out

    def make() -> IProtocolFactory:
        made = maker()
        problem = madeFactoryProblem(made)
        if problem is not None:
            raise ProtocolSpecError(f"{spec!r} {problem}")
        return cast(IProtocolFactory, made)

    return make
