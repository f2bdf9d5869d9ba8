"""Configuration: typed, frozen dataclasses for every section and their checks.

Owns: the shape of a run's configuration and its validation. Enumerated strings are `Literal[...]` types
(checked generically when a mapping is coerced, `cig_jax.config_io`); each section's `check(key)` tests its
own fields together; `Config.check` and `ModelConfig.check` test how the sections fit (ViT -> resamplers ->
LLM -> DiT widths, stage vs data source). `load_config` runs all of them, so a recipe's every config error is
reported before anything is built or trained. Every section is frozen (hashable): models keep their configs as
static attributes of their graphs, and equal graphs share compiled code.

Each field has a kind (`dataclasses.field(metadata={"kind": ...})`, default 'architecture'):
  architecture  what the parameters are: must match between a checkpoint and the run restoring it
  adapter       LoRA settings: a stage may add adapters to a checkpoint that has none (`train.init_from`)
  objective     how a loss weighs things: may change from one stage to the next
  execution     how the same parameters are computed (layout, remat, kernels, compute dtype)
  sampling      how images and tokens are drawn at inference
`field_paths(kind)` lists the dotted paths of a kind (checkpoint comparisons use it).

Does not own: YAML, `base:` chains, `--set` overrides, dumping (`cig_jax.config_io`, re-exported here);
what the values mean (models, mesh, trainer read their own sections).
"""
from __future__ import annotations

import dataclasses
import math
import typing
from typing import Literal, Optional

from cig_jax.config_io import (ConfigError, apply_override, dump_yaml, from_dict, frozen_value,  # noqa: F401
                               load_config, load_yaml_tree, parse_cli, to_dict)

DType = Literal["float32", "bfloat16", "float16"]
RematPolicy = Literal["none", "full", "nothing_saveable", "dots_saveable", "dots_with_no_batch_dims_saveable"]
AttentionImpl = Literal["xla", "cudnn"]
Interpolation = Literal["bicubic", "bilinear"]
# Record kinds (= cig_jax.data.schema.KNOWN_KINDS; tests/test_config.py checks they agree).
RecordKind = Literal["chat", "name_based", "single_turn", "rollback", "markov_edit", "video"]
# What `train.trainable` may name (= cig_jax.models.cig.PARTS).
Part = Literal["vit", "input_resampler", "llm", "llm_adapters", "output_resampler", "patch_pos_embed", "dit",
               "id_encoder", "vae"]
Stage = Literal["lm", "detokenizer", "personalize", "multiround"]
DataSource = Literal["random_tokens", "synthetic", "tfds"]
KINDS = ("architecture", "adapter", "objective", "execution", "sampling")


def _kind(kind: str, default=dataclasses.MISSING, factory=dataclasses.MISSING):
    return dataclasses.field(default=default, default_factory=factory, metadata={"kind": kind})


def _exec(default):
    return _kind("execution", default)


def _obj(default):
    return _kind("objective", default)


def _samp(default):
    return _kind("sampling", default)


def _adapt(default):
    return _kind("adapter", default)


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


