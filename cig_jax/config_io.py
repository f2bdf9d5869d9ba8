"""Reading and writing configs: YAML `base:` chains, `--set a.b=c` overrides, mapping -> dataclass coercion,
`dump_yaml`, and the command-line split of `--config` / `--set`.

Owns: turning text into a checked dataclass tree and back. Coercion is generic: every field is checked
against its type hint (bool, int, float, str, `Literal[...]` choices, optional, tuples, nested sections),
unknown keys are refused, and errors name the file and the dotted key.

Does not own: the sections themselves, their defaults and their checks (`cig_jax.config`, which re-exports
what callers import from here: `load_config`, `ConfigError`, `parse_cli`, `dump_yaml`, ...).

YAML files may name a `base:` file or a list of them (relative to themselves); the bases are loaded first, in
order, and the file's keys are merged over them, recursively for mappings. Lists are replaced, not merged.

    python -m cig_jax.config_io configs/stage2_personalize.yaml [--set k=v ...]   # prints the resolved config
"""
from __future__ import annotations

import dataclasses
import sys
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from cig_jax import cli
from cig_jax.cli import UserError


class ConfigError(UserError, ValueError):
    """A configuration problem a user can fix: the message names the file and the key."""


# ----------------------------------------------------------------------------------------------------------
# Dict -> dataclass with type checks
# ----------------------------------------------------------------------------------------------------------
def _is_optional(tp) -> tuple[bool, Any]:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return True, args[0]
    return False, tp


def frozen_value(v: Any) -> Any:
    """Lists (nested too) as tuples, so a value may sit in a frozen, hashable section."""
    if isinstance(v, (list, tuple)):
        return tuple(frozen_value(x) for x in v)
    return v


def _coerce(value: Any, tp: Any, key: str, source: str) -> Any:
    optional, inner = _is_optional(tp)
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{source}: '{key}' may not be null")
    tp = inner
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: '{key}' must be a mapping, got {type(value).__name__} {value!r}")
        return from_dict(tp, value, source=source, prefix=key)
    origin = typing.get_origin(tp) or tp
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices or isinstance(value, bool) != any(isinstance(c, bool) for c in choices):
            raise ConfigError(f"{source}: '{key}' must be one of {list(choices)}, got {value!r}")
        return value
    if origin is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{source}: '{key}' must be true or false, got {value!r}")
        return value
    if origin is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{source}: '{key}' must be an integer, got {value!r}")
        return value
    if origin is float:
        if isinstance(value, str):  # YAML 1.1 reads exponents without a dot ('5e-4', '1e5') as strings
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{source}: '{key}' must be a number, got {value!r}")
        return float(value)
    if origin is str:
        if not isinstance(value, str):
            raise ConfigError(f"{source}: '{key}' must be a string, got {value!r}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{source}: '{key}' must be a list, got {value!r}")
        args = typing.get_args(tp)
        if args and (len(args) == 1 or args[-1] is Ellipsis):  # list[X] / tuple[X, ...]
            value = [_coerce(v, args[0], f"{key}[{i}]", source) for i, v in enumerate(value)]
        elif args:  # tuple[A, B]: positional
            if len(value) != len(args):
                raise ConfigError(f"{source}: '{key}' must hold {len(args)} items, got {value!r}")
            value = [_coerce(v, a, f"{key}[{i}]", source) for i, (v, a) in enumerate(zip(value, args))]
        return frozen_value(value)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: '{key}' must be a mapping, got {value!r}")
        return dict(value)
    return frozen_value(value)  # Any


