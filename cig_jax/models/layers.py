"""Small shared layers: annotated initializers, Dense, norms, attention core, dtype names.

Owns: the one way a parameter gets its logical axis names (`logical`), and the few layers every model
file uses. Parameters are created with *logical* names only (never eagerly sharded); `cig_jax.sharding`
maps those names to mesh axes from the config rules when the model state is placed on a mesh.

Does not own: any model family (those live one per file beside this one).
"""
from __future__ import annotations

from typing import Optional, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from cig_jax.models import splash
from cig_jax.models.cpu_attention import causal_blocked, full

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "nothing_saveable": jax.checkpoint_policies.nothing_saveable,
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
    "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def remat(fn, policy: str, *, scanned: bool):
    """Wraps a layer body in `jax.checkpoint` with the named policy ('none' returns `fn` unchanged)."""
    if policy == "none":
        return fn
    return jax.checkpoint(fn, policy=REMAT_POLICIES[policy], prevent_cse=not scanned)


def scan_or_loop(body, carry, xs, *, scan: bool, length: int):
    """`jax.lax.scan(body, carry, xs)`, or the same computation unrolled as a Python loop over the leading
    axis of `xs` (faster on some backends, slower to compile at depth). Stacked layers use it."""
    if scan:
        return jax.lax.scan(body, carry, xs)
    ys = []
    leaves, treedef = jax.tree.flatten(xs)
    parts = [_unstack(a) for a in leaves]  # each: `length` slices
    for i in range(length):
        carry, y = body(carry, jax.tree.unflatten(treedef, [p[i] for p in parts]))
        ys.append(y)
    return carry, jax.tree.map(lambda *a: jnp.stack(a), *ys)


@jax.custom_vjp
def _unstack(a):
    """[n, ...] -> n arrays [...]. Its VJP stacks the n cotangents (one copy); autodiff of `a[i]` pads each
    layer's gradient to the stacked shape and sums n of them (XLA:CPU: ~2 full passes per layer)."""
    return tuple(a[i] for i in range(a.shape[0]))


def _unstack_fwd(a):
    return _unstack(a), None


def _unstack_bwd(_, cts):
    return (jnp.stack(cts),)


_unstack.defvjp(_unstack_fwd, _unstack_bwd)


def dtype_of(name) -> jnp.dtype:
    """'bfloat16' -> jnp.bfloat16 (dtypes pass through)."""
    if isinstance(name, str):
        return DTYPES[name]
    return name


def logical(init, *names: Optional[str]):
    """Wraps an initializer so the parameter it makes carries logical axis names (one per dimension)."""
    return nnx.with_metadata(init, sharding_names=tuple(names), eager_sharding=False)


def param(rngs: nnx.Rngs, init, shape: Sequence[int], names: Sequence[Optional[str]], dtype=jnp.float32) -> nnx.Param:
    """A parameter with logical axis names, initialised from `init(key, shape, dtype)`."""
    return nnx.Param(init(rngs.params(), tuple(shape), dtype), sharding_names=tuple(names), eager_sharding=False)


class LoRAParam(nnx.Param):
    """Low-rank adapter weights: a Param subtype, so stages can train adapters while the base stays frozen."""


class Dense(nnx.Module):
    """y = x @ kernel (+ bias) (+ LoRA), kernel [in, out] with logical names.

    Leading dimensions are flattened into one before the matmul: XLA:CPU runs the backward of a rank-3 dot
    (two contracting dims for the kernel gradient) about 2x slower than the same 2-D GEMM; on TPU/GPU the
    reshape is free. With `lora_rank > 0` the layer adds `dropout(x) @ lora_a @ lora_b * alpha / rank`;
    `lora_b` starts at zero, so an adapted layer starts equal to its base.
    """

    def __init__(self, in_features: int, out_features: int, names: tuple[Optional[str], Optional[str]], *,
                 rngs: nnx.Rngs, use_bias: bool = False, dtype=jnp.float32, param_dtype=jnp.float32,
                 kernel_init=nnx.initializers.lecun_normal(), bias_init=nnx.initializers.zeros_init(),
                 lora_rank: int = 0, lora_alpha: float = 0.0):
        self.in_features, self.out_features, self.dtype = in_features, out_features, dtype
        self.kernel = param(rngs, kernel_init, (in_features, out_features), names, param_dtype)
        self.bias = param(rngs, bias_init, (out_features,), (names[1],), param_dtype) if use_bias else None
        self.lora_scale = lora_alpha / lora_rank if lora_rank else 0.0
        if not lora_rank:
            self.lora_a = self.lora_b = None
        else:
            a_init = nnx.initializers.normal(1.0 / lora_rank)
            self.lora_a = LoRAParam(a_init(rngs.params(), (in_features, lora_rank), param_dtype),
                                    sharding_names=(names[0], None), eager_sharding=False)
            self.lora_b = LoRAParam(jnp.zeros((lora_rank, out_features), param_dtype),
                                    sharding_names=(None, names[1]), eager_sharding=False)

    def __call__(self, x: jax.Array, *, dropout_rng: jax.Array | None = None, dropout_rate: float = 0.0) -> jax.Array:
        lead = x.shape[:-1]
        x = x.reshape(-1, x.shape[-1]).astype(self.dtype)
        y = x @ self.kernel.value.astype(self.dtype)
        if self.lora_a is not None:
            xa = x
            if dropout_rng is not None and dropout_rate > 0.0:
                keep = jax.random.bernoulli(dropout_rng, 1.0 - dropout_rate, x.shape)
                xa = jnp.where(keep, x / (1.0 - dropout_rate), 0.0).astype(self.dtype)
            low = xa @ self.lora_a.value.astype(self.dtype)
            y = y + (low @ self.lora_b.value.astype(self.dtype)) * self.lora_scale
        if self.bias is not None:
            y = y + self.bias.value.astype(self.dtype)
        return y.reshape(*lead, self.out_features)


