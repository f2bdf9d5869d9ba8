"""The device mesh, logical-axis rules, and placing NNX state and host batches on the mesh.

Owns: the one mesh builder (axes data, fsdp, tensor), the mapping from logical axis names carried by
parameters (`embed`, `mlp`, `heads`, `vocab`, `layers`, ...) to mesh axes (MaxText-style rules from the
config), NamedShardings for a whole NNX state, the one place host-local batches become global arrays,
and the multi-host start-up (`jax.distributed.initialize`).

Axis types: the mesh uses `AxisType.Auto`. Shardings are given to `jax.jit` as `in_shardings` /
`out_shardings` (the pjit of today's JAX) and XLA propagates them through the step; we do not use
sharding-in-types (Explicit axes), which would make every model op spell out its output sharding.
"""
from __future__ import annotations

import contextlib
import contextvars
import logging
import math
import os
from typing import Any, Optional, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from cig_jax.config import MeshConfig

MESH_AXES = ("data", "fsdp", "tensor")
log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------------------
# Mesh
# ----------------------------------------------------------------------------------------------------------
def mesh_shape(cfg: MeshConfig, num_devices: int) -> tuple[int, int, int]:
    """Resolves -1 (at most one axis) so that data * fsdp * tensor == num_devices."""
    sizes = [cfg.data, cfg.fsdp, cfg.tensor]
    if sizes.count(-1) > 1:
        raise ValueError(f"mesh: at most one of data/fsdp/tensor may be -1, got {dict(zip(MESH_AXES, sizes))}")
    fixed = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if num_devices % fixed:
            raise ValueError(f"mesh: {num_devices} devices cannot be split as {dict(zip(MESH_AXES, sizes))}")
        sizes[sizes.index(-1)] = num_devices // fixed
    if math.prod(sizes) != num_devices:
        raise ValueError(
            f"mesh: data*fsdp*tensor = {math.prod(sizes)} but there are {num_devices} devices "
            f"({dict(zip(MESH_AXES, sizes))}); set one axis to -1 to take the rest"
        )
    return tuple(sizes)


def make_mesh(cfg: MeshConfig, devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
    """The mesh (data, fsdp, tensor) over `devices` (default: all devices of all processes)."""
    devices = list(devices) if devices is not None else jax.devices()
    shape = mesh_shape(cfg, len(devices))
    if devices == jax.devices():
        return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * 3)
    return Mesh(np.asarray(devices).reshape(shape), MESH_AXES, axis_types=(AxisType.Auto,) * 3)


# ----------------------------------------------------------------------------------------------------------
# Logical axes -> mesh axes
# ----------------------------------------------------------------------------------------------------------
def _rule_targets(rule_value) -> tuple[str, ...]:
    if rule_value is None:
        return ()
    if isinstance(rule_value, str):
        return (rule_value,)
    return tuple(rule_value)


def logical_to_spec(names: Sequence[Optional[str]], rules: Sequence, mesh: Mesh,
                    shape: Optional[Sequence[int]] = None) -> P:
    """Maps logical dimension names to a PartitionSpec.

    For each dimension, the rules for its name are tried in order; a rule applies when none of its mesh
    axes is already used by another dimension of the same array and (when `shape` is given) the
    dimension divides evenly by the product of those axes' sizes. Otherwise the dimension is replicated.
    Unknown names are replicated; mesh axes of size 1 are dropped from the spec.
    """
    table: dict[str, list[tuple[str, ...]]] = {}
    for rule in rules:
        name, target = rule[0], rule[1]
        table.setdefault(name, []).append(_rule_targets(target))
    used: set[str] = set()
    out = []
    for i, name in enumerate(names):
        chosen: tuple[str, ...] = ()
        for target in table.get(name, []) if name is not None else []:
            target = tuple(a for a in target if mesh.shape[a] > 1)
            if not target or used & set(target):
                continue
            size = math.prod(mesh.shape[a] for a in target)
            if shape is not None and shape[i] % size:
                continue
            chosen = target
            break
        used |= set(chosen)
        out.append(None if not chosen else chosen[0] if len(chosen) == 1 else chosen)
    while out and out[-1] is None:
        out.pop()
    return P(*out)


def names_of(var) -> tuple:
    meta = var.get_metadata() if hasattr(var, "get_metadata") else {}
    names = meta.get("sharding_names") or meta.get("out_sharding") or ()
    return tuple(names)


def state_shardings(state: Any, mesh: Mesh, rules: Sequence) -> Any:
    """A pytree like `state` (an nnx.State or module-state pytree) of NamedShardings from logical names."""

    def one(var):
        shape = var.shape if hasattr(var, "shape") else np.shape(var.value)
        names = names_of(var)
        names = names + (None,) * (len(shape) - len(names))
        return var.replace(NamedSharding(mesh, logical_to_spec(names, rules, mesh, shape)))

    return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def logical_sharding(names: Sequence[Optional[str]], mesh: Mesh, rules: Sequence,
                     shape: Optional[Sequence[int]] = None) -> NamedSharding:
    """A NamedSharding for an activation or batch array with the given logical dimension names."""
    return NamedSharding(mesh, logical_to_spec(names, rules, mesh, shape))


_ACTIVATION_SHARDING = contextvars.ContextVar("cig_activation_sharding", default=None)


