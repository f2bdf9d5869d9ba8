"""Model FLOPs of a training step, counted from what the step really runs (for MFU).

Owns: `count_loss_flops` (the loss's forward traced to a jaxpr on abstract arrays, no weight allocated),
`module_flops` (the same for an NNX module and a trainable filter) and `task_flops` / `task_flops_per_example`
(for a stage's `Task`). Used by the trainer's MFU line (through
`Task.flops_per_example`), the benchmarks (`cig_jax.bench.*`) and `train.py --dry-run`.

The rule, applied to every matmul (`dot_general`) and convolution in the forward:

    counted = forward FLOPs x (1 + number of its two operands that need a gradient)

where an array needs a gradient when it depends on a trained parameter (and not only through
`stop_gradient`). That gives the usual accounting of each part as it runs:
    trained weight  x @ W:  2N fwd + 2N dX + 2N dW = 6N per token  (2N + 2N = 4N for a first layer: no dX)
    frozen weight the gradient crosses (LoRA base, the frozen DiT under a stage-3 detokenizer loss):  4N
    frozen, forward only (the ViT, the VAE encoder, a frozen part below every trained one):  2N
    attention scores / values (no weights): 3x forward where the gradient flows, 1x otherwise
and counts the ViT's and the resamplers' matmuls at their own token counts, the DiT's and the LLM's attention
as computed (the CPU path's causal blocks skip masked key blocks, so it counts those skipped), and layer
stacks under `lax.scan` times their length. Elementwise work, the optimizer update and remat's recompute are
not model FLOPs and are not counted (XLA's `cost_analysis` counts the former and the last; it also counts a
`lax.scan` body only once, so compare against it with `scan_layers: false` and `remat_policy: none`).

Does not own: peak FLOP/s per device (`trainer.known_peak_tflops`), the step itself (`trainer.make_train_step`).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx

FORMULA = ("FLOPs = sum over matmuls/convs of forward FLOPs x (1 + operands needing a gradient): 6N per token "
           "for trained weights, 4N for frozen weights the gradient crosses, 2N for frozen forward-only parts, "
           "attention 3x (1x without gradient)")
CATEGORIES = ("trained weights", "frozen weights", "activations", "parameters only")


@dataclasses.dataclass
class FlopCount:
    """Counted FLOPs by category (see CATEGORIES): forward and forward + backward."""
    forward: dict = dataclasses.field(default_factory=lambda: dict.fromkeys(CATEGORIES, 0.0))
    counted: dict = dataclasses.field(default_factory=lambda: dict.fromkeys(CATEGORIES, 0.0))

    @property
    def total(self) -> float:
        return float(sum(self.counted.values()))

    def add(self, category: str, fwd: float, counted: float) -> None:
        self.forward[category] += fwd
        self.counted[category] += counted

    def scaled(self, s: float) -> "FlopCount":
        return FlopCount({k: v * s for k, v in self.forward.items()}, {k: v * s for k, v in self.counted.items()})

    def summary(self) -> str:
        parts = [f"{k} {self.counted[k]:.3g} (fwd {self.forward[k]:.3g})" for k in CATEGORIES if self.counted[k]]
        return f"{self.total:.4g} = " + " + ".join(parts)


def _op_flops(eqn) -> float:
    out = eqn.outvars[0].aval
    if eqn.primitive.name == "dot_general":
        (lhs_contract, _), _ = eqn.params["dimension_numbers"]
        lhs = eqn.invars[0].aval.shape
        return 2.0 * math.prod(out.shape) * math.prod(lhs[d] for d in lhs_contract)
    rhs = eqn.invars[1].aval.shape  # conv_general_dilated: per output element, in_ch / groups x kernel window
    out_feature_dim = eqn.params["dimension_numbers"].rhs_spec[0]
    return 2.0 * math.prod(out.shape) * math.prod(rhs) / rhs[out_feature_dim]


def _inexact(v) -> bool:
    return jnp.issubdtype(getattr(v.aval, "dtype", jnp.int32), jnp.inexact)


def _walk(jaxpr, grad_in, param_in, acc: FlopCount | None, scale: float):
    """Counts `jaxpr`'s matmuls into `acc` (None: flags only); returns (grad, param) flags of its outputs."""
    env = {}
    for v in jaxpr.constvars:
        env[v] = (False, True)
    for v, g, p in zip(jaxpr.invars, grad_in, param_in):
        env[v] = (bool(g) and _inexact(v), bool(p))

    def read(v):
        return (False, True) if isinstance(v, jax.extend.core.Literal) else env.get(v, (False, True))

    for eqn in jaxpr.eqns:
        flags = [read(v) for v in eqn.invars]
        g_in, p_in = [f[0] for f in flags], [f[1] for f in flags]
        name = eqn.primitive.name
        if name in ("dot_general", "conv_general_dilated"):
            if acc is not None:
                fwd = _op_flops(eqn) * scale
                (ga, pa), (gb, pb) = flags[0], flags[1]
                if pa and pb:
                    cat = "parameters only"
                elif pa or pb:
                    cat = "trained weights" if (ga if pa else gb) else "frozen weights"
                else:
                    cat = "activations"
                acc.add(cat, fwd, fwd * (1 + int(ga) + int(gb)))
            out = [(any(g_in[:2]), all(p_in[:2]))] * len(eqn.outvars)
        elif name == "stop_gradient":
            out = [(False, all(p_in))] * len(eqn.outvars)
        else:
            out = _call(eqn, g_in, p_in, acc, scale)
            if out is None:  # elementwise / structural: depends on whatever its inputs depend on
                out = [(any(g_in), all(p_in))] * len(eqn.outvars)
        for v, (g, p) in zip(eqn.outvars, out):
            env[v] = (g and _inexact(v), p)
    return [read(v)[0] for v in jaxpr.outvars], [read(v)[1] for v in jaxpr.outvars]


