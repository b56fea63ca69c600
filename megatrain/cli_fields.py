"""Command-line flags made from dataclass fields: the field owns its default and its help text, the
flag is derived (``min_chars`` -> ``--min-chars``), so neither is restated next to argparse.

A field documents itself with ``option(default, "help")``; ``add_field_arguments`` adds flags for
the scalar fields named (bool, int, float, str, or ``None`` default read as str) and
``field_values`` reads them back for the dataclass's constructor."""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any


def option(default: Any, help: str, *, flag: str = "", type: type | None = None) -> Any:
    """A dataclass field with its help text (and a flag name when it differs from the field's;
    ``type``: what a flag of a field defaulting to None parses its value as, str if not given)."""
    return dataclasses.field(default=default, metadata={"help": help, "flag": flag, "type": type})


def _field(cls, name: str) -> dataclasses.Field:
    fields = {f.name: f for f in dataclasses.fields(cls)}
    if name not in fields:
        raise KeyError(f"{cls.__name__} has no field {name!r}")
    return fields[name]


def flag_of(cls, name: str) -> str:
    return _field(cls, name).metadata.get("flag") or "--" + name.replace("_", "-")


def help_of(cls, name: str) -> str:
    return _field(cls, name).metadata.get("help", "")


def add_field_arguments(parser, cls, names: list[str], *, dest_prefix: str = "") -> None:
    """One flag per field of ``cls`` in ``names``, defaulting to the field's default."""
    for name in names:
        field = _field(cls, name)
        if not field.metadata.get("help"):
            raise ValueError(f"{cls.__name__}.{name} has no help text: declare it with option()")
        default, text = field.default, field.metadata["help"]
        kwargs: dict[str, Any] = {"dest": dest_prefix + name, "default": default}
        if isinstance(default, bool):
            kwargs["action"] = argparse.BooleanOptionalAction
        elif isinstance(default, (int, float, str)):
            kwargs["type"] = type(default)
        elif default is None:
            kwargs["type"] = field.metadata.get("type") or str
        else:
            raise TypeError(f"{cls.__name__}.{name}: only scalar fields become flags, not {default!r}")
        shown = f" (default: {default})" if default not in ("", None) else ""
        flag = flag_of(cls, name)
        metavar = None if "action" in kwargs else flag.lstrip("-").replace("-", "_").upper()
        parser.add_argument(flag, help=text + shown, metavar=metavar, **kwargs)


def field_values(args: argparse.Namespace, names: list[str], *, dest_prefix: str = "") -> dict[str, Any]:
    return {name: getattr(args, dest_prefix + name) for name in names}
