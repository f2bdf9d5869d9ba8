"""Model sections of the configuration: the frozen dataclasses of the LLM, ViT, resamplers, VAE, DiT (+ identity
encoder) and how the MLLM wires them, with their checks; and the `Literal` types of common choices.

Owns: what a model is made of and how its parts must fit (`ModelConfig.check`: ViT -> input resampler -> LLM
-> output resampler -> DiT widths). Does not own: run sections, the whole `Config`, checking a tree, reading
YAML (`cig_jax.config`, `cig_jax.config_io`); `Section`, the field kinds and `ConfigError` (`cig_jax.config_base`).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Literal, Optional

from cig_jax.config_base import Section, adapter_field, execution_field, need, objective_field
from cig_jax.faces import backends

DType = Literal["float32", "bfloat16", "float16"]
RematPolicy = Literal["none", "full", "nothing_saveable", "dots_saveable", "dots_with_no_batch_dims_saveable"]
AttentionImpl = Literal["xla", "einsum", "cudnn", "splash"]
Interpolation = Literal["bicubic", "bilinear"]
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
    lora_rank: int = adapter_field(0)
    lora_alpha: float = adapter_field(32.0)
    lora_dropout: float = adapter_field(0.0)
    lora_targets: tuple[Literal["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], ...] = \
        adapter_field(("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"))
    scan_layers: bool = execution_field(True)  # stack layers and run them under lax.scan (fast compiles at depth)
    remat_policy: RematPolicy = execution_field("nothing_saveable")
    attention_impl: Optional[AttentionImpl] = execution_field(None)  # None (XLA picks), 'xla', 'einsum', 'cudnn' (GPU flash) or 'splash' (TPU)
    dtype: DType = execution_field("float32")  # compute dtype
    param_dtype: DType = "float32"
    logits_dtype: DType = execution_field("float32")  # dtype the lm head's logits leave in (bfloat16 halves [b, t, vocab])

    def resolved_head_dim(self) -> int:
        return self.head_dim if self.head_dim is not None else self.hidden_size // self.num_heads

    def check(self, key: str) -> None:
        need(self.num_kv_heads > 0 and self.num_heads % self.num_kv_heads == 0,
              f"'{key}.num_heads' ({self.num_heads}) must be a multiple of '{key}.num_kv_heads' ({self.num_kv_heads})")
        need(self.head_dim is not None or self.hidden_size % self.num_heads == 0,
              f"'{key}.hidden_size' must be divisible by '{key}.num_heads' or set head_dim")
        need(self.lora_rank >= 0, f"'{key}.lora_rank' must be >= 0, got {self.lora_rank}")
        need(0.0 <= self.lora_dropout < 1.0, f"'{key}.lora_dropout' must be in [0, 1), got {self.lora_dropout}")


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
    attention_impl: Optional[AttentionImpl] = execution_field(None)
    dtype: DType = execution_field("float32")
    param_dtype: DType = "float32"

    def in_width(self) -> int:
        return self.kv_dim if self.kv_dim is not None else self.embed_dim

    def out_width(self) -> int:
        return self.out_dim if self.out_dim is not None else self.embed_dim

    def check(self, key: str) -> None:
        need(_is_square(self.num_queries), f"'{key}.num_queries' ({self.num_queries}) must be a perfect square")
        need(self.embed_dim % self.num_heads == 0,
              f"'{key}.embed_dim' ({self.embed_dim}) must be divisible by '{key}.num_heads' ({self.num_heads})")
        need(self.embed_dim % 4 == 0, f"'{key}.embed_dim' ({self.embed_dim}) must be divisible by 4 "
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
    pool: Literal["none", "cls", "map", "resampler"] = "resampler"  # map: SigLIP head; resampler: Qwen-VL
    # attn_pool runs with this ViT's dtype / param_dtype / attention_impl, whatever its own fields say.
    attn_pool: Optional[ResamplerConfig] = dataclasses.field(
        default_factory=lambda: ResamplerConfig(num_queries=16, embed_dim=64, num_heads=4, kv_dim=64, out_dim=64,
                                                layer_norm_eps=1e-6)
    )
    scan_layers: bool = execution_field(True)
    remat_policy: RematPolicy = execution_field("none")
    attention_impl: Optional[AttentionImpl] = execution_field(None)
    dtype: DType = execution_field("float32")
    param_dtype: DType = "float32"

    def check(self, key: str) -> None:
        need(self.hidden_size % self.num_heads == 0,
              f"'{key}.hidden_size' ({self.hidden_size}) must be divisible by '{key}.num_heads' ({self.num_heads})")
        need(self.image_size % self.patch_size == 0,
              f"'{key}.image_size' ({self.image_size}) must be a multiple of '{key}.patch_size' ({self.patch_size})")
        need(self.pool != "cls" or self.class_token, f"'{key}.pool: cls' needs '{key}.class_token: true'")
        need(self.post_norm != "pooled" or self.pool == "cls",
              f"'{key}.post_norm: pooled' applies to the class token: use it with '{key}.pool: cls'")
        if self.pool == "resampler":
            need(self.attn_pool is not None, f"'{key}.pool: resampler' needs a '{key}.attn_pool' section")
            need(self.attn_pool.in_width() == self.hidden_size,
                  f"'{key}.attn_pool.kv_dim' ({self.attn_pool.in_width()}) must equal '{key}.hidden_size' "
                  f"({self.hidden_size})")
            need(not self.class_token, f"'{key}.pool: resampler' needs '{key}.class_token: false' (its keys must "
                                        "form a square grid)")

    def features(self) -> tuple[int, int]:
        """(K, D): tokens per image and width of what this ViT hands the input resampler."""
        if self.pool == "resampler":
            return self.attn_pool.num_queries, self.attn_pool.out_width()
        side = self.image_size // self.patch_size
        return side * side, self.hidden_size  # patch tokens (a class token is not handed over)


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
    dtype: DType = execution_field("float32")
    param_dtype: DType = "float32"

    def check(self, key: str) -> None:
        need(len(self.block_out_channels) > 0, f"'{key}.block_out_channels' may not be empty")
        for c in self.block_out_channels:
            need(c % self.norm_num_groups == 0, f"'{key}.block_out_channels' ({c}) must be multiples of "
                                                 f"'{key}.norm_num_groups' ({self.norm_num_groups})")


@dataclasses.dataclass(frozen=True)
class IDEncoderConfig(Section):
    """Perceiver that turns one face embedding (512-d ArcFace or 128-d dlib), optionally with face-crop
    features, into `num_tokens` identity tokens for the DiT."""

    embedding_dim: int = 128  # the backend's width (faces/backends.py): 512 for insightface ArcFace, 128 for dlib
    # The face backend whose embeddings it takes (a name in faces.backends.BACKENDS, checked against embedding_dim
    # here rather than by a Literal: the registry is the one list); None: not recorded.
    backend: Optional[str] = None
    feature_dim: Optional[int] = None  # face-crop feature width (e.g. ViT patch features); None: unused
    num_tokens: int = 16  # K identity tokens out
    num_embedding_tokens: int = 4  # the face embedding is expanded into this many context tokens
    width: int = 256
    depth: int = 2
    num_heads: int = 4
    mlp_ratio: int = 4
    normalize_embedding: bool = True  # L2-normalise the face embedding first (ArcFace and dlib scales differ)
    max_identities: int = 2  # identities one image may carry, each bound to its person's region (data: [b, P, De])

    def check(self, key: str) -> None:
        need(self.width % self.num_heads == 0, f"'{key}.width' must be divisible by '{key}.num_heads'")
        need(self.max_identities >= 1, f"'{key}.max_identities' must be >= 1, got {self.max_identities}")
        if self.backend is not None:
            known = backends.BACKENDS.get(self.backend)
            need(known is not None, f"'{key}.backend' must be one of {', '.join(backends.BACKENDS)} (or null), "
                                    f"got {self.backend!r}")
            need(known.dim is None or known.dim == self.embedding_dim,
                 f"'{key}.backend' {self.backend} gives {known.dim}-d embeddings but '{key}.embedding_dim' is "
                 f"{self.embedding_dim}")


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
    # True: each person's identity embedding, through a small MLP (zero-initialised output), is also added to the
    # patch tokens of that person's region (the whole image for one identity [b, De]), scaled by id_scale: a
    # direct path beside the identity tokens' attention, which a small DiT trained briefly learns (the
    # attention alone is bypassed while the visual embeddings carry the face). Needs identity_injection.
    identity_grid_injection: bool = False
    identity_every: int = 1  # parallel: an identity cross-attention after every N blocks
    identity: IDEncoderConfig = dataclasses.field(default_factory=IDEncoderConfig)
    scan_layers: bool = execution_field(True)
    remat_policy: RematPolicy = execution_field("none")
    attention_impl: Optional[AttentionImpl] = execution_field(None)
    dtype: DType = execution_field("float32")
    param_dtype: DType = "float32"

    def inner_dim(self) -> int:
        return self.num_heads * self.head_dim

    def check(self, key: str) -> None:
        need(self.identity_injection != "parallel"
              or (self.identity_every >= 1 and self.num_layers % self.identity_every == 0),
              f"'{key}.identity_every' ({self.identity_every}) must divide '{key}.num_layers' ({self.num_layers})")
        need(not self.use_additional_conditions or self.inner_dim() % 3 == 0,
              f"'{key}' micro-conditions need num_heads * head_dim divisible by 3")
        need(not self.visual_grid_injection or self.caption_channels is not None,
              f"'{key}.visual_grid_injection' needs '{key}.caption_channels' (the projected condition)")
        need(not self.identity_grid_injection or self.identity_injection != "none",
             f"'{key}.identity_grid_injection' needs '{key}.identity_injection' ('concat' or 'parallel')")
        need(self.sample_size % self.patch_size == 0,
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
    lm_weight: float = objective_field(1.0)  # SEED-X lm_loss_scale
    reg_weight: float = objective_field(6.0)  # SEED-X rec_loss_scale
    reg_loss: Literal["mse", "mse_position", "cosine"] = objective_field("mse")
    reg_target_pool: Literal["sequence", "grid"] = "sequence"
    add_patch_pos: bool = True  # SEED-X agent `patch_pos_embed` [4, llm width], added to input image tokens
    # > 0: each input image token is RMS-normalised to this root-mean-square value before it enters the LLM, the
    # scale of the LLM's own token embeddings (SmolLM2-135M: 0.12). A released LLM's layers were trained on that
    # scale; the input resampler's raw output is ~15x larger, fills the residual stream at image positions, and
    # the query tokens cannot read the person from it. 0: as the resampler gives them (SEED-X).
    image_token_rms: float = 0.0
    # The LM head (vocab x width: a fifth of SmolLM2-135M's step) runs only at the positions carrying loss, at most
    # this fraction of a batch's positions (0: the head runs everywhere). A batch with more loss positions loses the
    # excess from its LM loss and says so (metric lm_tokens_dropped).
    lm_head_fraction: float = execution_field(0.0)
    # How a conversation becomes tokens (`cig_jax/data/chat_formats.py`): 'llama2' (SEED-X's [INST] turns) or
    # 'chatml' (SmolLM2-Instruct's <|im_start|> turns; the tokenizer needs <|im_start|> and <|im_end|>).
    chat_format: Literal["llama2", "chatml"] = "llama2"
    # The identity head (0: none): a linear readout of each image-query block's mean final hidden state to an
    # identity embedding of this width (= model.dit.identity.embedding_dim), trained (cosine) onto the identity of
    # the one person the target image shows; sampling hands it to the detokenizer's identity branch when the
    # round has no face reference of its own. It is how a person who was only ever *drawn* keeps their face.
    identity_dim: int = 0
    identity_weight: float = objective_field(1.0)
    # Person slots (`cig_jax/data/persons.py`): after each image, "Name<person>" per named person with a box, the
    # slot filled with the summary of the person's crop; before a drawn image's queries, "Name<person>" per person
    # it shows, where the identity head reads (instead of the query block's mean). A later mention of the name
    # then finds the person's look in one hop. Needs identity_dim > 0.
    person_slots: bool = adapter_field(False)  # a later stage may add them (and their retrieval head)
    person_key_dim: int = adapter_field(64)  # the retrieval head's query / key width
    # weight of the retrieval loss: a person query's attention onto the earlier slots showing its person
    retrieval_weight: float = objective_field(1.0)

    def check(self, key: str) -> None:
        need(self.identity_dim >= 0, f"'{key}.identity_dim' must be >= 0, got {self.identity_dim}")
        need(not self.person_slots or self.identity_dim > 0,
             f"'{key}.person_slots' needs '{key}.identity_dim' > 0 (the identity head reads the slots)")
        need(self.image_token_rms >= 0.0, f"'{key}.image_token_rms' must be >= 0, got {self.image_token_rms}")
        need(0 < self.num_image_tokens <= 100,
              f"'{key}.num_image_tokens' must be in 1..100, got {self.num_image_tokens}")
        need(0.0 <= self.lm_head_fraction <= 1.0,
             f"'{key}.lm_head_fraction' must be in [0, 1], got {self.lm_head_fraction}")


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
        need(ir.num_queries == m.num_image_tokens == orr.num_queries,
              f"'{key}.input_resampler.num_queries' ({ir.num_queries}), '{key}.output_resampler.num_queries' "
              f"({orr.num_queries}) and '{key}.mllm.num_image_tokens' ({m.num_image_tokens}) must be equal")
        need(ir.in_width() == d_vit,
              f"'{key}.input_resampler.kv_dim' ({ir.in_width()}) must equal the ViT feature width ({d_vit})")
        need(_is_square(k), f"'{key}.vit': its {k} tokens per image must form a square grid (the input "
                             "resampler's keys)")
        need(ir.out_width() == llm.hidden_size, f"'{key}.input_resampler' output width ({ir.out_width()}) must "
                                                 f"equal '{key}.llm.hidden_size' ({llm.hidden_size})")
        need(orr.in_width() == llm.hidden_size, f"'{key}.output_resampler.kv_dim' ({orr.in_width()}) must equal "
                                                 f"'{key}.llm.hidden_size' ({llm.hidden_size})")
        need(orr.out_width() == d_vit, f"'{key}.output_resampler' output width ({orr.out_width()}) must equal the "
                                        f"ViT feature width ({d_vit}): visual embeddings regress pooled ViT features")
        need(k % m.num_image_tokens == 0,
              f"ViT tokens per image ({k}) must be a multiple of '{key}.mllm.num_image_tokens'")
        if m.reg_target_pool == "grid":
            need(_is_square(k) and _is_square(m.num_image_tokens)
                  and math.isqrt(k) % math.isqrt(m.num_image_tokens) == 0,
                  f"'{key}.mllm.reg_target_pool: grid' needs square grids with {m.num_image_tokens} dividing {k} "
                  "evenly")
        need(m.identity_dim in (0, dit.identity.embedding_dim),
             f"'{key}.mllm.identity_dim' ({m.identity_dim}) must be 0 or '{key}.dit.identity.embedding_dim' "
             f"({dit.identity.embedding_dim}): the detokenizer reads what the identity head predicts")
        need(dit.caption_channels == d_vit, f"'{key}.dit.caption_channels' ({dit.caption_channels}) must equal the "
                                             f"ViT feature width ({d_vit}): the DiT reads the MLLM's visual embeddings")
        if self.use_vae:
            need(dit.in_channels == self.vae.latent_channels,
                 f"'{key}.dit.in_channels' ({dit.in_channels}) must equal '{key}.vae.latent_channels' "
                 f"({self.vae.latent_channels})")
        else:
            need(dit.in_channels == 3, f"'{key}.use_vae: false' (pixel space) needs '{key}.dit.in_channels: 3'")
            need(dit.sample_size == self.vit.image_size, f"pixel space: '{key}.dit.sample_size' ({dit.sample_size}) "
                                                          f"must equal '{key}.vit.image_size' ({self.vit.image_size})")
        if dit.visual_grid_injection:
            q, g = math.isqrt(m.num_image_tokens), dit.sample_size // dit.patch_size
            need(_is_square(m.num_image_tokens) and g % q == 0,
                  f"'{key}.dit.visual_grid_injection': {m.num_image_tokens} visual embeddings must form a square grid "
                  f"dividing the DiT's {g}x{g} patch grid")


def vit_feature_shape(cfg: ModelConfig) -> tuple[int, int]:
    """(K, D_vit): tokens per image and width of what the ViT hands the input resampler."""
    return cfg.vit.features()