@contextlib.contextmanager
def activation_sharding(mesh: Mesh, rules: Sequence):
    """While a step is traced under this context, `constrain` pins activations to the mesh by logical name.
    Without it, XLA may resolve the clash between batch-sharded activations and FSDP-sharded weights (both
    on 'fsdp') by gathering the whole batch onto every device."""
    token = _ACTIVATION_SHARDING.set((mesh, rules))
    try:
        yield
    finally:
        _ACTIVATION_SHARDING.reset(token)


def active_activation_sharding():
    """(mesh, rules) of the enclosing `activation_sharding` context, or None (for kernels that run per shard)."""
    return _ACTIVATION_SHARDING.get()


def constrain(x: jax.Array, names: Sequence[Optional[str]]) -> jax.Array:
    """`with_sharding_constraint` from logical names when an `activation_sharding` context is active; else x."""
    ctx = _ACTIVATION_SHARDING.get()
    if ctx is None:
        return x
    mesh, rules = ctx
    return jax.lax.with_sharding_constraint(x, logical_sharding(names, mesh, rules, x.shape))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def create_sharded(make: Any, mesh: Mesh, rules: Sequence):
    """Builds an NNX module directly on the mesh: `make()` runs under jit with sharded outputs, so no
    device ever holds a full unsharded copy. Returns the module."""
    return nnx.merge(*init_sharded(make, mesh, rules))


def init_sharded(make: Any, mesh: Mesh, rules: Sequence, paths: Optional[Sequence[tuple]] = None):
    """-> (graphdef, state) of `make()`, the state initialised on the mesh under jit with sharded outputs. With
    `paths` (nnx state paths), the state holds those leaves alone, with the same values: the rest of the
    initialiser is traced but never compiled (XLA drops what no output needs), so a model whose other leaves
    come from a checkpoint initialises only what the checkpoint lacks."""
    if paths is None:
        keep = lambda state: state  # noqa: E731
    else:
        paths = set(paths)
        keep = lambda state: nnx.from_flat_state([(p, v) for p, v in nnx.to_flat_state(state) if p in paths])  # noqa: E731
    graphdef, abstract_state = nnx.split(nnx.eval_shape(make))
    shardings = state_shardings(keep(abstract_state), mesh, rules)
    return graphdef, jax.jit(lambda: keep(nnx.split(make())[1]), out_shardings=shardings)()


def place_state(state: Any, mesh: Mesh, rules: Sequence) -> Any:
    """Moves an existing state onto the mesh according to its logical names."""
    return jax.device_put(state, state_shardings(state, mesh, rules))


def unsharded_large_params(state: Any, min_size: int = 2 ** 16) -> list[str]:
    """Paths of parameters with >= min_size elements that are fully replicated (the sharding check)."""
    out = []
    for path, var in nnx.to_flat_state(state):
        value = var.value if hasattr(var, "value") else var
        if value.size >= min_size and value.sharding.is_fully_replicated:
            out.append(".".join(map(str, path)))
    return out


# ----------------------------------------------------------------------------------------------------------
# Host data -> global arrays
# ----------------------------------------------------------------------------------------------------------
def host_to_global(batch: Any, mesh: Mesh, rules: Sequence, batch_axis_name: str = "batch") -> Any:
    """Host-local batch (leading dim = this process's share) -> global jax.Arrays sharded on `batch`.

    The one place host batches become global arrays (`jax.make_array_from_process_local_data`).
    """

    def one(x):
        x = np.asarray(x)
        names = (batch_axis_name,) + (None,) * (x.ndim - 1)
        global_shape = (x.shape[0] * jax.process_count(),) + x.shape[1:]
        sharding = logical_sharding(names, mesh, rules, global_shape)
        return jax.make_array_from_process_local_data(sharding, x, global_shape)

    return jax.tree.map(one, batch)


# ----------------------------------------------------------------------------------------------------------
# Multi-host
# ----------------------------------------------------------------------------------------------------------
def initialize_distributed(coordinator_address: Optional[str] = None, num_processes: Optional[int] = None,
                           process_id: Optional[int] = None, local_device_ids=None) -> bool:
    """Starts multi-host JAX when the environment says this is a multi-process job, once per process (later
    calls return at once). Returns True if the job is multi-process.

    TPU pods and SLURM/Open MPI clusters are discovered by JAX itself. Elsewhere set
    CIG_COORDINATOR=host:port, CIG_NUM_PROCESSES and CIG_PROCESS_ID (or pass them). Single-process runs
    with none of these set do nothing.
    """
    if jax.distributed.is_initialized():  # once per process: a recipe's later stages find it started
        return True
    coordinator_address = coordinator_address or os.environ.get("CIG_COORDINATOR")
    num_processes = num_processes or _env_int("CIG_NUM_PROCESSES")
    process_id = process_id if process_id is not None else _env_int("CIG_PROCESS_ID")
    auto = any(k in os.environ for k in ("TPU_WORKER_HOSTNAMES", "SLURM_JOB_ID", "OMPI_COMM_WORLD_SIZE"))
    if coordinator_address is None and not auto:
        return False
    if jax.config.jax_platforms == "cpu" or os.environ.get("JAX_PLATFORMS") == "cpu":
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                               process_id=process_id, local_device_ids=local_device_ids)
    print(f"[distributed] started: process {jax.process_index()} of {jax.process_count()}, "
          f"{jax.local_device_count()} local devices", flush=True)
    return True


def _env_int(name: str) -> Optional[int]:
    v = os.environ.get(name)
    return int(v) if v else None
