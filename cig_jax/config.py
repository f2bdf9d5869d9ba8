"""Configuration: typed dataclasses for every section, YAML loading with `base:` files, dotted overrides.

Owns: the shape of a run's configuration and its validation. A config is plain data: a tree of frozen-free
dataclasses built from YAML, then overridden from the command line (`--set model.llm.num_layers=4`).
Errors name the key and the file they came from, so a user can fix the YAML without reading this module.

Does not own: what the values mean (models, mesh, trainer read their own sections).

YAML files may name a `base:` file (relative to themselves); the base is loaded first and the file's keys
are merged over it, recursively for mappings. Lists are replaced, not merged.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Optional, Union

import yaml


class ConfigError(ValueError):
    """A configuration problem a user can fix: the message names the file and the key."""


# ----------------------------------------------------------------------------------------------------------
# Sections
# ----------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class RopeScalingConfig:
    """RoPE frequency scaling. `type`: 'llama3' (Llama 3.1 style) or 'linear' (position interpolation)."""

    type: str = "llama3"
    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclasses.dataclass(frozen=True)
class LLMConfig:
    """A LLaMA-family decoder (LLaMA 2/3, Qwen2 with `qkv_bias` and `tie_word_embeddings`).

    Model configs are frozen (hashable): modules keep them as static attributes of their graph.
    """

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
    lora_rank: int = 0
    lora_alpha: float = 32.0
    lora_dropout: float = 0.0
    lora_targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    # Execution.
    scan_layers: bool = True  # stack layers and run them under lax.scan (fast compiles at depth)
    remat_policy: str = "nothing_saveable"  # none | full | nothing_saveable | dots_saveable | dots_with_no_batch_dims_saveable
    attention_impl: Optional[str] = None  # None (XLA picks), 'xla', or 'cudnn' (flash attention on GPU)
    dtype: str = "float32"  # compute dtype
    param_dtype: str = "float32"
    logits_dtype: str = "float32"  # dtype the lm head's logits leave in (bfloat16 halves the [b, t, vocab] tensor)

    def resolved_head_dim(self) -> int:
        return self.head_dim if self.head_dim is not None else self.hidden_size // self.num_heads


@dataclasses.dataclass(frozen=True)
class ResamplerConfig:
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
    pos_interpolation: str = "bicubic"  # how the query grid's sin-cos table is resized to the key grid
    attention_impl: Optional[str] = None
    dtype: str = "float32"
    param_dtype: str = "float32"


@dataclasses.dataclass(frozen=True)
class ViTConfig:
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
    hidden_act: str = "gelu"  # gelu (erf) | gelu_tanh | quick_gelu
    layer_norm_eps: float = 1e-6
    class_token: bool = False
    patch_bias: bool = False
    pos_grid_size: Optional[int] = None  # side of the learned position grid; null: image_size // patch_size
    pos_interpolation: str = "bicubic"  # bicubic | bilinear (torch align_corners=False semantics)
    pre_norm: bool = True  # LayerNorm after embeddings (CLIP pre_layrnorm, Qwen ln_pre)
    post_norm: str = "none"  # none | hidden (SigLIP: on the last hidden state) | pooled (CLIP: on the CLS)
    pool: str = "resampler"  # none | cls | map (SigLIP attention-pool head) | resampler (Qwen-VL)
    # attn_pool runs with this ViT's dtype / param_dtype / attention_impl, whatever its own fields say.
    attn_pool: Optional[ResamplerConfig] = dataclasses.field(
        default_factory=lambda: ResamplerConfig(num_queries=16, embed_dim=64, num_heads=4, kv_dim=64, out_dim=64,
                                                layer_norm_eps=1e-6)
    )
    # Execution.
    scan_layers: bool = True
    remat_policy: str = "none"  # none | full | nothing_saveable | dots_saveable | dots_with_no_batch_dims_saveable
    attention_impl: Optional[str] = None
    dtype: str = "float32"
    param_dtype: str = "float32"


@dataclasses.dataclass
class VAEConfig:
    """AutoencoderKL in the diffusers layout (SD 1.x/2.x/XL: 4 latent channels with quant convs; SD3/FLUX:
    16 latent channels, no quant convs, a shift_factor). Built from a diffusers config.json by
    `cig_jax.convert.diffusers.vae_config_from_diffusers`."""

    in_channels: int = 3
    out_channels: int = 3
    block_out_channels: list[int] = dataclasses.field(default_factory=lambda: [32, 64])
    layers_per_block: int = 1
    latent_channels: int = 4
    norm_num_groups: int = 32
    act_fn: str = "silu"
    mid_block_add_attention: bool = True
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    scaling_factor: float = 0.18215
    shift_factor: Optional[float] = None  # None: 0
    dtype: str = "float32"
    param_dtype: str = "float32"


@dataclasses.dataclass
class IDEncoderConfig:
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


@dataclasses.dataclass
class DiTConfig:
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
    identity_injection: str = "none"  # none | concat | parallel
    # True: the visual embeddings, read as a q x q grid in raster order (q^2 = their number, q dividing the
    # patch grid), are also added to the patch tokens of their image region (nearest upsampling, a zero-init
    # projection, so a PixArt checkpoint starts unchanged): spatial conditioning as in SR3 / cascaded
    # diffusion, beside the cross-attention. For grid-pooled visual embeddings (mllm.reg_target_pool: grid).
    visual_grid_injection: bool = False
    identity_every: int = 1  # parallel: an identity cross-attention after every N blocks
    identity: IDEncoderConfig = dataclasses.field(default_factory=IDEncoderConfig)
    # Execution.
    scan_layers: bool = True
    remat_policy: str = "none"  # none | full | nothing_saveable | dots_saveable | dots_with_no_batch_dims_saveable
    attention_impl: Optional[str] = None
    dtype: str = "float32"
    param_dtype: str = "float32"

    def inner_dim(self) -> int:
        return self.num_heads * self.head_dim


@dataclasses.dataclass(frozen=True)
class MLLMConfig:
    """How SEED-X wires ViT, resamplers and LLM (see `cig_jax/models/mllm.py`, `cig_jax/data/chat_template.py`).

    `reg_target_pool`: how the ViT's tokens (256 for ViT-G) become the num_image_tokens regression targets:
    'sequence' averages runs of consecutive tokens (SEED-X `vit_down`: avg_pool1d, kernel = stride = 256/64 = 4,
    over the row-major token order), 'grid' averages square windows of the token grid (16x16 -> 8x8).
    """

    num_image_tokens: int = 4  # slots per image block; = input_resampler / output_resampler num_queries (SEED-X: 64)
    lm_weight: float = 1.0  # SEED-X lm_loss_scale
    reg_weight: float = 6.0  # SEED-X rec_loss_scale
    reg_loss: str = "mse"  # mse (SEED-X agent) | mse_position (each slot / its targets' batch variance) | cosine
    reg_target_pool: str = "sequence"  # sequence (SEED-X) | grid
    add_patch_pos: bool = True  # SEED-X agent `patch_pos_embed` [4, llm width], added to input image tokens


@dataclasses.dataclass
class ModelConfig:
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


@dataclasses.dataclass
class MeshConfig:
    """Device mesh with axes (data, fsdp, tensor). A size of -1 takes the remaining devices.

    `axis_rules` maps logical axis names (on parameters and activations) to mesh axes, MaxText style:
    a list of [logical_name, mesh_axis | [mesh_axes...] | null]. The first rule whose mesh axes are not
    yet used by the same array wins.
    """

    data: int = 1
    fsdp: int = -1
    tensor: int = 1
    axis_rules: list = dataclasses.field(
        default_factory=lambda: [
            ["batch", ["data", "fsdp"]],
            ["activation_length", None],
            ["activation_embed", None],
            ["embed", "fsdp"],
            ["vocab", "tensor"],
            ["mlp", "tensor"],
            ["heads", "tensor"],
            ["kv_heads", "tensor"],
            # fallbacks: a weight whose other dimension takes no mesh axis (LoRA factors, or an `embed` width
            # that does not divide by fsdp) is split along this one instead of being replicated
            ["mlp", "fsdp"],
            ["heads", "fsdp"],
            ["kv_heads", "fsdp"],
            ["head_dim", None],
            ["layers", None],
            ["norm", None],
            ["conv_in", "fsdp"],
            ["conv_out", "tensor"],
        ]
    )


@dataclasses.dataclass
class OptimizerConfig:
    learning_rate: float = 3e-4
    warmup_steps: int = 10
    decay_steps: int = 0  # 0: cosine over the whole run
    end_learning_rate_ratio: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.0
    grad_clip_norm: float = 1.0


@dataclasses.dataclass
class DataConfig:
    """Where a stage's examples come from.

    source 'random_tokens': the LM smoke data. 'synthetic': `num_records` conversations drawn in memory by
    `cig_jax.data.synthetic` (kinds `kinds`, rendered at `render_size`). 'tfds': the array_record dataset
    under `dir` (written by `python -m cig_jax.data.tfds_builder` or the demo), split `split`, optionally
    only the records whose kind is in `kinds`. `markov_view`: train on each conversation's last round with
    only the previous image (the Markov baseline). Images are resized to the ViT's input size.
    """

    source: str = "random_tokens"  # random_tokens (smoke), synthetic, tfds
    seq_len: int = 64
    global_batch_size: int = 8
    seed: int = 0
    dir: str = ""  # tfds: the data_dir given to the builder
    split: str = "train"
    kinds: list[str] = dataclasses.field(default_factory=list)  # [] = every kind
    num_records: int = 1000  # synthetic
    render_size: int = 64  # synthetic
    max_images: int = 4  # images per example (longer records are skipped and counted)
    markov_view: bool = False
    tokenizer: str = ""  # a Hugging Face tokenizer directory; "" = the tiny tokenizer built locally


@dataclasses.dataclass
class TrainConfig:
    """The loop. `stage` picks what trains on what (see `cig_jax/train/stages.py`)."""

    stage: str = "lm"
    steps: int = 20
    log_every: int = 5
    workdir: str = "workdir/default"
    seed: int = 0
    grad_accum_steps: int = 1  # microbatches per update (the global batch is split into this many)
    checkpoint_every: int = 0  # 0: only at the end; -1: never (benchmarks)
    keep_checkpoints: int = 3
    async_checkpoints: bool = True
    resume: bool = True  # continue from the latest checkpoint in workdir when there is one
    tensorboard: bool = True
    progress_bar: bool = False
    peak_tflops: float = 0.0  # per-device peak for MFU; 0: look the device up, else report none
    # Staged training (see cig_jax/train/stages.py).
    init_from: str = ""  # workdir of the previous stage: its latest checkpoint initialises the whole model
    trainable: list[str] = dataclasses.field(default_factory=list)  # parts that train; [] = the stage's default
    detokenizer_loss_weight: float = 0.0  # MLLM stages: + this x the DiT's loss on predicted embeddings (trains
    # the MLLM through the frozen DiT, or with trainable: [dit] adapts the DiT to the MLLM's embeddings)


@dataclasses.dataclass
class SampleConfig:
    max_new_tokens: int = 64
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    seed: int = 0


@dataclasses.dataclass(frozen=True)
class DiffusionConfig:
    """How the detokenizer is trained and sampled (`cig_jax/cig_jax/diffusion.py`).

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

    objective: str = "flow"  # flow | ddpm
    sampler: str = "euler"  # flow: euler | heun; ddpm: ddim
    # flow: what the network outputs, 'velocity' (noise - x0) or 'sample' (x0, turned into a velocity with
    # t >= min_time; for pixel-space models whose patches hold more values than a token is wide)
    prediction: str = "velocity"
    min_time: float = 0.05
    num_steps: int = 25
    # flow matching
    time_sampling: str = "logit_normal"  # logit_normal | uniform
    logit_mean: float = 0.0
    logit_std: float = 1.0
    timestep_scale: float = 1000.0
    shift: float = 1.0
    # ddpm
    num_train_timesteps: int = 1000
    beta_schedule: str = "linear"  # linear | scaled_linear
    beta_start: float = 0.0001
    beta_end: float = 0.02
    timestep_spacing: str = "leading"  # leading | trailing | linspace
    steps_offset: int = 0
    set_alpha_to_one: bool = True
    # guidance
    visual_guidance_scale: float = 1.0
    identity_guidance_scale: float = 1.0
    negative_visual: str = "zeros"  # zeros | provided
    p_drop_visual: float = 0.0
    p_drop_identity: float = 0.0