class RMSNorm(nnx.Module):
    """RMSNorm computed in fp32 (LLaMA/Qwen convention: normalise in fp32, scale, cast back)."""

    def __init__(self, dim: int, *, eps: float = 1e-6, param_dtype=jnp.float32, rngs: nnx.Rngs | None = None):
        self.eps = eps
        self.scale = nnx.Param(jnp.ones((dim,), param_dtype), sharding_names=("norm",), eager_sharding=False)

    def __call__(self, x):
        dtype = x.dtype
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (self.scale.value.astype(jnp.float32) * x32).astype(dtype)


def layer_norm(dim: int, *, eps: float = 1e-5, use_bias: bool = True, use_scale: bool = True, dtype=jnp.float32,
               param_dtype=jnp.float32, rngs: nnx.Rngs) -> nnx.LayerNorm:
    """nnx.LayerNorm with logical names on scale and bias."""
    return nnx.LayerNorm(
        dim,
        epsilon=eps,
        use_bias=use_bias,
        use_scale=use_scale,
        dtype=dtype,
        param_dtype=param_dtype,
        scale_init=logical(nnx.initializers.ones_init(), "norm"),
        bias_init=logical(nnx.initializers.zeros_init(), "norm"),
        rngs=rngs,
    )


def attention(q, k, v, *, mask=None, bias=None, is_causal: bool = False, scale: float | None = None,
              implementation: str | None = None, causal_block: int | None = None):
    """Scaled dot-product attention. q: [batch, q_len, heads, head_dim]; k, v: [batch, kv_len, kv_heads,
    head_dim] (kv_heads divides heads: grouped-query attention). mask: bool, broadcastable to
    [batch, heads, q_len, kv_len], True = attend.

    implementation: 'cudnn' (flash attention on GPU) or 'xla' go through `jax.nn.dot_product_attention`;
    'einsum' is a plain grouped einsum + softmax, which XLA:CPU runs about 3x faster than the former;
    None picks 'einsum' on CPU and lets `jax.nn.dot_product_attention` choose elsewhere.
    'splash' runs the Pallas TPU kernel (`cig_jax.models.splash`; interpret mode off TPU): the mask must be key
    validity broadcast over queries, AND causal when `causal_block` is given (what our models pass); other masks
    (decoding over a KV cache) take the default path.

    causal_block: with the einsum path, a caller whose mask is causal over aligned q/k (self-attention
    without a cache) may pass a block size: query block i then only reads keys [0, (i+1) * block), which
    skips the fully masked upper triangle (about 40% less work at 4 blocks), as flash attention does; that
    path runs heads-major batched GEMMs (`cig_jax.models.cpu_attention.causal_blocked`). Without a bias, the
    einsum path is `cig_jax.models.cpu_attention.full` (the same math; a backward written as GEMMs).
    """
    if implementation == "splash":
        causal = is_causal or causal_block is not None
        if bias is None and (mask is None or causal or mask.shape[-2] == 1):
            return splash.attention(q, k, v, splash.key_validity(mask, q.shape[0], k.shape[1]), causal=causal,
                                    scale=scale)
        implementation = None  # other masks (a KV-cached chunk): the default path
    # Rows that see no key at all (e.g. padding queries) would produce NaN in softmax; give them one
    # harmless key so the output stays finite. Their values are masked out downstream anyway.
    if mask is not None:
        any_key = jnp.any(mask, axis=-1, keepdims=True)
        first = jnp.arange(mask.shape[-1]) == 0
        mask = jnp.logical_or(mask, jnp.logical_and(~any_key, first))
    if implementation is None and jax.default_backend() == "cpu":
        implementation = "einsum"
    if implementation != "einsum":
        return jax.nn.dot_product_attention(
            q, k, v, bias=bias, mask=mask, is_causal=is_causal, scale=scale, implementation=implementation
        )
    b, t, h, d = q.shape
    s, kvh = k.shape[1], k.shape[2]
    scale = 1.0 / (d ** 0.5) if scale is None else scale
    if causal_block and t == s and t > causal_block and t % causal_block == 0 and bias is None:
        if is_causal:
            causal = jnp.tril(jnp.ones((t, s), bool))
            mask = causal if mask is None else jnp.logical_and(mask, causal)
        return causal_blocked(q, k, v, mask, scale, causal_block)
    if bias is None:  # heads-major GEMMs with a hand-written backward (cig_jax.models.cpu_attention)
        if is_causal:
            causal = jnp.tril(jnp.ones((t, s), bool), k=s - t)
            mask = causal if mask is None else jnp.logical_and(mask, causal)
        return full(q, k, v, mask, scale)
    qg = q.reshape(b, t, kvh, h // kvh, d)
    logits = jnp.einsum("btkgd,bskd->bkgts", qg, k).astype(jnp.float32) * scale  # [b, kvh, g, t, s]
    logits = logits.reshape(b, h, t, s)
    if bias is not None:
        logits = logits + bias.astype(jnp.float32)
    if is_causal:
        causal = jnp.tril(jnp.ones((t, s), bool), k=s - t)
        mask = causal if mask is None else jnp.logical_and(mask, causal)
    if mask is not None:
        logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype).reshape(b, kvh, h // kvh, t, s)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v)
    return out.reshape(b, t, h, d)