def _fixed_point(body, g, p, carry: slice, acc, scale):
    """Runs `body` until the carries' gradient flags stop changing (a carry may start without a gradient and
    gain one in the body), then once more counting."""
    g = list(g)
    for _ in range(len(g) + 1):
        g_out, _ = _walk(body.jaxpr, g, p, None, 1.0)
        new = g[carry.start:carry.stop]
        merged = [a or b for a, b in zip(new, g_out[:len(new)])]
        if merged == new:
            break
        g[carry] = merged
    return _walk(body.jaxpr, g, p, acc, scale)


def _call(eqn, g_in, p_in, acc, scale):
    """Primitives holding sub-jaxprs (scan, while, cond, pjit, remat, custom_jvp/vjp); None for the rest."""
    name, params = eqn.primitive.name, eqn.params
    if name == "scan":
        nc, nk = params["num_consts"], params["num_carry"]
        g, p = _fixed_point(params["jaxpr"], g_in, p_in, slice(nc, nc + nk), acc, scale * params["length"])
        return list(zip(g, p))
    if name == "while":  # trip count unknown: the body counts once
        cn, bn = params["cond_nconsts"], params["body_nconsts"]
        g, p = _fixed_point(params["body_jaxpr"], g_in[cn:], p_in[cn:], slice(bn, None), acc, scale)
        return list(zip(g, p))
    if name == "cond":
        best, outs = None, []
        for branch in params["branches"]:
            sub = FlopCount() if acc is not None else None
            outs.append(_walk(branch.jaxpr, g_in[1:], p_in[1:], sub, scale))
            if sub is not None and (best is None or sub.total > best.total):
                best = sub
        if best is not None:
            for k in CATEGORIES:
                acc.add(k, best.forward[k], best.counted[k])
        return [(any(o[0][i] for o in outs), all(o[1][i] for o in outs)) for i in range(len(eqn.outvars))]
    for value in params.values():
        inner = getattr(value, "jaxpr", value)
        if isinstance(inner, jax.extend.core.Jaxpr) and len(inner.invars) == len(eqn.invars):
            g, p = _walk(inner, g_in, p_in, acc, scale)
            return list(zip(g, p))
    return None


def count_loss_flops(fn: Callable, trained: Any, *others: Any) -> FlopCount:
    """FLOPs of `fn(trained, *others)`'s forward and its backward with respect to `trained` (pytrees of arrays
    or ShapeDtypeStructs; nothing is computed)."""
    closed = jax.make_jaxpr(fn)(trained, *others)
    n_trained = len(jax.tree.leaves(trained))
    n_params = [n_trained] + [len(jax.tree.leaves(o)) for o in others]
    grad_in = [True] * n_trained + [False] * (len(closed.jaxpr.invars) - n_trained)
    # Parameters (trained or frozen) mark weight matmuls; the batch (the last argument) does not.
    param_in = [True] * sum(n_params[:-1]) + [False] * n_params[-1]
    acc = FlopCount()
    _walk(closed.jaxpr, grad_in, param_in, acc, 1.0)
    return acc


def module_flops(make_model: Callable, trainable: Any, loss_fn: Callable, batch: dict) -> FlopCount:
    """FLOPs of a training step of `loss_fn(model, batch) -> (loss, aux)` on the module `make_model()` (built
    abstractly) with the parameters `trainable` (an nnx filter) trained; `batch`: arrays or ShapeDtypeStructs."""
    abstract = nnx.eval_shape(make_model)
    graphdef, params, frozen = nnx.split(abstract, trainable, ...)

    def loss(p, f, b):
        return loss_fn(nnx.merge(graphdef, p, f), b)[0]

    return count_loss_flops(loss, params, frozen, batch)


def task_flops(task, batch: int = 2, seed: int = 0) -> FlopCount:
    """FLOPs of one training step of `task` (a `stages.Task`) on `batch` examples, as the trainer builds it:
    the loss of the merged (trained, frozen) model on a batch of `task.batch_spec(batch)` with an rng key."""
    spec = {k: jax.ShapeDtypeStruct(shape, dtype) for k, (shape, dtype) in task.batch_spec(batch).items()}
    spec["rng"] = jax.eval_shape(lambda: jax.random.key(seed))
    return module_flops(task.make_model, task.trainable, task.loss_fn, spec)


def task_flops_per_example(task) -> float:
    """Model FLOPs of one example's forward + backward in `task`'s training step (see the module docstring)."""
    return task_flops(task, batch=2).total / 2
