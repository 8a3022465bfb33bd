"""``--help`` that reads like ordinary Unix help, for every command of the CLI.

Typer 0.29 shows a value type after the ``--help`` option itself (``--help <bool>``),
though it takes no value, and writes a required argument as ``{spec}`` in the usage
line. :class:`UnixCommand` and :class:`UnixGroup` (Typer's documented ``cls=`` hook)
print ``--help`` as the flag it is and arguments as Click always did: ``SPEC``,
``[SPEC]`` when optional, ``SPEC...`` when repeated. :func:`conventional_help` gives
every command and group of an app these classes, so no command module has to
remember to (our own boolean options already show no type: see
:func:`kiln.cli.options.flag`).
"""

from __future__ import annotations

from typing import Any

import typer
from typer.core import TyperArgument, TyperCommand, TyperGroup
from typer.models import DefaultPlaceholder


class _FlagHelp:
    """The ``--help`` option without a value type in the help."""

    def get_help_option(self, ctx: Any) -> Any:
        option = super().get_help_option(ctx)  # type: ignore[misc]
        if option is not None:
            option.metavar = ""  # a flag: given or not, it takes no value
        return option


class UnixCommand(_FlagHelp, TyperCommand):
    """A command whose usage line reads ``kiln train [OPTIONS] SPEC``."""

    def collect_usage_pieces(self, ctx: Any) -> list[str]:
        pieces = [self.options_metavar] if self.options_metavar else []
        return pieces + [
            usage_name(p) for p in self.get_params(ctx) if isinstance(p, TyperArgument)
        ]


class UnixGroup(_FlagHelp, TyperGroup):
    """A command group (``kiln jobs``) whose ``--help`` shows no value type."""


def usage_name(argument: TyperArgument) -> str:
    """``SPEC`` (required), ``[SPEC]`` (optional), ``SPEC...`` (repeated): its metavar
    if it has one, else its name in capitals."""
    name = argument.metavar or (argument.name or "arg").upper()
    if argument.nargs != 1:
        name += "..."
    return name if argument.required else f"[{name}]"


def conventional_help(app: typer.Typer) -> None:
    """Give every command and group of ``app`` (sub-apps too) the classes above,
    except where a registration chose a ``cls`` of its own."""
    for command in app.registered_commands:
        if command.cls in (None, TyperCommand):  # Typer's default, filled in at registration
            command.cls = UnixCommand
    for group in app.registered_groups:
        chosen = group.typer_instance.info.cls if group.typer_instance else None
        if _unset(group.cls) and _unset(chosen):
            group.cls = UnixGroup
        if group.typer_instance is not None:
            conventional_help(group.typer_instance)


def _unset(value: object) -> bool:
    return value is None or (isinstance(value, DefaultPlaceholder) and value.value is None)
