"""Command-line options made from the configuration's field metadata.

Each option of `run`, `edge` and `worker` that sets a configuration key is written once, as
`agent.config.Flag` metadata on its dataclass field; `add_config_options` adds the ones a
sub-command has, group by group, and `config_overrides` turns what was given into the nested
dict `agent.config.load_config` merges over the TOML file. An option's destination is its key
(``model.name``), so the two always agree.
"""

from __future__ import annotations

import argparse
import types
import typing
from collections.abc import Sequence
from typing import Any, Literal


def _plain(annotation: Any) -> Any:
    """``X | None`` -> ``X``."""
    if typing.get_origin(annotation) in (types.UnionType, typing.Union):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return annotation


def add_config_options(
    parser: argparse.ArgumentParser, command: str, groups: Sequence[tuple[str, str]]
) -> None:
    """Add the flags of sub-command ``command``, one argument group per section.

    Args:
        parser: The sub-command's parser.
        command: ``run``, ``edge`` or ``worker`` (`agent.config.Flag.helps` names them).
        groups: (group title, section) in the order ``--help`` shows them.
    """
    from agent.config import FLAG_SECTIONS, flag_fields

    for title, section in groups:
        group = parser.add_argument_group(title)
        for f, flag, annotation in flag_fields(FLAG_SECTIONS[section]):
            if command not in flag.helps:
                continue
            help_text = flag.helps[command]
            kwargs: dict[str, Any] = {
                "dest": f"{section}.{f.name}",
                # argparse formats help with %: a literal one is written twice.
                "help": None if help_text is None else help_text.replace("%", "%%"),
            }
            kind = _plain(annotation)
            if kind is bool:
                kwargs["action"] = "store_false" if flag.negative else "store_true"
                kwargs["default"] = None  # not given: the TOML file's value stands
            elif typing.get_origin(kind) is Literal:
                kwargs["choices"] = typing.get_args(kind)
            else:
                if kind in (int, float):
                    kwargs["type"] = kind
                # What argparse would show for an option named like this one.
                kwargs["metavar"] = flag.metavar or flag.name.lstrip("-").replace("-", "_").upper()
            group.add_argument(flag.name, **kwargs)


def config_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The configuration flags given, as a nested config dict (flags not given are left out)."""
    from agent.config import FLAG_SECTIONS

    out: dict[str, Any] = {}
    for dest, value in vars(args).items():
        section, dot, key = dest.partition(".")
        if dot and section in FLAG_SECTIONS and value is not None:
            out.setdefault(section, {})[key] = value
    return out