def _need(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


def _is_square(n: int) -> bool:
    return n > 0 and math.isqrt(n) ** 2 == n


# ----------------------------------------------------------------------------------------------------------
# Model sections
# ----------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class RopeScalingConfig(Section):
    """RoPE frequency scaling. `type`: 'llama3' (Llama 3.1 style) or 'linear' (position interpolation)."""

    type: Literal["llama3", "linear"] = "llama3"
    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclasses.dataclass(frozen=True)
class LLMConfig(Section):
    """A LLaMA-family decoder (LLaMA 2/3, Qwen2 with `qkv_bias` and `tie_word_embeddings`)."""

    vocab_size: int = 512
    hidden_size: int = 64
    intermediate_size: int = 176
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: Optional[int] = None  # default hidden_size // num_heads
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: Optional[RopeScalingConfig] = None
    max_position_embeddings: int = 2048
    qkv_bias: bool = False
    tie_word_embeddings: bool = False
    # LoRA adapters (SEED-X fine-tuning: rank 32, alpha 32, dropout 0.05 on all projections). 0 = off.
    lora_rank: int = _adapt(0)
    lora_alpha: float = _adapt(32.0)
    lora_dropout: float = _adapt(0.0)
    lora_targets: tuple[Literal["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], ...] = \
        _adapt(("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"))
    scan_layers: bool = _exec(True)  # stack layers and run them under lax.scan (fast compiles at depth)
    remat_policy: RematPolicy = _exec("nothing_saveable")
    attention_impl: Optional[AttentionImpl] = _exec(None)  # None: XLA picks; 'cudnn': flash attention on GPU
    dtype: DType = _exec("float32")  # compute dtype
    param_dtype: DType = "float32"

    def resolved_head_dim(self) -> int:
        return self.head_dim if self.head_dim is not None else self.hidden_size // self.num_heads

    def check(self, key: str) -> None:
        _need(self.num_kv_heads > 0 and self.num_heads % self.num_kv_heads == 0,
              f"'{key}.num_heads' ({self.num_heads}) must be a multiple of '{key}.num_kv_heads' ({self.num_kv_heads})")
        _need(self.head_dim is not None or self.hidden_size % self.num_heads == 0,
              f"'{key}.hidden_size' must be divisible by '{key}.num_heads' or set head_dim")
        _need(self.lora_rank >= 0, f"'{key}.lora_rank' must be >= 0, got {self.lora_rank}")
        _need(0.0 <= self.lora_dropout < 1.0, f"'{key}.lora_dropout' must be in [0, 1), got {self.lora_dropout}")


@dataclasses.dataclass(frozen=True)
class ResamplerConfig(Section):
    """Qwen-VL-style resampler: `num_queries` learned queries (a square grid) cross-attend to `kv_dim` inputs.

    SEED-X uses it three times: the ViT's attention pool (256 queries, 4096 wide, kv 1664, ln_post + proj),
    the input resampler (ViT features -> 64 LLM tokens) and the output resampler (64 LLM states -> 64 visual
    embeddings); the last two have no ln_post/proj (`out_dim: null`).
    """

    num_queries: int = 4  # a perfect square; the queries sit on a sqrt(num_queries)^2 grid
    embed_dim: int = 64  # query / attention width (= output width when out_dim is null)
    num_heads: int = 4
    kv_dim: Optional[int] = None  # width of the inputs; a bias-free kv projection when != embed_dim
    out_dim: Optional[int] = None  # set: ln_post then a projection to out_dim (Qwen-VL ViT head)
    proj_bias: bool = False  # bias on that projection (Qwen-VL: none)
    layer_norm_eps: float = 1e-5  # Qwen-VL ViT attention pool: 1e-6; SEED-X MLLM resamplers: 1e-5
    pos_interpolation: Interpolation = "bicubic"  # how the query grid's sin-cos table is resized to the key grid
    attention_impl: Optional[AttentionImpl] = _exec(None)
    dtype: DType = _exec("float32")
    param_dtype: DType = "float32"

    def in_width(self) -> int:
        return self.kv_dim if self.kv_dim is not None else self.embed_dim

    def out_width(self) -> int:
        return self.out_dim if self.out_dim is not None else self.embed_dim

    def check(self, key: str) -> None:
        _need(_is_square(self.num_queries), f"'{key}.num_queries' ({self.num_queries}) must be a perfect square")
        _need(self.embed_dim % self.num_heads == 0,
              f"'{key}.embed_dim' ({self.embed_dim}) must be divisible by '{key}.num_heads' ({self.num_heads})")
        _need(self.embed_dim % 4 == 0, f"'{key}.embed_dim' ({self.embed_dim}) must be divisible by 4 "
                                       "(2-D sin-cos query positions)")


@dataclasses.dataclass(frozen=True)
class ViTConfig(Section):
    """A pre-norm ViT covering CLIP, SigLIP and the Qwen-VL ViT-G (see `cig_jax.models.vit` presets).

    CLIP: class_token, patch_bias false, pre_norm, quick_gelu, post_norm 'pooled', pool 'cls'.
    SigLIP: no class token, patch_bias, gelu_tanh, post_norm 'hidden', pool 'map' (or 'none').
    Qwen-VL: no class token, 16x16 learned positions resized to the patch grid, gelu, eps 1e-6,
    pool 'resampler' (attention pool of 256 queries -> ln_post -> 4096x4096 proj).
    """

    image_size: int = 32
    patch_size: int = 8
    num_channels: int = 3
    hidden_size: int = 64
    intermediate_size: int = 256  # Qwen-VL ViT-G: int(1664 * 4.9231) = 8192
    num_layers: int = 2
    num_heads: int = 4
    hidden_act: Literal["gelu", "gelu_tanh", "quick_gelu"] = "gelu"  # gelu: erf
    layer_norm_eps: float = 1e-6
    class_token: bool = False
    patch_bias: bool = False
    pos_grid_size: Optional[int] = None  # side of the learned position grid; null: image_size // patch_size
    pos_interpolation: Interpolation = "bicubic"  # torch align_corners=False semantics
    pre_norm: bool = True  # LayerNorm after embeddings (CLIP pre_layrnorm, Qwen ln_pre)
    post_norm: Literal["none", "hidden", "pooled"] = "none"  # hidden: SigLIP (last hidden state); pooled: CLIP CLS
    pool: Literal["none", "cls", "map", "resampler"] = "resampler"  # map: SigLIP attention-pool head; resampler: Qwen-VL
    # attn_pool runs with this ViT's dtype / param_dtype / attention_impl, whatever its own fields say.
    attn_pool: Optional[ResamplerConfig] = dataclasses.field(
        default_factory=lambda: ResamplerConfig(num_queries=16, embed_dim=64, num_heads=4, kv_dim=64, out_dim=64,
                                                layer_norm_eps=1e-6)
    )
    scan_layers: bool = _exec(True)
    remat_policy: RematPolicy = _exec("none")
    attention_impl: Optional[AttentionImpl] = _exec(None)
    dtype: DType = _exec("float32")
    param_dtype: DType = "float32"

    def check(self, key: str) -> None:
        _need(self.hidden_size % self.num_heads == 0,
              f"'{key}.hidden_size' ({self.hidden_size}) must be divisible by '{key}.num_heads' ({self.num_heads})")
        _need(self.image_size % self.patch_size == 0,
              f"'{key}.image_size' ({self.image_size}) must be a multiple of '{key}.patch_size' ({self.patch_size})")
        _need(self.pool != "cls" or self.class_token, f"'{key}.pool: cls' needs '{key}.class_token: true'")
        _need(self.post_norm != "pooled" or self.pool == "cls",
              f"'{key}.post_norm: pooled' applies to the class token: use it with '{key}.pool: cls'")
        if self.pool == "resampler":
            _need(self.attn_pool is not None, f"'{key}.pool: resampler' needs a '{key}.attn_pool' section")
            _need(self.attn_pool.in_width() == self.hidden_size,
                  f"'{key}.attn_pool.kv_dim' ({self.attn_pool.in_width()}) must equal '{key}.hidden_size' "
                  f"({self.hidden_size})")
            _need(not self.class_token, f"'{key}.pool: resampler' needs '{key}.class_token: false' (its keys must "
                                        "form a square grid)")

    def features(self) -> tuple[int, int]:
        """(K, D): tokens per image and width of what this ViT hands the input resampler."""
        if self.pool == "resampler":
            return self.attn_pool.num_queries, self.attn_pool.out_width()
        side = self.image_size // self.patch_size
        return side * side + int(self.class_token), self.hidden_size


@dataclasses.dataclass(frozen=True)
class VAEConfig(Section):
    """AutoencoderKL in the diffusers layout (SD 1.x/2.x/XL: 4 latent channels with quant convs; SD3/FLUX:
    16 latent channels, no quant convs, a shift_factor). Built from a diffusers config.json by
    `cig_jax.convert.diffusers.vae_config_from_diffusers`."""

    in_channels: int = 3
    out_channels: int = 3
    block_out_channels: tuple[int, ...] = (32, 64)
    layers_per_block: int = 1
    latent_channels: int = 4
    norm_num_groups: int = 32
    act_fn: Literal["silu", "swish", "gelu", "relu"] = "silu"
    mid_block_add_attention: bool = True
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    scaling_factor: float = 0.18215
    shift_factor: Optional[float] = None  # None: 0
    dtype: DType = _exec("float32")
    param_dtype: DType = "float32"

    def check(self, key: str) -> None:
        _need(len(self.block_out_channels) > 0, f"'{key}.block_out_channels' may not be empty")
        for c in self.block_out_channels:
            _need(c % self.norm_num_groups == 0, f"'{key}.block_out_channels' ({c}) must be multiples of "
                                                 f"'{key}.norm_num_groups' ({self.norm_num_groups})")


@dataclasses.dataclass(frozen=True)
class IDEncoderConfig(Section):
    """Perceiver that turns one face embedding (512-d ArcFace or 128-d dlib), optionally with face-crop
    features, into `num_tokens` identity tokens for the DiT."""

    embedding_dim: int = 128  # 512 for insightface ArcFace, 128 for dlib
    feature_dim: Optional[int] = None  # face-crop feature width (e.g. ViT patch features); None: unused
    num_tokens: int = 16  # K identity tokens out
    num_embedding_tokens: int = 4  # the face embedding is expanded into this many context tokens
    width: int = 256
    depth: int = 2
    num_heads: int = 4
    mlp_ratio: int = 4
    normalize_embedding: bool = True  # L2-normalise the face embedding first (ArcFace and dlib scales differ)

    def check(self, key: str) -> None:
        _need(self.width % self.num_heads == 0, f"'{key}.width' must be divisible by '{key}.num_heads'")


@dataclasses.dataclass(frozen=True)
class DiTConfig(Section):
    """PixArt-style latent DiT (diffusers `PixArtTransformer2DModel` layout) plus the identity branch.

    `identity_injection`: 'none' (exact PixArt), 'concat' (identity tokens appended to the projected
    condition sequence) or 'parallel' (a zero-initialised cross-attention to identity tokens after every
    `identity_every` blocks, scaled by `id_scale` at call time, PuLID-FLUX style).
    """

    num_layers: int = 2
    num_heads: int = 4
    head_dim: int = 16
    in_channels: int = 4
    out_channels: Optional[int] = None  # None: in_channels (PixArt-alpha checkpoints use 8: eps + variance)
    patch_size: int = 2
    sample_size: int = 32  # latent side at training resolution: sets base_size of the sin-cos positions
    interpolation_scale: Optional[float] = None  # None: max(sample_size // 64, 1), as diffusers
    caption_channels: Optional[int] = 64  # width of visual_embeddings; None: no caption_projection
    cross_attention_dim: Optional[int] = None  # None: num_heads * head_dim
    attention_bias: bool = True
    norm_eps: float = 1e-6
    norm_elementwise_affine: bool = False
    mlp_ratio: int = 4
    use_additional_conditions: bool = False  # PixArt-alpha 1024 micro-conditions (resolution, aspect ratio)
    identity_injection: Literal["none", "concat", "parallel"] = "none"
    # True: the visual embeddings, read as a q x q grid in raster order (q^2 = their number, q dividing the
    # patch grid), are also added to the patch tokens of their image region (nearest upsampling, a zero-init
    # projection, so a PixArt checkpoint starts unchanged): spatial conditioning as in SR3 / cascaded
    # diffusion, beside the cross-attention. For grid-pooled visual embeddings (mllm.reg_target_pool: grid).
    visual_grid_injection: bool = False
    identity_every: int = 1  # parallel: an identity cross-attention after every N blocks
    identity: IDEncoderConfig = dataclasses.field(default_factory=IDEncoderConfig)
    scan_layers: bool = _exec(True)
    remat_policy: RematPolicy = _exec("none")
    attention_impl: Optional[AttentionImpl] = _exec(None)
    dtype: DType = _exec("float32")
    param_dtype: DType = "float32"

    def inner_dim(self) -> int:
        return self.num_heads * self.head_dim

    def check(self, key: str) -> None:
        _need(self.identity_injection != "parallel"
              or (self.identity_every >= 1 and self.num_layers % self.identity_every == 0),
              f"'{key}.identity_every' ({self.identity_every}) must divide '{key}.num_layers' ({self.num_layers})")
        _need(not self.use_additional_conditions or self.inner_dim() % 3 == 0,
              f"'{key}' micro-conditions need num_heads * head_dim divisible by 3")
        _need(not self.visual_grid_injection or self.caption_channels is not None,
              f"'{key}.visual_grid_injection' needs '{key}.caption_channels' (the projected condition)")
        _need(self.sample_size % self.patch_size == 0,
              f"'{key}.sample_size' ({self.sample_size}) must be a multiple of '{key}.patch_size' ({self.patch_size})")


@dataclasses.dataclass(frozen=True)
class MLLMConfig(Section):
    """How SEED-X wires ViT, resamplers and LLM (see `cig_jax/models/mllm.py`, `cig_jax/data/chat_template.py`).

    `reg_target_pool`: how the ViT's tokens (256 for ViT-G) become the num_image_tokens regression targets:
    'sequence' averages runs of consecutive tokens (SEED-X `vit_down`: avg_pool1d, kernel = stride = 256/64 = 4,
    over the row-major token order), 'grid' averages square windows of the token grid (16x16 -> 8x8).
    `reg_loss`: mse (SEED-X agent), mse_position (each slot's error over its targets' batch variance), cosine.
    """

    num_image_tokens: int = 4  # slots per image block; = input_resampler / output_resampler num_queries (SEED-X: 64)
    lm_weight: float = _obj(1.0)  # SEED-X lm_loss_scale
    reg_weight: float = _obj(6.0)  # SEED-X rec_loss_scale
    reg_loss: Literal["mse", "mse_position", "cosine"] = _obj("mse")
    reg_target_pool: Literal["sequence", "grid"] = "sequence"
    add_patch_pos: bool = True  # SEED-X agent `patch_pos_embed` [4, llm width], added to input image tokens

    def check(self, key: str) -> None:
        _need(0 < self.num_image_tokens <= 100,
              f"'{key}.num_image_tokens' must be in 1..100, got {self.num_image_tokens}")


@dataclasses.dataclass(frozen=True)
class ModelConfig(Section):
    llm: LLMConfig = dataclasses.field(default_factory=LLMConfig)
    vae: VAEConfig = dataclasses.field(default_factory=VAEConfig)
    dit: DiTConfig = dataclasses.field(default_factory=DiTConfig)
    vit: ViTConfig = dataclasses.field(default_factory=ViTConfig)
    # ViT features [*, vit.attn_pool.num_queries, vit out] -> [*, num_queries, llm.hidden_size]
    input_resampler: ResamplerConfig = dataclasses.field(
        default_factory=lambda: ResamplerConfig(num_queries=4, embed_dim=64, num_heads=4, kv_dim=64)
    )
    # LLM hidden states at the image-query tokens [*, num_queries, llm.hidden_size] -> visual embeddings
    output_resampler: ResamplerConfig = dataclasses.field(
        default_factory=lambda: ResamplerConfig(num_queries=4, embed_dim=64, num_heads=4, kv_dim=64)
    )
    mllm: MLLMConfig = dataclasses.field(default_factory=MLLMConfig)
    # The detokenizer works in the VAE's latent space (true) or directly on pixels in [-1, 1] (false: tiny
    # models; then dit.in_channels = 3 and dit.sample_size = the image side).
    use_vae: bool = True

    def check(self, key: str = "model") -> None:
        """ViT -> input resampler -> LLM -> output resampler -> DiT: each width the next one reads."""
        m, ir, orr, llm, dit = self.mllm, self.input_resampler, self.output_resampler, self.llm, self.dit
        k, d_vit = self.vit.features()
        _need(ir.num_queries == m.num_image_tokens == orr.num_queries,
              f"'{key}.input_resampler.num_queries' ({ir.num_queries}), '{key}.output_resampler.num_queries' "
              f"({orr.num_queries}) and '{key}.mllm.num_image_tokens' ({m.num_image_tokens}) must be equal")
        _need(ir.in_width() == d_vit,
              f"'{key}.input_resampler.kv_dim' ({ir.in_width()}) must equal the ViT feature width ({d_vit})")
        _need(_is_square(k), f"'{key}.vit': its {k} tokens per image must form a square grid (the input "
                             "resampler's keys)")
        _need(ir.out_width() == llm.hidden_size, f"'{key}.input_resampler' output width ({ir.out_width()}) must "
                                                 f"equal '{key}.llm.hidden_size' ({llm.hidden_size})")
        _need(orr.in_width() == llm.hidden_size, f"'{key}.output_resampler.kv_dim' ({orr.in_width()}) must equal "
                                                 f"'{key}.llm.hidden_size' ({llm.hidden_size})")
        _need(orr.out_width() == d_vit, f"'{key}.output_resampler' output width ({orr.out_width()}) must equal the "
                                        f"ViT feature width ({d_vit}): visual embeddings regress pooled ViT features")
        _need(k % m.num_image_tokens == 0,
              f"ViT tokens per image ({k}) must be a multiple of '{key}.mllm.num_image_tokens'")
        if m.reg_target_pool == "grid":
            _need(_is_square(k) and _is_square(m.num_image_tokens)
                  and math.isqrt(k) % math.isqrt(m.num_image_tokens) == 0,
                  f"'{key}.mllm.reg_target_pool: grid' needs square grids with {m.num_image_tokens} dividing {k} "
                  "evenly")
        _need(dit.caption_channels == d_vit, f"'{key}.dit.caption_channels' ({dit.caption_channels}) must equal the "
                                             f"ViT feature width ({d_vit}): the DiT reads the MLLM's visual embeddings")
        if self.use_vae:
            _need(dit.in_channels == self.vae.latent_channels, f"'{key}.dit.in_channels' ({dit.in_channels}) must "
                                                               f"equal '{key}.vae.latent_channels' ({self.vae.latent_channels})")
        else:
            _need(dit.in_channels == 3, f"'{key}.use_vae: false' (pixel space) needs '{key}.dit.in_channels: 3'")
            _need(dit.sample_size == self.vit.image_size, f"pixel space: '{key}.dit.sample_size' ({dit.sample_size}) "
                                                          f"must equal '{key}.vit.image_size' ({self.vit.image_size})")
        if dit.visual_grid_injection:
            q, g = math.isqrt(m.num_image_tokens), dit.sample_size // dit.patch_size
            _need(_is_square(m.num_image_tokens) and g % q == 0,
                  f"'{key}.dit.visual_grid_injection': {m.num_image_tokens} visual embeddings must form a square grid "
                  f"dividing the DiT's {g}x{g} patch grid")


def vit_feature_shape(cfg: ModelConfig) -> tuple[int, int]:
    """(K, D_vit): tokens per image and width of what the ViT hands the input resampler."""
    return cfg.vit.features()


# ----------------------------------------------------------------------------------------------------------
# Run sections
# ----------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class MeshConfig(Section):
    """Device mesh with axes (data, fsdp, tensor). A size of -1 takes the remaining devices.

    `axis_rules` maps logical axis names (on parameters and activations) to mesh axes, MaxText style:
    a list of [logical_name, mesh_axis | [mesh_axes...] | null]. The first rule whose mesh axes are not
    yet used by the same array wins.
    """

    data: int = _exec(1)
    fsdp: int = _exec(-1)
    tensor: int = _exec(1)
    axis_rules: tuple = _kind("execution", (
        ("batch", ("data", "fsdp")),
        ("activation_length", None),
        ("activation_embed", None),
        ("embed", "fsdp"),
        ("vocab", "tensor"),
        ("mlp", "tensor"),
        ("heads", "tensor"),
        ("kv_heads", "tensor"),
        # fallbacks: a weight whose other dimension takes no mesh axis (LoRA factors, or an `embed` width
        # that does not divide by fsdp) is split along this one instead of being replicated
        ("mlp", "fsdp"),
        ("heads", "fsdp"),
        ("kv_heads", "fsdp"),
        ("head_dim", None),
        ("layers", None),
        ("norm", None),
        ("conv_in", "fsdp"),
        ("conv_out", "tensor"),
    ))

    def check(self, key: str) -> None:
        sizes = {a: getattr(self, a) for a in ("data", "fsdp", "tensor")}
        for axis, size in sizes.items():
            _need(size > 0 or size == -1, f"'{key}.{axis}' must be a positive size or -1, got {size}")
        _need(list(sizes.values()).count(-1) <= 1, f"'{key}': at most one of data/fsdp/tensor may be -1, got {sizes}")
        for i, rule in enumerate(self.axis_rules):
            _need(isinstance(rule, tuple) and len(rule) == 2 and isinstance(rule[0], str),
                  f"'{key}.axis_rules[{i}]' must be [logical_name, mesh_axis | [mesh_axes] | null], got {rule!r}")


@dataclasses.dataclass(frozen=True)
class OptimizerConfig(Section):
    learning_rate: float = 3e-4
    warmup_steps: int = 10
    decay_steps: int = 0  # 0: cosine over the whole run
    end_learning_rate_ratio: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.0
    grad_clip_norm: float = 1.0


@dataclasses.dataclass(frozen=True)
class DataConfig(Section):
    """Where a stage's examples come from.

    source 'random_tokens': the LM smoke data. 'synthetic': `num_records` conversations drawn in memory by
    `cig_jax.data.synthetic` (kinds `kinds`, rendered at `render_size`). 'tfds': the array_record dataset
    under `dir` (written by `python -m cig_jax.data.tfds_builder` or the demo), split `split`, optionally
    only the records whose kind is in `kinds`. `markov_view`: train on each conversation's last round with
    only the previous image (the Markov baseline). Images are resized to the ViT's input size.
    """

    source: DataSource = "random_tokens"
    seq_len: int = 64
    global_batch_size: int = 8
    seed: int = 0
    dir: str = ""  # tfds: the data_dir given to the builder
    split: str = "train"
    kinds: tuple[RecordKind, ...] = ()  # () = every kind (repeat a kind to weigh it up)
    num_records: int = 1000  # synthetic
    render_size: int = 64  # synthetic
    max_images: int = 4  # images per example (longer records are skipped and counted)
    markov_view: bool = False
    tokenizer: str = ""  # a Hugging Face tokenizer directory; "" = the tiny tokenizer built locally

    def check(self, key: str) -> None:
        _need(self.source != "tfds" or bool(self.dir),
              f"'{key}.source: tfds' needs '{key}.dir' (the folder given to cig_jax.data.tfds_builder)")
        for name in ("seq_len", "global_batch_size", "max_images", "num_records", "render_size"):
            _need(getattr(self, name) > 0, f"'{key}.{name}' must be positive, got {getattr(self, name)}")


@dataclasses.dataclass(frozen=True)
class TrainConfig(Section):
    """The loop. `stage` picks what trains on what (see `cig_jax/train/stages.py`)."""

    stage: Stage = "lm"
    steps: int = 20
    log_every: int = _exec(5)
    workdir: str = _exec("workdir/default")
    seed: int = 0
    grad_accum_steps: int = _exec(1)  # microbatches per update (the global batch is split into this many)
    checkpoint_every: int = _exec(0)  # 0: only at the end; -1: never (benchmarks)
    keep_checkpoints: int = _exec(3)
    async_checkpoints: bool = _exec(True)
    resume: bool = _exec(True)  # continue from the latest checkpoint in workdir when there is one
    tensorboard: bool = _exec(True)
    progress_bar: bool = _exec(False)
    peak_tflops: float = _exec(0.0)  # per-device peak for MFU; 0: look the device up, else report none
    # Staged training (see cig_jax/train/stages.py).
    init_from: str = ""  # workdir of the previous stage: its latest checkpoint initialises the whole model
    trainable: tuple[Part, ...] = ()  # parts that train; () = the stage's default
    detokenizer_loss_weight: float = _obj(0.0)  # MLLM stages: + this x the DiT's loss on predicted
    # embeddings (trains the MLLM through the frozen DiT, or with trainable: [dit] adapts the DiT to the MLLM's)

    def check(self, key: str) -> None:
        _need(self.steps >= 0, f"'{key}.steps' must be >= 0, got {self.steps}")
        _need(self.log_every > 0, f"'{key}.log_every' must be positive, got {self.log_every}")
        _need(self.grad_accum_steps > 0, f"'{key}.grad_accum_steps' must be positive, got {self.grad_accum_steps}")
        _need(self.detokenizer_loss_weight >= 0,
              f"'{key}.detokenizer_loss_weight' must be >= 0, got {self.detokenizer_loss_weight}")


@dataclasses.dataclass(frozen=True)
class SampleConfig(Section):
    max_new_tokens: int = _samp(64)
    temperature: float = _samp(0.0)  # 0: greedy
    top_p: float = _samp(1.0)
    seed: int = _samp(0)


@dataclasses.dataclass(frozen=True)
class DiffusionConfig(Section):
    """How the detokenizer is trained and sampled (`cig_jax/diffusion.py`).

    objective 'flow': rectified flow, x_t = (1 - t) x0 + t noise, the model predicts v = noise - x0 and is
    given t * timestep_scale (PixArt's timestep embedding expects [0, 1000)); t ~ logit-normal (SD3) or
    uniform. Samplers 'euler' / 'heun' integrate t from 1 to 0 over `num_steps`, on a schedule shifted by
    `shift` (SD3: t' = shift t / (1 + (shift - 1) t); 1 = no shift).
    objective 'ddpm': epsilon prediction on a discrete beta schedule (diffusers DDPMScheduler fields; PixArt
    checkpoints: 'linear' 1e-4..0.02; SD: 'scaled_linear' 0.00085..0.012); sampler 'ddim' (deterministic),
    timesteps spaced as diffusers DDIMScheduler (`timestep_spacing`, `steps_offset`, `set_alpha_to_one`).
    Guidance: pred = uncond + visual_guidance_scale (cond_vis - uncond) + identity_guidance_scale
    (cond_vis_id - cond_vis); `negative_visual`: 'zeros' (default) or 'provided' (the caller passes the
    embeddings of an all-zero image, as SEED-X). p_drop_*: condition dropout while training, for guidance.
    """

    objective: Literal["flow", "ddpm"] = "flow"
    sampler: Literal["euler", "heun", "ddim"] = _samp("euler")  # flow: euler | heun; ddpm: ddim
    # flow: what the network outputs, 'velocity' (noise - x0) or 'sample' (x0, turned into a velocity with
    # t >= min_time; for pixel-space models whose patches hold more values than a token is wide)
    prediction: Literal["velocity", "sample"] = "velocity"
    min_time: float = 0.05
    num_steps: int = _samp(25)
    # flow matching
    time_sampling: Literal["logit_normal", "uniform"] = _obj("logit_normal")
    logit_mean: float = _obj(0.0)
    logit_std: float = _obj(1.0)
    timestep_scale: float = 1000.0
    shift: float = _samp(1.0)
    # ddpm
    num_train_timesteps: int = 1000
    beta_schedule: Literal["linear", "scaled_linear"] = "linear"
    beta_start: float = 0.0001
    beta_end: float = 0.02
    timestep_spacing: Literal["leading", "trailing", "linspace"] = _samp("leading")
    steps_offset: int = _samp(0)
    set_alpha_to_one: bool = _samp(True)
    # guidance
    visual_guidance_scale: float = _samp(1.0)
    identity_guidance_scale: float = _samp(1.0)
    negative_visual: Literal["zeros", "provided"] = _samp("zeros")
    p_drop_visual: float = _obj(0.0)
    p_drop_identity: float = _obj(0.0)

    def check(self, key: str) -> None:
        samplers = {"flow": ("euler", "heun"), "ddpm": ("ddim",)}
        _need(self.sampler in samplers[self.objective], f"'{key}.sampler' must be one of {samplers[self.objective]} "
                                                        f"for objective {self.objective!r}, got {self.sampler!r}")
        _need(self.num_steps >= 1 and (self.objective != "ddpm" or self.num_steps <= self.num_train_timesteps),
              f"'{key}.num_steps' must be in [1, num_train_timesteps], got {self.num_steps}")
        _need(0 < self.min_time < 1, f"'{key}.min_time' must be in (0, 1), got {self.min_time}")
        _need(self.shift > 0, f"'{key}.shift' must be positive, got {self.shift}")
        for name in ("p_drop_visual", "p_drop_identity"):
            _need(0.0 <= getattr(self, name) < 1.0, f"'{key}.{name}' must be in [0, 1), got {getattr(self, name)}")


@dataclasses.dataclass(frozen=True)
class Config(Section):
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    optimizer: OptimizerConfig = dataclasses.field(default_factory=OptimizerConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    sample: SampleConfig = dataclasses.field(default_factory=SampleConfig)
    diffusion: DiffusionConfig = dataclasses.field(default_factory=DiffusionConfig)

    def check(self, key: str = "") -> None:
        """What a stage needs of the other sections (`cig_jax/train/stages.py` builds it)."""
        stage, data, train = self.train.stage, self.data, self.train
        if stage == "lm":
            _need(data.source == "random_tokens", f"'train.stage: lm' needs 'data.source: random_tokens', got "
                                                  f"{data.source!r}")
            return
        _need(data.source in ("synthetic", "tfds"),
              f"'train.stage: {stage}' needs 'data.source' synthetic or tfds, got {data.source!r}")
        if stage != "detokenizer":
            _need("vit" not in train.trainable, f"'train.stage: {stage}': the ViT stays frozen in MLLM stages (drop "
                                                "'vit' from 'train.trainable')")
            _need(data.max_images >= 1, f"'data.max_images' must be >= 1 for stage {stage!r}")


# ----------------------------------------------------------------------------------------------------------
# Checking a tree
# ----------------------------------------------------------------------------------------------------------
def check(cfg, source: str = "<config>", key: str = "") -> None:
    """Checks a section tree (a whole `Config`, or one section at dotted `key`): every field against its type
    (enumerations included, also for sections built in code), then each section's own `check`, innermost
    first, then the cross-section fits. Raises `ConfigError` naming `source` and the key."""
    from cig_jax.config_io import _shallow_dict

    from_dict(type(cfg), _shallow_dict(cfg), source=source, prefix=key)  # types and Literal choices
    try:
        _check_tree(cfg, key)
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None


def _check_tree(obj, key: str) -> None:
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        if dataclasses.is_dataclass(v):
            _check_tree(v, f"{key}.{f.name}" if key else f.name)
    obj.check(key)


def validate(cfg: Config, source: str = "<config>") -> None:
    """= check(cfg, source): kept for callers of the old name."""
    check(cfg, source)


def validate_diffusion(d: DiffusionConfig, source: str = "<config>", key: str = "diffusion") -> None:
    check(d, source, key)


def field_paths(kind: str, cls=Config, prefix: str = "") -> frozenset[str]:
    """Dotted paths of every field of `kind` (see the module docstring) under section class `cls`."""
    assert kind in KINDS, kind
    out = set()
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        path = f"{prefix}.{f.name}" if prefix else f.name
        tp = hints[f.name]
        inner = [a for a in (typing.get_args(tp) or (tp,)) if dataclasses.is_dataclass(a)]
        if dataclasses.is_dataclass(tp) or inner:
            out |= field_paths(kind, inner[0] if inner else tp, path)
        elif f.metadata.get("kind", "architecture") == kind:
            out.add(path)
    return frozenset(out)
