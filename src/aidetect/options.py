"""Command-line options made from the code they configure, so that each default, help text and choice list
has one home: a dataclass field (``flag`` metadata, ``add_flags``) or a function's keyword default
(``defaults_of``). The help shows every default and choice list (``DefaultsShown``).

Choices show in the help only: the dataclass's own checks (``PackSettings.validate``, ``config.validate``)
reject other values, each with its one-line message.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from typing import Any


class DefaultsShown(argparse.HelpFormatter):
    """Help that ends each option's text with its default, unless it has none (None, False, empty)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        default = action.default
        shown = action.help and not (default is None or default is False or default in ([], argparse.SUPPRESS))
        return f"{action.help} (default %(default)s)" if shown else action.help


def flag(help: str, *, choices: Sequence[Any] = (), name: str | None = None) -> dict[str, Any]:
    """Field metadata that makes a dataclass field the option ``--NAME`` (default: the field's name) with
    this help and these choices: ``size: int = field(default=256, metadata=flag("output side in px"))``."""
    return {"help": help, "choices": tuple(choices), "name": name}


def flagged(cls: type) -> list[dataclasses.Field]:
    """The fields of dataclass ``cls`` that are command-line options, in order."""
    return [f for f in dataclasses.fields(cls) if "help" in f.metadata]


def flag_name(f: dataclasses.Field) -> str:
    """The option's ``dest``: ``--data`` sets ``data`` (the field's own name unless ``flag(name=...)``)."""
    return f.metadata["name"] or f.name


def add_flags(
    parser: argparse.ArgumentParser,
    cls: type,
    section: str | None = None,
    choices: Mapping[str, Sequence[Any]] | None = None,
) -> None:
    """One option per ``flagged`` field of ``cls``, typed by its annotation. Without ``section`` it defaults
    to the field's default (``from_args`` builds ``cls`` back); with one it overrides config key
    ``SECTION.FIELD``, defaults to None (left out) and its help names the key and the field's default.
    ``choices``: choice lists by config key, for fields whose metadata holds none (``config.CHOICES``)."""
    hints = typing.get_type_hints(cls)
    for f in flagged(cls):
        key = f"{section}.{f.name}" if section else None
        values = f.metadata["choices"] or (choices or {}).get(key or f.name, ())
        parser.add_argument(
            f"--{flag_name(f).replace('_', '-')}",
            dest=flag_name(f),
            type=scalar(hints[f.name]),
            default=None if section else f.default,
            metavar="{" + ",".join(map(str, values)) + "}" if values else None,
            help=(override_help(f, key) if key else f.metadata["help"]).replace("%", "%%"),
        )


def override_help(f: dataclasses.Field, key: str) -> str:
    """``train.epochs (default 10)``, ``data.shards: pack folder``: the key, the field's help and default."""
    text = f"{key}: {f.metadata['help']}" if f.metadata["help"] else key
    return text if f.default is None else f"{text} (default {f.default})"


def scalar(hint: Any) -> Callable[[str], Any]:
    """What argparse converts a value to: the annotation less ``None`` (``int | None`` -> int)."""
    kinds = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    return next(kind for kind in kinds if kind is not type(None))


def from_args(cls: type, args: argparse.Namespace) -> Any:
    """``cls`` from the options ``add_flags(parser, cls)`` added, as parsed."""
    return cls(**{f.name: getattr(args, flag_name(f)) for f in flagged(cls)})


def defaults_of(function: Callable[..., Any]) -> dict[str, Any]:
    """The default of each parameter of ``function`` that has one: what an option left out stands for."""
    parameters = inspect.signature(function).parameters.values()
    return {p.name: p.default for p in parameters if p.default is not inspect.Parameter.empty}
