"""Imports tell the truth (read from the source with `ast`, nothing is imported): no import cycle between modules
of cig_jax (imports inside functions count), no private name used across modules, no module `__getattr__`, and
project imports inside functions only where the target is an optional extra or a front door keeps `--help` free
of jax."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Imported inside functions on purpose: {target module: the optional extra it needs}.
OPTIONAL_EXTRAS = {"cig_jax.app.ui": "app (gradio)",
                   "cig_jax.data.tfds_builder": "tensorflow-datasets, imported only where array_record files are read",
                   "cig_jax.train.tb": "tensorboardX, optional at run time (JSON lines are always written)"}
# Command lines that must not import jax at the top: --help / --print-config answer without it (train.cli), or
# the simulated device count is set before jax is imported (bench.aot, bench.init_memory): {front door: the
# modules it defers}.
FRONT_DOORS = {"cig_jax.train.cli": {"cig_jax.train.compile", "cig_jax.train.recipe", "cig_jax.train.trainer"},
               "cig_jax.bench.aot": {"cig_jax.config_io", "cig_jax.sharding", "cig_jax.train.compile"},
               "cig_jax.bench.init_memory": {"cig_jax.config", "cig_jax.config_model", "cig_jax.convert.checkpoint_io",
                                             "cig_jax.convert.hf_llm", "cig_jax.convert.init", "cig_jax.models.llm",
                                             "cig_jax.sharding", "cig_jax.train.state"}}


def _modules() -> dict[str, ast.Module]:
    mods = {}
    for p in sorted((ROOT / "cig_jax").rglob("*.py")):
        parts = p.relative_to(ROOT).with_suffix("").parts
        mods[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = ast.parse(p.read_text(), str(p))
    return mods


def _imports(mods, only=None):
    """Yields (module, target module, imported name or None, inside a function?, node) for every project import
    (of every module, or of `only`)."""
    for mod, tree in mods.items() if only is None else [(only, mods[only])]:
        def visit(node, in_function):
            for child in ast.iter_child_nodes(node):
                inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
                if isinstance(child, ast.Import):
                    for a in child.names:
                        if a.name.startswith("cig_jax"):
                            yield mod, a.name, None, in_function, child
                elif isinstance(child, ast.ImportFrom) and (child.module or "").startswith("cig_jax"):
                    assert child.level == 0, f"{mod}: relative import"
                    for a in child.names:
                        sub = f"{child.module}.{a.name}"
                        yield (mod, sub, None, in_function, child) if sub in mods else \
                            (mod, child.module, a.name, in_function, child)
                yield from visit(child, inner)
        yield from visit(tree, False)


def _aliases(mods, mod):
    """Local names bound to project modules in `mod` ('C' for `from cig_jax.sample import complete as C`)."""
    out = {}
    for m, target, name, _, node in _imports(mods, mod):
        if name is None:
            for a in node.names:
                if isinstance(node, ast.Import):
                    out[a.asname or a.name.split(".")[0]] = a.name if a.asname else a.name.split(".")[0]
                elif f"{node.module}.{a.name}" == target:
                    out[a.asname or a.name] = target
    return out


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def test_no_import_cycles_between_modules():
    mods = _modules()
    graph = {m: set() for m in mods}
    for mod, target, _, _, _ in _imports(mods):
        if target != mod and target in mods:
            graph[mod].add(target)
    state, cycles = {}, []

    def dfs(m, path):
        state[m] = "open"
        for t in sorted(graph[m]):
            if state.get(t) == "open":
                cycles.append(path[path.index(t):] + [t])
            elif t not in state:
                dfs(t, path + [t])
        state[m] = "done"
    for m in sorted(mods):
        if m not in state:
            dfs(m, [m])
    assert cycles == [], "\n".join(" -> ".join(c) for c in cycles)


def test_no_private_names_across_modules():
    mods, found = _modules(), []
    for mod, target, name, _, node in _imports(mods):
        if name and _private(name) and target != mod:
            found.append(f"{mod}:{node.lineno} imports {target}.{name}")
    for mod, tree in mods.items():
        aliases = _aliases(mods, mod)
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and _private(node.attr):
                chain, v = [], node.value
                while isinstance(v, ast.Attribute):
                    chain, v = [v.attr] + chain, v.value
                if isinstance(v, ast.Name) and v.id in aliases:
                    owner = ".".join([aliases[v.id]] + chain)
                    if owner in mods and owner != mod:
                        found.append(f"{mod}:{node.lineno} uses {owner}.{node.attr}")
    assert found == [], "\n".join(found)


# Issue 32: 206 such imports at 468e18e, 0 now (only optional extras and the listed front doors import inside a
# function).
IN_FUNCTION_IMPORTS_LEFT = 0


def test_project_imports_inside_functions_only_for_optional_extras_and_front_doors():
    found = [f"{mod}:{node.lineno} imports {target} inside a function"
             for mod, target, _, in_function, node in _imports(_modules())
             if in_function and target not in OPTIONAL_EXTRAS and target not in FRONT_DOORS.get(mod, ())]
    assert len(found) <= IN_FUNCTION_IMPORTS_LEFT, f"{len(found)} in-function imports:\n" + "\n".join(found)


def test_convert_imports_nothing_of_train():
    """convert/ is a leaf of formats: reading a run's checkpoint lives in train/ (train.export, train.stage0)."""
    found = [f"{mod}:{node.lineno} imports {target}" for mod, target, _, _, node in _imports(_modules())
             if mod.startswith("cig_jax.convert") and target.startswith("cig_jax.train")]
    assert found == [], "\n".join(found)


def test_no_module_getattr():
    assert [m for m, tree in _modules().items() for n in tree.body
            if isinstance(n, ast.FunctionDef) and n.name == "__getattr__"] == []