def from_dict(cls, data: dict, *, source: str = "<dict>", prefix: str = ""):
    """Builds dataclass `cls` from a mapping, rejecting unknown keys and wrong types."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise ConfigError(
            f"{source}: unknown key '{where}{unknown[0]}' (known keys under '{prefix or '<top>'}': {sorted(names)})"
        )
    kwargs = {}
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for name, value in data.items():
        key = f"{prefix}.{name}" if prefix else name
        # A partial mapping for a nested section is merged over that field's own default (its
        # default_factory may differ from the section class's defaults), so nothing is silently reset.
        default = _field_default(fields[name])
        if isinstance(value, dict) and dataclasses.is_dataclass(default):
            value = _merge(_shallow_dict(default), value)
        kwargs[name] = _coerce(value, hints[name], key, source)
    return cls(**kwargs)


def _field_default(field: dataclasses.Field):
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return None if field.default is dataclasses.MISSING else field.default


def _shallow_dict(obj) -> dict:
    """Dataclass -> dict whose nested dataclasses are dicts too (without deep-copying leaves)."""
    return {f.name: (_shallow_dict(v) if dataclasses.is_dataclass(v := getattr(obj, f.name)) else v)
            for f in dataclasses.fields(obj)}


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def dump_yaml(cfg) -> str:
    """The fully resolved config as YAML; `load_config` on that text gives back an equal config."""

    def plain(v):
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        return v

    return yaml.safe_dump(plain(to_dict(cfg)), sort_keys=False, allow_unicode=True)


# ----------------------------------------------------------------------------------------------------------
# YAML with `base:` and dotted overrides
# ----------------------------------------------------------------------------------------------------------
def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def load_yaml_tree(path: str | Path, _seen: tuple = ()) -> dict:
    """Reads a YAML config and the chain of `base:` files under it into one merged mapping."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    if path.resolve() in _seen:
        raise ConfigError(f"{path}: 'base' files form a cycle: {[str(p) for p in _seen]}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping")
    base = data.pop("base", None)
    if base is None:
        return data
    bases = base if isinstance(base, list) else [base]
    merged: dict = {}
    for b in bases:
        merged = _merge(merged, load_yaml_tree(path.parent / b, _seen + (path.resolve(),)))
    return _merge(merged, data)


def apply_override(tree: dict, dotted: str, source: str = "command line") -> dict:
    """`a.b.c=value` (value parsed as YAML) set into a nested mapping; returns the new mapping."""
    if "=" not in dotted:
        raise ConfigError(f"{source}: override '{dotted}' must look like key.path=value")
    key, raw = dotted.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    parts = key.strip().split(".")
    out = dict(tree)
    node = out
    for p in parts[:-1]:
        child = node.get(p)
        child = dict(child) if isinstance(child, dict) else {}
        node[p] = child
        node = child
    node[parts[-1]] = value
    return out


def load_config(path: str | Path | None = None, overrides: list[str] = (), cls=None):
    """The one config loader: YAML (with bases) + dotted overrides -> a dataclass tree, coerced and then
    checked as a whole (`cig_jax.config.check`: each section, then how the sections fit together)."""
    from cig_jax import config as sections

    cls = sections.Config if cls is None else cls
    tree = load_yaml_tree(path) if path else {}
    source = str(path) if path else "<defaults>"
    for ov in overrides:
        tree = apply_override(tree, ov)
    if overrides:
        source = f"{source} + {len(overrides)} --set override{'s' if len(overrides) > 1 else ''}"
    cfg = from_dict(cls, tree, source=source)
    sections.check(cfg, source)
    return cfg


def parse_cli(argv: list[str]) -> tuple[str | None, list[str], list[str]]:
    """Splits `--config F --set k=v [--set ...]` from the rest of argv."""
    path, overrides, rest = None, [], []
    it = iter(argv)
    for a in it:
        if a == "--config":
            path = next(it, None)
        elif a.startswith("--config="):
            path = a.split("=", 1)[1]
        elif a == "--set":
            overrides.append(next(it, ""))
        elif a.startswith("--set="):
            overrides.append(a.split("=", 1)[1])
        else:
            rest.append(a)
    return path, overrides, rest


def main(argv: list[str] | None = None) -> int:
    """`python -m cig_jax.config_io FILE [--set k=v ...]`: prints the resolved, checked config (exit 2 on error)."""
    ap = cli.parser(cli.prog(module="cig_jax.config_io"), "Print a config fully resolved (base chains and --set "
                    "applied) and checked, as YAML.")
    ap.add_argument("config", metavar="CONFIG", help="a YAML config (a stage, a model or a whole run)")
    cli.add_overrides(ap)
    args = ap.parse_args(argv)
    print(dump_yaml(load_config(args.config, args.overrides)), end="")
    return 0


if __name__ == "__main__":
    cli.run_main(main)
