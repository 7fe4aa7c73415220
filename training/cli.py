"""Command lines derived from dataclasses: one route for every entry point.

A stage's settings are a dataclass whose fields carry their help text
(`field(metadata={"help": ...})`); its command line is built from
`dataclasses.fields()`, never written by hand, and its value is layered

    dataclass defaults  <  a JSON config file (optional)  <  explicit flags

(nanoGPT's configurator order: the last word is the command line's). A flag that
was not given leaves no trace (`argparse.SUPPRESS`), so a config file can never
beat an explicit flag, and a default can never beat a config file.

Field metadata understood here:
* "help" (required for a flag): the help text; the default is appended;
* "flags": the flag spellings (default `--field-name`);
* "choices": the allowed values; "group": the argparse group title;
* "cli": False keeps a field off the command line (it may still come from a file);
* "parse": a callable applied to the flag's string (e.g. `comma_list`);
* "metavar": the flag's placeholder in --help;
* "append": True makes the flag repeatable; the field (a list) holds one parsed value per use.

A default of None, () or [] is not shown in the help (say in the text what leaving the flag out means).

A bool field gets `--name` / `--no-name` (argparse.BooleanOptionalAction).
`Optional[X]` / `X | None` fields parse as X.
"""

from __future__ import annotations

import argparse
import json
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from dataclasses import MISSING, Field, fields
from pathlib import Path
from typing import Any


class ConfigFileError(ValueError):
    """A --config file that cannot be read or names a setting the stage does not have."""


def help_meta(text: str, **more: Any) -> dict[str, Any]:
    """`field(metadata=help_meta("..."))`: the help text plus the other keys above."""
    return {"help": text, **more}


def comma_list(text: str) -> tuple[str, ...]:
    """ "a, b,,c" -> ("a", "b", "c"): a "parse" for a tuple-of-names field ("" -> ())."""
    return tuple(part.strip() for part in text.split(",") if part.strip())


def comma_floats(text: str) -> tuple[float, ...]:
    """ "0.5, 1" -> (0.5, 1.0): a "parse" for a tuple-of-numbers field; a word that is not a number
    raises ValueError naming it."""
    out = []
    for part in comma_list(text):
        try:
            out.append(float(part))
        except ValueError:
            raise ValueError(f"{part!r} in {text!r}: expected numbers separated by commas") from None
    return tuple(out)


def _plain_type(typ: Any) -> Any:
    """X for `X | None` / Optional[X]; the type itself otherwise."""
    if typing.get_origin(typ) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(typ) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return typ


def has_flag(f: Field) -> bool:
    return "help" in f.metadata and f.metadata.get("cli", True)


def field_default(f: Field) -> Any:
    if f.default is not MISSING:
        return f.default
    if f.default_factory is not MISSING:
        return f.default_factory()
    return MISSING


def add_field_flag(
    p: argparse.ArgumentParser | argparse._ArgumentGroup,
    f: Field,
    typ: Any,
    *,
    help: str | None = None,
    show_default: bool = True,
    dest: str | None = None,
) -> None:
    """One flag for dataclass field `f` (type `typ`); absent from the namespace unless given."""
    flags = list(f.metadata.get("flags", ["--" + f.name.replace("_", "-")]))
    text = f.metadata["help"] if help is None else help
    default = field_default(f)
    if show_default and default is not MISSING and default is not None and default not in ((), []):
        text += f" [{default}]"
    kw: dict[str, Any] = {"dest": dest or f.name, "help": text, "default": argparse.SUPPRESS}
    typ = _plain_type(typ)
    if f.metadata.get("append") and typing.get_origin(typ) is list:
        typ = (typing.get_args(typ) or (str,))[0]  # each use parses one element
    if typ is bool:
        kw["action"] = argparse.BooleanOptionalAction
    else:
        kw["type"] = f.metadata.get("parse", typ if callable(typ) and typ is not Any else str)
        for key in ("choices", "metavar"):
            if key in f.metadata:
                kw[key] = f.metadata[key]
        if dest and "choices" not in kw and "metavar" not in kw:
            kw["metavar"] = f.name.upper()  # the field's name, not the destination's prefix
        if f.metadata.get("append"):
            kw["action"] = "append"  # a SUPPRESSed default: the first use starts an empty list
    p.add_argument(*flags, **kw)


def add_flags(
    p: argparse.ArgumentParser,
    cls: type,
    *,
    exclude: Iterable[str] = (),
    show_default: bool = True,
    prefix: str = "",
    group: str | None = None,
    defaults_text: Mapping[str, str] | None = None,
) -> None:
    """A flag for every field of dataclass `cls` with a help text (and no "cli": False).

    Fields with metadata "group" go into argparse groups of that title, in field order;
    `group` puts every flag of `cls` into one group of that title instead.
    `prefix`: the flags' destinations are prefix + field name (read back with
    `given(ns, prefix)`), for a second dataclass on the same command line.
    `defaults_text`: field -> what the help shows instead of "[default]" (e.g. the
    defaults of a layer between the dataclass and the flags)."""
    hints = typing.get_type_hints(cls)
    skip = set(exclude)
    groups: dict[str, argparse._ArgumentGroup] = {}
    for f in fields(cls):
        if not has_flag(f) or f.name in skip:
            continue
        target: Any = p
        title = group or f.metadata.get("group")
        if title:
            target = groups.setdefault(title, p.add_argument_group(title))
        text = None
        if defaults_text and f.name in defaults_text:
            text = f.metadata["help"] + defaults_text[f.name]
        add_field_flag(
            target,
            f,
            hints[f.name],
            help=text,
            show_default=show_default and text is None,
            dest=prefix + f.name,
        )


