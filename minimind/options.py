"""Options as typed dataclasses, one per stage: the flags, their help, YAML and resume merging all come
from the fields, in one place.

A field declared with `opt` carries its help text (and, where needed, choices, a metavar, a flag name
other than `--field-name`, a parser for the value, or a `--no-...` flag). `add_options` turns every
field into an optional flag whose unset value is None, so that layers below the command line can win:

    field defaults < the stage's defaults < (on --resume) the options the run was started with
                   < --config YAML < flags given explicitly                      (`merge_options`)

Example:

    @dataclass
    class DPOOptions:
        beta: float = opt(0.1, "pull toward the reference")

    add_options(parser, DPOOptions, "DPO")               # --beta FLOAT  pull toward ... (default: 0.1)
    opts = merge_options(args, DPOOptions, saved)        # DPOOptions(beta=...)
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import types
import typing
from collections.abc import Callable
from dataclasses import fields
from typing import Any

from minimind.errors import ConfigError


def opt(
    default: Any,
    help: str,
    *,
    choices: list[str] | None = None,
    metavar: str | None = None,
    flag: str | None = None,
    parse: Callable[[str], Any] | None = None,
    negate: str | None = None,
) -> Any:
    """A dataclass field with what its flag needs. `flag`: the flag's name when it is not --field-name;
    `parse`: the value's parser when it is not the field's type; `negate`: a second flag that sets False."""
    meta = {"help": help, "choices": choices, "metavar": metavar, "flag": flag, "parse": parse, "negate": negate}
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda: list(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def parse_bool(text: str) -> bool:
    low = text.lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def field_type(cls: type, f: dataclasses.Field) -> type:
    """The field's type, with `X | None` read as X."""
    hint = typing.get_type_hints(cls)[f.name]
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    return hint


def default_of(f: dataclasses.Field) -> Any:
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None if f.default is dataclasses.MISSING else f.default


def add_options(
    parser: argparse.ArgumentParser, cls: type, title: str, skip: tuple[str, ...] = (), shown: dict | None = None
) -> None:
    """One optional flag per field of `cls` (but `skip`), in a help group `title`; unset flags are None.
    Booleans work bare (`--compile`) or with a value (`--compile false`, as YAML writes it). `shown`: the
    defaults to print where a stage's own differ from the fields'."""
    group = parser.add_argument_group(title)
    for f in fields(cls):
        if f.name in skip:
            continue
        meta, typ, default = f.metadata, field_type(cls, f), (shown or {}).get(f.name, default_of(f))
        if isinstance(default, list):
            default = ",".join(default)
        kwargs: dict[str, Any] = {"dest": f.name, "default": None}
        if typ is bool:
            kwargs.update(type=parse_bool, nargs="?", const=True, metavar="BOOL")
        else:
            kwargs.update(type=meta.get("parse") or typ, metavar=meta.get("metavar") or typ.__name__.upper())
        if meta.get("choices"):
            kwargs.update(choices=meta["choices"], metavar=None)
        name, text = meta.get("flag") or "--" + f.name.replace("_", "-"), meta.get("help", "")
        if default not in ("", None) and "default" not in text:
            text = f"{text} (default: {default})" if text else f"(default: {default!r})"
        kwargs["help"] = text.replace("%", "%%")  # argparse formats help with %
        group.add_argument(name, **kwargs)
        if meta.get("negate"):
            group.add_argument(meta["negate"], dest=f.name, action="store_const", const=False, help=f"{name} false")


def given(args: argparse.Namespace, cls: type) -> dict[str, Any]:
    """The fields of `cls` that were given on the command line."""
    return {f.name: getattr(args, f.name) for f in fields(cls) if getattr(args, f.name, None) is not None}


def load_yaml_config(path: str) -> dict[str, Any]:
    """Flags from a YAML file (keys as on the command line, with - or _)."""
    import yaml

    class Loader(yaml.SafeLoader):
        """YAML 1.1 reads `1e-3` (no dot) as a string; read it as the float everyone means."""

    Loader.add_implicit_resolver(
        "tag:yaml.org,2002:float",
        re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
        list("-+0123456789"),
    )
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.load(f, Loader=Loader) or {}
    except OSError as e:
        raise ConfigError(f"{path}: cannot read ({e.strerror})") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML ({e})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of option: value")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def merge_options(args: argparse.Namespace, cls: type, *layers: dict[str, Any] | None) -> Any:
    """cls(field defaults < each layer in turn (keys that are not fields are ignored) < YAML from --config
    < flags given explicitly). YAML keys that are not fields of cls fill the command's other options."""
    names = {f.name for f in fields(cls)}
    values: dict[str, Any] = {}
    for layer in layers:
        values.update({k: v for k, v in (layer or {}).items() if k in names})
    if getattr(args, "config", None):
        yaml_values = load_yaml_config(args.config)
        unknown = sorted(set(yaml_values) - names - set(vars(args)))
        if unknown:
            raise ConfigError(f"{args.config}: unknown options {unknown}")
        values.update({k: v for k, v in yaml_values.items() if k in names})
        for k, v in yaml_values.items():  # and the command's other options (e.g. data, preset)
            if getattr(args, k, None) in (None, False, []):
                setattr(args, k, v)
    values.update(given(args, cls))
    return cls(**values)
