# -*- test-case-name: tests.test_plugins -*-
"""
Protocol plugins: found with L{twisted.plugin.getPlugins}, picked by
C{--protocol NAME}, configured by C{--protocol-option KEY=VALUE}.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from typing import Any, cast

from twisted.internet.interfaces import IProtocolFactory
from twisted.plugin import IPlugin, getPlugins
from twisted.python import usage
from zope.interface import implementer

from maccept._output import endsQuietlyIfClosed
from maccept._protocols import ProtocolSpecError, madeFactoryProblem
from maccept.interfaces import IProtocolPlugin


class NoOptions(usage.Options):
    """
    The options of a protocol that has none.
    """


def _load(path: str) -> Any:
    """
    The object a plugin names by C{module:attribute}.

    @raise usage.UsageError: naming C{path}, if it names nothing: the
        plugin's own mistake, whose line is in no traceback.  (Its module
        failing as it imports raises that module's error.)
    """
    moduleName, _, attribute = path.partition(":")
    try:
        module = importlib.import_module(moduleName)
    except ModuleNotFoundError as e:
        named = e.name or ""
        if not (moduleName == named or moduleName.startswith(named + ".")):
            raise  # a module it imports is missing: its own error
        raise usage.UsageError(f"it names {path}, but there is no module {moduleName!r}") from None
    try:
        return getattr(module, attribute)
    except AttributeError:
        raise usage.UsageError(
            f"it names {path}, but module {moduleName!r} has no attribute {attribute!r}"
        ) from None


@implementer(IPlugin, IProtocolPlugin)
class ProtocolPlugin:
    """
    An L{IProtocolPlugin} that names its code by C{module:attribute}
    strings, so that discovering it imports nothing else.

    @param factory: C{module:attribute} of a callable that takes the parsed
        options and returns the protocol factory.
    @param options: C{module:attribute} of the options class, if any.
    """

    def __init__(
        self, name: str, description: str, factory: str, options: str | None = None
    ) -> None:
        self.name = name
        self.description = description
        self._factory = factory
        self._options = options

    def options(self) -> usage.Options:
        optionsClass = _load(self._options) if self._options else NoOptions
        options: usage.Options = optionsClass()
        return options

    def makeFactory(self, options: usage.Options) -> IProtocolFactory:
        made: IProtocolFactory = _load(self._factory)(options)
        return made


def pluginsByName() -> dict[str, list[IProtocolPlugin]]:
    """
    Every protocol plugin installed, by name: two packages may install
    plugins of one name, and which one getPlugins finds last is an
    accident of the file system, so a name with two is ambiguous.  One
    plugin found twice (getPlugins yields it once per module attribute that
    holds it: an alias, or a dropin that imports another's) is one.
    """
    import twisted.plugins

    found: dict[str, list[IProtocolPlugin]] = {}
    for plugin in getPlugins(IProtocolPlugin, twisted.plugins):
        named = found.setdefault(plugin.name, [])
        if not any(plugin is other for other in named):
            named.append(plugin)
    return found


def optionArguments(protocolOptions: Sequence[str]) -> list[str]:
    """
    C{KEY=VALUE} to C{--KEY VALUE}; a bare C{KEY} is a flag.
    """
    argv: list[str] = []
    for item in protocolOptions:
        key, equals, value = item.partition("=")
        argv += [f"--{key}", value] if equals else [f"--{key}"]
    return argv


def _checkOptionForms(options: usage.Options, protocolOptions: Sequence[str]) -> None:
    """
    Refuse what getopt would refuse in words that name no C{--protocol-option}
    form: a flag given a value ("Wrong number of arguments"), a key written
    with its dashes ("option ----path not recognized").

    @raise usage.UsageError: naming the option and its form.
    """
    flags = {name for name in options.longOpt if not name.endswith("=")}
    for item in protocolOptions:
        key, equals, _ = item.partition("=")
        if key.startswith("-"):
            raise usage.UsageError(
                f"--protocol-option {item}: give it as {key.lstrip('-')}{equals}..., without dashes"
            )
        if equals and key in flags:
            raise usage.UsageError(
                f"--protocol-option {item}: {key} is a flag, given without a value"
            )


def _withoutTwistedVersion(options: usage.Options) -> None:
    """
    Take usage.Options' own C{--version} (it prints Twisted's version and
    exits, here the parent) out of a plugin's options, and give C{version}
    back to the plugin where it declares one: as a flag or a parameter,
    which Twisted's handler would otherwise shadow.  (A plugin's own
    C{opt_version} method is left as it is.)  This reaches into
    L{usage.Options}' tables: its C{__init__} fills them from the same
    three gatherers, in this order.
    """
    if type(options).opt_version is not usage.Options.opt_version:
        return
    declared: dict[str, Any] = {}
    docs: dict[str, Any] = {}
    spelling = "version"
    for gather in (options._gather_flags, options._gather_parameters):
        longOpt, _, gatheredDocs, _, _, dispatch = gather()
        if "version" in dispatch:
            declared = dispatch
            docs = gatheredDocs
            spelling = "version=" if "version=" in longOpt else "version"
    # Twisted's handler came last: its listing is the last "version".
    where = len(options.longOpt) - 1 - options.longOpt[::-1].index("version")
    del options.longOpt[where]
    if declared:
        options._dispatch["version"] = declared["version"]
        options.docs["version"] = docs.get("version")
        if spelling not in options.longOpt:
            options.longOpt.append(spelling)
    else:
        del options._dispatch["version"]
        options.docs.pop("version", None)


def pluginFactoryMaker(
    plugin: IProtocolPlugin, protocolOptions: Sequence[str]
) -> Callable[[], IProtocolFactory]:
    """
    Parse C{protocolOptions} with the plugin's options now (so a bad value
    fails here), and return what builds the factory from them (in each
    worker), which checks that it is one.

    @raise usage.UsageError: the plugin refused its options.
    """
    options = plugin.options()
    if getattr(options, "synopsis", None) is None:
        # Else --protocol-option help opens with twistd's own "Usage: twistd [options]".
        options.synopsis = (
            f"Usage: twistd maccept --protocol {plugin.name} --protocol-option KEY=VALUE ..."
        )
    _withoutTwistedVersion(options)
    _checkOptionForms(options, protocolOptions)
    with endsQuietlyIfClosed():  # --protocol-option help | head
        options.parseOptions(optionArguments(protocolOptions))

    def makeFactory() -> IProtocolFactory:
        try:
            made = plugin.makeFactory(options)
        except usage.UsageError as e:  # it names no factory (L{_load})
            raise ProtocolSpecError(f"{plugin.name}: {e}") from None
        problem = madeFactoryProblem(made)
        if problem is not None:
            raise TypeError(f"protocol plugin {plugin.name!r}: makeFactory {problem}")
        return cast(IProtocolFactory, made)

    return makeFactory
