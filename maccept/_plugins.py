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

from maccept._protocols import madeFactoryProblem
from maccept.interfaces import IProtocolPlugin


class NoOptions(usage.Options):
    """
    The options of a protocol that has none.
    """


def _load(path: str) -> Any:
    moduleName, _, attribute = path.partition(":")
    return getattr(importlib.import_module(moduleName), attribute)


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
    if type(options).opt_version is usage.Options.opt_version and "version" in options.longOpt:
        # usage.Options' own --version prints Twisted's version and exits the
        # parent: no option of the plugin's.  Unlisted, it is not recognized.
        options.longOpt.remove("version")
    options.parseOptions(optionArguments(protocolOptions))

    def makeFactory() -> IProtocolFactory:
        made = plugin.makeFactory(options)
        problem = madeFactoryProblem(made)
        if problem is not None:
            raise TypeError(f"protocol plugin {plugin.name!r}: makeFactory {problem}")
        return cast(IProtocolFactory, made)

    return makeFactory
