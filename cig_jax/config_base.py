"""What every config section is built from: `ConfigError`, the `Section` base and its field kinds, and the
generic mapping <-> dataclass coercion (`from_dict`, `to_dict`, `shallow_dict`, `apply_override` of one dotted
`--set a.b=c`).

Owns: checking a value against a field's type hint (bool, int, float, str, `Literal[...]` choices, optional,
tuples, nested sections), refusing unknown keys, errors that name the file and the dotted key; the field kinds
(`KINDS`: architecture, adapter, objective, execution, sampling; see `cig_jax.config`).

Does not own: any section (`cig_jax.config_model`, `cig_jax.config`), YAML files, `base:` chains and
`load_config` (`cig_jax.config_io`). A leaf: it imports nothing of cig_jax but `cig_jax.cli`.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Literal, Union

import yaml

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
            value = merge(shallow_dict(default), value)
        kwargs[name] = _coerce(value, hints[name], key, source)
    return cls(**kwargs)


def _field_default(field: dataclasses.Field):
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return None if field.default is dataclasses.MISSING else field.default


def shallow_dict(obj) -> dict:
    """Dataclass -> dict whose nested dataclasses are dicts too (without deep-copying leaves)."""
    return {f.name: (shallow_dict(v) if dataclasses.is_dataclass(v := getattr(obj, f.name)) else v)
            for f in dataclasses.fields(obj)}


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge(out[k], v)
        else:
            out[k] = v
    return out


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


KINDS = ("architecture", "adapter", "objective", "execution", "sampling")


def kind_field(kind: str, default=dataclasses.MISSING, factory=dataclasses.MISSING):
    return dataclasses.field(default=default, default_factory=factory, metadata={"kind": kind})


def execution_field(default):
    return kind_field("execution", default)


def objective_field(default):
    return kind_field("objective", default)


def sampling_field(default):
    return kind_field("sampling", default)


def adapter_field(default):
    return kind_field("adapter", default)


class Section:
    """Base of every section: lists given by code (not YAML) become tuples; `check` tests the section's own
    fields together and raises `ConfigError` naming `key.field`."""

    def __post_init__(self):
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, list):
                object.__setattr__(self, f.name, frozen_value(v))

    def check(self, key: str) -> None:
        pass


def need(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)
