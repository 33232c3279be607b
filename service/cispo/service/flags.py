"""Command-line flags and CISPO_* environment variables, generated from a configuration tree.

A dataclass field made with `cispo.worker.config.flag` is one flag: `--<prefix><field>` (`_` as
`-`, or the Flag's own name), the environment variable CISPO_<the same, upper case, `_` for `-`>,
its help text, choices and --help section; a field made with `group` holds a nested dataclass
whose fields are walked the same way, under the group's section and prefix. A flag on the
command line wins over the environment, which wins over the field's default. Every bad value is
one line, `<prog>: error: ...`, and exit code 2.
"""

import argparse
import dataclasses
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NoReturn, TypeVar

from cispo.worker.config import FLAG, GROUP, Flag, Group

T = TypeVar("T")

ENV_PREFIX = "CISPO_"
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("", "0", "false", "no", "off")


@dataclasses.dataclass(frozen=True)
class Option:
    """One flag of the tree."""

    path: tuple[str, ...]
    """Field names from the root to the field, e.g. ("engine", "export", "dtype")."""
    dest: str
    """argparse's name of the value: the flag without `--`, `_` for `-` (sampler_dtype)."""
    kind: type
    """The field's type: int, float, str, bool or Path (`X | None` is X)."""
    default: Any
    flag: Flag
    section: str

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.dest.upper()


def options(root: type, prefix: str = "", section: str = "", path: tuple[str, ...] = ()) -> list[Option]:
    """The flags of the dataclass `root` and of the groups nested in it, in field order."""
    hints = typing.get_type_hints(root)
    found: list[Option] = []
    for f in dataclasses.fields(root):
        if GROUP in f.metadata:
            group: Group = f.metadata[GROUP]
            found += options(hints[f.name], prefix + group.prefix, group.section, (*path, f.name))
        elif FLAG in f.metadata:
            flag: Flag = f.metadata[FLAG]
            name = flag.name or prefix + f.name.replace("_", "-")
            kinds = [k for k in typing.get_args(hints[f.name]) if k is not type(None)] or [hints[f.name]]
            dest = name.replace("-", "_")
            found.append(Option((*path, f.name), dest, kinds[0], f.default, flag, flag.section or section))
    return found


class OneLineParser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, no usage block
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class DefaultsFormatter(argparse.RawDescriptionHelpFormatter):
    """Appends each flag's default (as the environment makes it) to its help."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if not action.option_strings or action.default is argparse.SUPPRESS or "(default" in text:
            return text
        if isinstance(action.default, bool):
            shown = "on" if action.default else "off"
        elif action.default in (None, ""):
            shown = "unset"
        else:
            shown = "%(default)s"
        return f"{text} (default: {shown})"


def build_parser(root: type, environ: Mapping[str, str], **kwargs: Any) -> argparse.ArgumentParser:
    """A parser of `root`'s flags, one argument group per section, each default read from
    `environ` (a malformed value exits 2)."""
    parser = OneLineParser(formatter_class=DefaultsFormatter, **kwargs)
    sections: dict[str, Any] = {}
    for option in options(root):
        if option.section not in sections:
            sections[option.section] = parser.add_argument_group(option.section)
        target = sections[option.section]
        raw = environ.get(option.env)
        flag = f"--{option.dest.replace('_', '-')}"
        if option.kind is bool:
            target.add_argument(
                flag,
                action="store_true",
                default=option.default if raw is None else _boolean(parser, option, raw),
                help=f"{option.flag.help} [{option.env}=1]",
            )
            continue
        convert = option.flag.normalize or (option.kind if option.kind in (int, float) else None)
        default = option.default
        if raw is not None:
            try:
                default = convert(raw) if convert else raw
            except ValueError:
                parser.error(f"environment variable {option.env}={raw!r} is not a valid {option.kind.__name__}")
        target.add_argument(
            flag,
            type=convert,
            choices=option.flag.choices or None,
            default=default,
            help=f"{option.flag.help} [{option.env}]",
        )
    return parser


def _boolean(parser: argparse.ArgumentParser, option: Option, raw: str) -> bool:
    value = raw.strip().lower()
    if value not in _TRUE + _FALSE:
        parser.error(f"environment variable {option.env}={value!r} is not a boolean (1/0, true/false)")
    return value in _TRUE


def parse_args(parser: argparse.ArgumentParser, root: type, argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The values by dest; a choice from the environment (which argparse does not check) too."""
    args = parser.parse_args(argv)
    for option in options(root):
        value, choices = getattr(args, option.dest), option.flag.choices
        if choices and value not in choices:
            parser.error(f"{option.env}={value!r}: choose from {', '.join(choices)}")
    return args


def build(parser: argparse.ArgumentParser, root: type[T], args: argparse.Namespace) -> T:
    """The tree `root` of the parsed values; a value its dataclasses refuse (their ValueError)
    exits 2 with its message."""
    values: dict[tuple[str, ...], Any] = {}
    for option in options(root):
        value = getattr(args, option.dest)
        values[option.path] = Path(value) if option.kind is Path and value is not None else value
    try:
        return _node(root, (), values)
    except ValueError as exc:
        parser.error(str(exc))


def _node(cls: type[T], path: tuple[str, ...], values: dict[tuple[str, ...], Any]) -> T:
    hints = typing.get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]  # every node of the tree is a dataclass
        if GROUP in f.metadata:
            kwargs[f.name] = _node(hints[f.name], (*path, f.name), values)
        elif (*path, f.name) in values:
            kwargs[f.name] = values[(*path, f.name)]
    return cls(**kwargs)