@dataclasses.dataclass
class Config:
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    optimizer: OptimizerConfig = dataclasses.field(default_factory=OptimizerConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    sample: SampleConfig = dataclasses.field(default_factory=SampleConfig)
    diffusion: DiffusionConfig = dataclasses.field(default_factory=DiffusionConfig)


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
        if args and args[0] is not Ellipsis:
            value = [_coerce(v, args[0], f"{key}[{i}]", source) for i, v in enumerate(value)]
        return list(value) if origin is list else tuple(value)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: '{key}' must be a mapping, got {value!r}")
        return dict(value)
    return value


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


def load_config(path: str | Path | None = None, overrides: list[str] = (), cls=Config):
    """The one config loader: YAML (with bases) + dotted overrides -> validated dataclass tree."""
    tree = load_yaml_tree(path) if path else {}
    source = str(path) if path else "<defaults>"
    for ov in overrides:
        tree = apply_override(tree, ov)
        source = f"{source} + overrides"
    cfg = from_dict(cls, tree, source=source)
    validate(cfg, source)
    return cfg


def validate(cfg: Config, source: str = "<config>") -> None:
    llm = cfg.model.llm
    if llm.num_heads % llm.num_kv_heads:
        raise ConfigError(
            f"{source}: 'model.llm.num_heads' ({llm.num_heads}) must be a multiple of 'model.llm.num_kv_heads' ({llm.num_kv_heads})"
        )
    if llm.head_dim is None and llm.hidden_size % llm.num_heads:
        raise ConfigError(f"{source}: 'model.llm.hidden_size' must be divisible by 'model.llm.num_heads' or set head_dim")
    if llm.remat_policy not in REMAT_POLICIES:
        raise ConfigError(f"{source}: 'model.llm.remat_policy' must be one of {sorted(REMAT_POLICIES)}, got {llm.remat_policy!r}")
    for name in ("dtype", "param_dtype", "logits_dtype"):
        if getattr(llm, name) not in ("float32", "bfloat16", "float16"):
            raise ConfigError(f"{source}: 'model.llm.{name}' must be float32, bfloat16 or float16")
    validate_vae(cfg.model.vae, source)
    validate_dit(cfg.model.dit, source)
    validate_diffusion(cfg.diffusion, source)
    for axis in ("data", "fsdp", "tensor"):
        size = getattr(cfg.mesh, axis)
        if size == 0 or size < -1:
            raise ConfigError(f"{source}: 'mesh.{axis}' must be a positive size or -1, got {size}")


REMAT_POLICIES = {"none", "full", "nothing_saveable", "dots_saveable", "dots_with_no_batch_dims_saveable"}


def validate_vae(vae: "VAEConfig", source: str = "<config>", key: str = "model.vae") -> None:
    for c in vae.block_out_channels:
        if c % vae.norm_num_groups:
            raise ConfigError(f"{source}: '{key}.block_out_channels' ({c}) must be multiples of '{key}.norm_num_groups' ({vae.norm_num_groups})")


def validate_diffusion(d: "DiffusionConfig", source: str = "<config>", key: str = "diffusion") -> None:
    samplers = {"flow": ("euler", "heun"), "ddpm": ("ddim",)}
    if d.objective not in samplers:
        raise ConfigError(f"{source}: '{key}.objective' must be flow or ddpm, got {d.objective!r}")
    if d.sampler not in samplers[d.objective]:
        raise ConfigError(f"{source}: '{key}.sampler' must be one of {samplers[d.objective]} for objective {d.objective!r}, got {d.sampler!r}")
    if d.num_steps < 1 or (d.objective == "ddpm" and d.num_steps > d.num_train_timesteps):
        raise ConfigError(f"{source}: '{key}.num_steps' must be in [1, num_train_timesteps], got {d.num_steps}")
    if d.time_sampling not in ("logit_normal", "uniform"):
        raise ConfigError(f"{source}: '{key}.time_sampling' must be logit_normal or uniform, got {d.time_sampling!r}")
    if d.beta_schedule not in ("linear", "scaled_linear"):
        raise ConfigError(f"{source}: '{key}.beta_schedule' must be linear or scaled_linear, got {d.beta_schedule!r}")
    if d.timestep_spacing not in ("leading", "trailing", "linspace"):
        raise ConfigError(f"{source}: '{key}.timestep_spacing' must be leading, trailing or linspace, got {d.timestep_spacing!r}")
    if d.negative_visual not in ("zeros", "provided"):
        raise ConfigError(f"{source}: '{key}.negative_visual' must be zeros or provided, got {d.negative_visual!r}")
    if d.prediction not in ("velocity", "sample"):
        raise ConfigError(f"{source}: '{key}.prediction' must be velocity or sample, got {d.prediction!r}")
    if not 0 < d.min_time < 1:
        raise ConfigError(f"{source}: '{key}.min_time' must be in (0, 1), got {d.min_time}")
    if d.shift <= 0:
        raise ConfigError(f"{source}: '{key}.shift' must be positive, got {d.shift}")


def validate_dit(dit: "DiTConfig", source: str = "<config>", key: str = "model.dit") -> None:
    if dit.identity_injection not in ("none", "concat", "parallel"):
        raise ConfigError(f"{source}: '{key}.identity_injection' must be none, concat or parallel, got {dit.identity_injection!r}")
    if dit.identity_injection == "parallel" and (dit.identity_every < 1 or dit.num_layers % dit.identity_every):
        raise ConfigError(f"{source}: '{key}.identity_every' ({dit.identity_every}) must divide '{key}.num_layers' ({dit.num_layers})")
    if dit.use_additional_conditions and dit.inner_dim() % 3:
        raise ConfigError(f"{source}: '{key}' micro-conditions need num_heads * head_dim divisible by 3")
    if dit.visual_grid_injection and dit.caption_channels is None:
        raise ConfigError(f"{source}: '{key}.visual_grid_injection' needs '{key}.caption_channels' (the projected condition)")
    if dit.remat_policy not in REMAT_POLICIES:
        raise ConfigError(f"{source}: '{key}.remat_policy' must be one of {sorted(REMAT_POLICIES)}, got {dit.remat_policy!r}")
    if dit.identity.width % dit.identity.num_heads:
        raise ConfigError(f"{source}: '{key}.identity.width' must be divisible by '{key}.identity.num_heads'")


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
