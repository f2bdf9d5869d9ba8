"""Reading and writing config files: YAML `base:` chains, `--set a.b=c` overrides, `load_config` (the one config
loader), `dump_yaml`, and the command-line split of `--config` / `--set`.

Owns: turning YAML text into a checked `cig_jax.config.Config` tree and back.

Does not own: the sections, their defaults and their checks (`cig_jax.config`, `cig_jax.config_model`); the
generic mapping -> dataclass coercion and `ConfigError` (`cig_jax.config_base`).

YAML files may name a `base:` file or a list of them (relative to themselves); the bases are loaded first, in
order, and the file's keys are merged over them, recursively for mappings. Lists are replaced, not merged.

    python -m cig_jax.config_io configs/stage2_personalize.yaml [--set k=v ...]   # prints the resolved config
"""
from __future__ import annotations

from pathlib import Path

import yaml

from cig_jax import cli
from cig_jax import config as sections
from cig_jax.config_base import ConfigError, apply_override, from_dict, merge, to_dict


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
        merged = merge(merged, load_yaml_tree(path.parent / b, _seen + (path.resolve(),)))
    return merge(merged, data)


def load_config(path: str | Path | None = None, overrides: list[str] = (), cls=None):
    """The one config loader: YAML (with bases) + dotted overrides -> a dataclass tree, coerced and then
    checked as a whole (`cig_jax.config.check`: each section, then how the sections fit together)."""
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