def given(ns: argparse.Namespace, prefix: str = "") -> dict[str, Any]:
    """The flags given on the command line, by field name (nothing else is in a namespace built
    by `add_flags`, except arguments added with an explicit default). Without `prefix`, the
    destinations that hold no "." (flags added without a prefix); with it, those added with
    that prefix, named without it."""
    out = {}
    for dest, value in vars(ns).items():
        if prefix and dest.startswith(prefix):
            out[dest[len(prefix) :]] = value
        elif not prefix and "." not in dest:
            out[dest] = value
    return out


def read_config_file(path: str | Path) -> dict[str, Any]:
    """A JSON object of settings; {"params": {...}} (training.tune's output) is unwrapped."""
    try:
        raw = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigFileError(f"--config {path}: cannot read a JSON object ({e})") from e
    raw = raw.get("params", raw) if isinstance(raw, dict) else raw
    if not isinstance(raw, dict):
        raise ConfigFileError(
            f"--config {path}: expected a JSON object of settings, got {type(raw).__name__}"
        )
    return raw


def check_keys(values: Mapping[str, Any], allowed: Iterable[str], where: str) -> None:
    """Raise ConfigFileError naming the first unknown key and the allowed ones."""
    ok = set(allowed)
    unknown = sorted(set(values) - ok)
    if unknown:
        raise ConfigFileError(f"{where}: unknown setting {unknown[0]!r}; expected one of {sorted(ok)}")


def _type_hints(cls: type) -> dict[str, Any]:
    """The resolved field types of `cls`; {} where an annotation does not resolve at run time."""
    try:
        return typing.get_type_hints(cls)
    except (NameError, TypeError):
        return {}


def layered(cls: type, *layers: Mapping[str, Any] | None, where: str = "settings") -> Any:
    """`cls(**(defaults < layers[0] < layers[1] ...))`; None layers are skipped.

    Keys must be fields of `cls`, and every field without a default must be given
    (ConfigFileError otherwise, naming the key and its flag). A string given for a
    `Path` field (as a JSON file holds it) becomes a Path."""
    names = {f.name for f in fields(cls)}
    merged: dict[str, Any] = {}
    for layer in layers:
        if layer is None:
            continue
        check_keys(layer, names, where)
        merged.update(layer)
    hints = _type_hints(cls)
    for f in fields(cls):
        if f.name not in merged and field_default(f) is MISSING:
            flag = f.metadata.get("flags", ["--" + f.name.replace("_", "-")])[0]
            raise ConfigFileError(f"missing setting {f.name!r}: give {flag} (or set it in a --config file)")
        if isinstance(merged.get(f.name), str) and _plain_type(hints.get(f.name)) is Path:
            merged[f.name] = Path(merged[f.name])  # a path from a JSON file is a string
    return cls(**merged)


def build_parser(
    cls: type,
    *,
    prog: str,
    description: str,
    epilog: str | None = None,
    config_flag: bool = False,
    exclude: Iterable[str] = (),
) -> argparse.ArgumentParser:
    """The parser `parse` uses: flags from `cls` (and --config FILE with `config_flag`)."""
    p = argparse.ArgumentParser(prog=prog, description=description, epilog=epilog)
    if config_flag:
        p.add_argument("--config", default=None, help="JSON file of settings; explicit flags win")
    add_flags(p, cls, exclude=exclude)
    return p


def parse_with(
    p: argparse.ArgumentParser,
    cls: type,
    argv: list[str] | None,
    *,
    convert: Mapping[str, Any] | None = None,
) -> Any:
    """`argv` parsed by `p` (from `build_parser`), layered over --config and the defaults, built.

    `convert`: field -> function applied to the merged value before construction
    (e.g. a comma-separated string -> tuple) for values that came from a flag.
    Bad flags or settings exit with code 2 and a message naming them (argparse's `error`)."""
    ns = p.parse_args(argv)
    flags = given(ns)
    config = flags.pop("config", None)
    for k, fn in (convert or {}).items():
        if k in flags:
            flags[k] = fn(flags[k])
    try:
        file_values = read_config_file(config) if config else None
        return layered(cls, file_values, flags, where="--config" if file_values else "flags")
    except (ConfigFileError, ValueError, TypeError) as e:
        p.error(str(e))
    raise AssertionError("unreachable")  # p.error exits


def parse(
    cls: type,
    argv: list[str] | None,
    *,
    prog: str,
    description: str,
    epilog: str | None = None,
    config_flag: bool = False,
    exclude: Iterable[str] = (),
    convert: Mapping[str, Any] | None = None,
) -> Any:
    """The whole route for a simple stage: flags from `cls`, optional --config FILE, layered, built."""
    p = build_parser(
        cls, prog=prog, description=description, epilog=epilog, config_flag=config_flag, exclude=exclude
    )
    return parse_with(p, cls, argv, convert=convert)


def command_line(cls: type, prog: str, doc: str | None, **kw: Any) -> Callable[[list[str] | None], Any]:
    """The `parse_args(argv)` of a `python -m` entry point: `parse` with flags from `cls`, a
    --config FILE, and the first paragraph of `doc` (the module docstring) as the description."""

    def parse_args(argv: list[str] | None = None) -> Any:
        return parse(cls, argv, prog=prog, description=(doc or "").split("\n\n")[0], config_flag=True, **kw)

    parse_args.__doc__ = (
        f"{prog}'s flags from {cls.__name__}; defaults < --config FILE (JSON) < explicit flags."
    )
    return parse_args
