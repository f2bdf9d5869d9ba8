"""Starting a stage from released weights (`init_weights`): tiny random transformers / diffusers models saved
with their own `save_pretrained` (a LLaMA with PEFT LoRA adapters, a CLIP vision tower, a diffusers pipeline folder holding an
AutoencoderKL and a PixArt transformer, a SentencePiece-only LLaMA-2-style tokenizer) load into a stage-2 run
that reproduces each reference at step 0 (fp32, 1e-4) and then trains; SEED-X agent + Qwen-VL ViT files
written from independent torch modules (transformers' LLaMA, tests/qwen_vl_reference.py) load into a model
that reproduces each of them; a missing or mis-shaped checkpoint is one clear error, before any
model is built."""
import dataclasses
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from cig_jax import sharding
from cig_jax.config import MeshConfig
from cig_jax.config_base import ConfigError
from cig_jax.config_io import load_config
from cig_jax.convert import diffusers as dc
from cig_jax.convert import hf_llm, hf_vit
from cig_jax.convert.checkpoint_io import CheckpointError
from cig_jax.sample.session import default_mesh
from cig_jax.train.state import setup_state

ROOT = Path(__file__).resolve().parents[1]
STAGE2 = ROOT / "configs" / "stage2_personalize.yaml"
torch.set_num_threads(1)


def _jitter(model, scale=0.05):
    """Move every parameter (zero biases, unit norms included) off its init so no mapping passes by accident."""
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn_like(p))
    return model.eval()


def _dotted(prefix, obj, skip=()):
    """Dotted overrides setting every field of config dataclass `obj` (values in YAML flow syntax)."""
    out = []
    for f in dataclasses.fields(obj):
        if f.name in skip:
            continue
        v = getattr(obj, f.name)
        v = dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v
        out.append(f"{prefix}.{f.name}={json.dumps(v)}")
    return out


def sentencepiece_tokenizer(path: Path, vocab: int = 300) -> Path:
    """A LLaMA-2-style tokenizer folder with only tokenizer.model (SentencePiece BPE) + tokenizer_config.json."""
    import sentencepiece as spm

    from cig_jax.data.tiny_tokenizer import tiny_corpus

    path.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(tiny_corpus()), model_writer=buf, vocab_size=vocab,
                                   model_type="bpe", unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2)
    (path / "tokenizer.model").write_bytes(buf.getvalue())
    (path / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}))
    return path


def released_weights(root: Path) -> dict:
    """Tiny stand-ins of every released part, each written by its library's save_pretrained."""
    import diffusers
    import transformers

    tok = sentencepiece_tokenizer(root / "llama2_tokenizer")
    llama = _jitter(transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=300, hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=2048, rms_norm_eps=1e-6, rope_theta=10000.0)))
    llama.save_pretrained(root / "llama", safe_serialization=True)
    import peft

    lora = peft.get_peft_model(llama, peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=[
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    with torch.no_grad():  # PEFT starts lora_B at zero: give the adapters something to say
        for name, p in lora.named_parameters():
            if "lora_" in name:
                p.copy_(0.1 * torch.randn_like(p))
    lora.eval().save_pretrained(root / "lora")
    clip = _jitter(transformers.CLIPVisionModel(transformers.CLIPVisionConfig(
        image_size=32, patch_size=8, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4)))
    clip.save_pretrained(root / "clip")
    vae = _jitter(diffusers.AutoencoderKL(block_out_channels=[32, 32], layers_per_block=1, norm_num_groups=8,
                                          down_block_types=["DownEncoderBlock2D"] * 2, latent_channels=4,
                                          up_block_types=["UpDecoderBlock2D"] * 2, sample_size=32))
    pixart = _jitter(diffusers.PixArtTransformer2DModel(
        num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4, num_layers=2,
        cross_attention_dim=32, caption_channels=64, sample_size=16, patch_size=2))
    pipe = root / "pixart_pipeline"  # a whole pipeline folder: model_index.json + one subfolder per model
    vae.save_pretrained(pipe / "vae")
    pixart.save_pretrained(pipe / "transformer")
    (pipe / "model_index.json").write_text(json.dumps({"_class_name": "PixArtAlphaPipeline",
                                                       "vae": ["diffusers", "AutoencoderKL"],
                                                       "transformer": ["diffusers", "PixArtTransformer2DModel"]}))
    return dict(root=root, tokenizer=tok, llama=lora, clip=clip, vae=vae, pixart=pixart, pipeline=pipe)


def stage2_overrides(w: dict, workdir: Path) -> list[str]:
    """A stage-2 run whose model is the released parts' shapes (read from their config.json files)."""
    llm = hf_llm.config_from_hf(json.loads((w["root"] / "llama" / "config.json").read_text()))
    _, vit = hf_vit.vit_config_from_hf(json.loads((w["root"] / "clip" / "config.json").read_text()))
    vae = dc.vae_config_from_diffusers(json.loads((w["pipeline"] / "vae" / "config.json").read_text()))
    dit = dc.dit_config_from_diffusers(json.loads((w["pipeline"] / "transformer" / "config.json").read_text()))
    d = vit.hidden_size
    return (_dotted("model.llm", llm, skip=("vocab_size",)) + _dotted("model.vit", vit) + _dotted("model.vae", vae)
            + _dotted("model.dit", dit, skip=("identity", "identity_injection", "visual_grid_injection"))
            + ["model.llm.vocab_size=640",  # the tokenizer's 300 + 330 MLLM tokens, rounded up: the matrix grows
               "model.llm.lora_rank=4", "model.llm.lora_alpha=8.0", "model.llm.lora_dropout=0.0",
               "model.use_vae=true", "model.dit.identity_injection=concat", "model.dit.visual_grid_injection=false",
               "model.dit.identity={embedding_dim: 128, num_tokens: 4, num_embedding_tokens: 2, width: 32, "
               "depth: 1, num_heads: 2}",
               f"model.input_resampler={{num_queries: 4, embed_dim: {llm.hidden_size}, num_heads: 4, kv_dim: {d}}}",
               # CLIP hands over its 16 patch tokens (not the class token): 4 image tokens per block
               f"model.output_resampler={{num_queries: 4, embed_dim: {d}, num_heads: 4, kv_dim: {llm.hidden_size}}}",
               "model.mllm.num_image_tokens=4", "model.mllm.reg_target_pool=sequence", "diffusion.prediction=velocity",
               f"init_weights.llm={w['root'] / 'llama'}", f"init_weights.llm_adapters={w['root'] / 'lora'}",
               f"init_weights.vit={w['root'] / 'clip'}",
               f"init_weights.vae={w['pipeline']}", f"init_weights.dit={w['pipeline']}",
               f"init_weights.tokenizer={w['tokenizer']}",
               "data.source=synthetic", "data.num_records=40", "data.seq_len=96", "data.max_images=2",
               "data.global_batch_size=2", "train.init_from=", "train.steps=3", "train.log_every=1",
               "train.tensorboard=false", "train.async_checkpoints=false", "optimizer.warmup_steps=1",
               f"train.workdir={workdir}"])


def test_stage2_starts_from_released_weights_and_trains(tmp_path):
    w = released_weights(tmp_path / "released")
    overrides = stage2_overrides(w, tmp_path / "run")
    cfg = load_config(STAGE2, overrides)
    from cig_jax.train.stages import stage_tokenizer

    assert len(stage_tokenizer(cfg)) == 300 + 330  # SentencePiece-only folder + the SEED-X image / box tokens
    setup = setup_state(cfg, default_mesh(), say=lambda *a, **k: None)
    assert setup.source == "init_weights llm, llm_adapters, vit, vae, dit"
    model = nnx.merge(setup.graphdef, setup.state.model_state())
    rng = np.random.default_rng(0)

    # LLM logits, LoRA adapters included (the rows past the checkpoint's 300 are the grown vocabulary)
    tokens = rng.integers(3, 300, (2, 12))
    with torch.no_grad():
        ref = w["llama"](input_ids=torch.tensor(tokens)).logits.numpy()
    ours = np.asarray(model.mllm.llm(jnp.asarray(tokens)).logits)
    assert ours.shape[-1] == 640
    np.testing.assert_allclose(ours[..., :300], ref, atol=1e-4, rtol=1e-4)
    # ViT features
    px = rng.standard_normal((2, 3, 32, 32)).astype(np.float32)
    with torch.no_grad():
        ref = w["clip"](pixel_values=torch.from_numpy(px)).last_hidden_state.numpy()
    ours = np.asarray(model.mllm.vit(jnp.asarray(px.transpose(0, 2, 3, 1))).last_hidden_state)
    np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=1e-4)
    # VAE reconstruction
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        ref = w["vae"](images, sample_posterior=False).sample.numpy()
    vae = model.detokenizer.vae
    mean, _ = vae.encode(jnp.asarray(images.numpy().transpose(0, 2, 3, 1)))
    np.testing.assert_allclose(np.asarray(vae.decode(mean)).transpose(0, 3, 1, 2), ref, atol=1e-4, rtol=1e-4)
    # DiT output (the identity branch is new: without identity embeddings the DiT is PixArt)
    latents, cond = torch.randn(2, 4, 16, 16), torch.randn(2, 5, 64)
    t, mask = torch.tensor([10.0, 900.0]), torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    with torch.no_grad():
        ref = w["pixart"](latents, encoder_hidden_states=cond, timestep=t, encoder_attention_mask=mask,
                          added_cond_kwargs={"resolution": None, "aspect_ratio": None}).sample.numpy()
    ours = model.detokenizer.dit(jnp.asarray(latents.numpy().transpose(0, 2, 3, 1)), jnp.asarray(t.numpy()),
                                 jnp.asarray(cond.numpy()), jnp.asarray(mask.numpy()))
    np.testing.assert_allclose(np.asarray(ours).transpose(0, 3, 1, 2), ref, atol=1e-4, rtol=1e-4)
    vit_loaded = {p: np.asarray(v.value) for p, v in nnx.to_flat_state(nnx.state(model.mllm.vit, nnx.Param))}
    del model, setup

    # ... and the stage trains 3 steps from there (train.py on one device: a quicker compile)
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1",
               PYTHONPATH=str(ROOT))
    cmd = [sys.executable, str(ROOT / "train.py"), "--config", str(STAGE2)] + [a for o in overrides
                                                                                for a in ("--set", o)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    assert "[init] init_weights llm, llm_adapters, vit, vae, dit" in out.stdout
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3] and all(np.isfinite(r["loss"]) for r in rows)
    from cig_jax.train.checkpoint import load_trained

    mesh = sharding.make_mesh(MeshConfig(data=1, fsdp=1, tensor=1), jax.devices()[:1])
    trained = load_trained(cfg, mesh=mesh)
    vit_after = {p: np.asarray(v.value) for p, v in nnx.to_flat_state(nnx.state(trained.mllm.vit, nnx.Param))}
    assert vit_after.keys() == vit_loaded.keys()  # stage 2 freezes the ViT: still CLIP's weights, bitwise
    assert all(np.array_equal(vit_after[p], vit_loaded[p]) for p in vit_after)


# ----------------------------------------------------------------------------------------------------------
# A full-size config: its released weights named, checked before anything is built; SEED-X files
# ----------------------------------------------------------------------------------------------------------
STAGE1_13B = ROOT / "configs" / "stage1_detokenizer_13b.yaml"
# the SEED-X layout at toy size: ViT width != pool width != LLM width (every kv projection exists)
TINY_13B = ["model.llm={vocab_size: 640, hidden_size: 32, intermediate_size: 48, num_layers: 2, num_heads: 4, "
            "num_kv_heads: 4, rms_norm_eps: 1.0e-5}",
            "model.vit={image_size: 28, patch_size: 7, hidden_size: 24, intermediate_size: 40, num_layers: 2, "
            "num_heads: 3, pos_grid_size: 4, hidden_act: gelu, layer_norm_eps: 1.0e-6, pool: resampler, attn_pool: "
            "{num_queries: 16, embed_dim: 16, num_heads: 2, kv_dim: 24, out_dim: 16, layer_norm_eps: 1.0e-6}}",
            "model.input_resampler={num_queries: 4, embed_dim: 32, num_heads: 4, kv_dim: 16}",
            "model.output_resampler={num_queries: 4, embed_dim: 16, num_heads: 2, kv_dim: 32}",
            "model.mllm.num_image_tokens=4", "model.mllm.reg_target_pool=sequence",
            "model.vae={block_out_channels: [32, 32], layers_per_block: 1, norm_num_groups: 8, latent_channels: 4}",
            "model.dit={num_layers: 2, num_heads: 2, head_dim: 16, in_channels: 4, out_channels: 4, patch_size: 2, "
            "sample_size: 8, caption_channels: 16, cross_attention_dim: 32, identity_injection: concat, "
            "identity: {embedding_dim: 512, num_tokens: 4, num_embedding_tokens: 2, width: 32, depth: 1, num_heads: 2}}",
            "mesh.data=1", "mesh.fsdp=-1"]


def test_full_size_config_without_its_weights_is_a_clear_error_before_any_model(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the config's relative paths: nothing there
    cfg = load_config(STAGE1_13B)
    built = []
    monkeypatch.setattr(sharding, "create_sharded", lambda *a, **k: built.append(1) or pytest.fail("built a model"))
    with pytest.raises(ConfigError) as err:
        setup_state(cfg, default_mesh())
    msg = str(err.value)
    for part, path in cfg.init_weights.named().items():  # every part named, with its path
        assert f"init_weights.{part}: {path}" in msg
    assert not built


def _seedx_files(root: Path, cfg) -> dict:
    """A SEED-X agent (`pytorch_model.bin`: a transformers LLaMA under `llm.`, two Qwen-VL resamplers and the
    patch positions) and a Qwen-VL ViT file (`transformer.visual.` names, as Qwen-VL-Chat stores it) for
    `cfg.model`, each the state dict of an independent random torch module (transformers' LLaMA; the Qwen-VL
    modules of tests/qwen_vl_reference.py). Returns those modules, the references the loaded model must match."""
    import transformers
    from qwen_vl_reference import QwenResampler, QwenVisual, jitter

    m = cfg.model
    llm = _jitter(transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=m.llm.vocab_size, hidden_size=m.llm.hidden_size, intermediate_size=m.llm.intermediate_size,
        num_hidden_layers=m.llm.num_layers, num_attention_heads=m.llm.num_heads,
        num_key_value_heads=m.llm.num_kv_heads, rms_norm_eps=m.llm.rms_norm_eps, rope_theta=m.llm.rope_theta,
        max_position_embeddings=m.llm.max_position_embeddings, tie_word_embeddings=False)))
    refs = {"llm": llm, "patch_pos_embed": 0.1 * torch.randn(4, m.llm.hidden_size)}
    agent = {"llm." + k: v for k, v in llm.state_dict().items()}
    for seed, name in enumerate(("input_resampler", "output_resampler"), start=1):
        rc = getattr(m, name)
        refs[name] = jitter(QwenResampler(rc.num_queries, rc.embed_dim, rc.num_heads, rc.kv_dim, rc.layer_norm_eps),
                            seed=seed)
        agent.update({f"{name}.{k}": v for k, v in refs[name].state_dict().items()})
    agent["patch_pos_embed"] = refs["patch_pos_embed"]
    v, pool = m.vit, m.vit.attn_pool
    refs["vit"] = jitter(QwenVisual(patch=v.patch_size, width=v.hidden_size, layers=v.num_layers, heads=v.num_heads,
                                    mlp_width=v.intermediate_size, pos_side=v.pos_grid_size,
                                    num_queries=pool.num_queries, out_dim=pool.out_dim, pool_heads=pool.num_heads,
                                    eps=v.layer_norm_eps), seed=3)
    for path, tensors in ((root / cfg.init_weights.seedx_agent, agent),
                          (root / cfg.init_weights.vit, {"transformer.visual." + k: t
                                                         for k, t in refs["vit"].state_dict().items()})):
        path.parent.mkdir(parents=True)
        torch.save({k: t.detach().clone().contiguous() for k, t in tensors.items()}, path)
    return refs


def test_full_size_config_starts_with_tiny_stand_ins_at_its_paths(tmp_path, monkeypatch):
    import diffusers

    monkeypatch.chdir(tmp_path)
    fp32 = [f"model.{part}.dtype=float32" for part in ("llm", "vit", "input_resampler", "output_resampler")]
    cfg = load_config(STAGE1_13B, TINY_13B + fp32)  # fp32 compute, to compare with the torch references at 1e-4
    refs = _seedx_files(tmp_path, cfg)
    sentencepiece_tokenizer(tmp_path / cfg.init_weights.tokenizer)
    _jitter(diffusers.AutoencoderKL(block_out_channels=[32, 32], layers_per_block=1, norm_num_groups=8,
                                    down_block_types=["DownEncoderBlock2D"] * 2, latent_channels=4,
                                    up_block_types=["UpDecoderBlock2D"] * 2)).save_pretrained(cfg.init_weights.vae)
    pipe = Path(cfg.init_weights.dit)
    _jitter(diffusers.PixArtTransformer2DModel(num_attention_heads=2, attention_head_dim=16, in_channels=4,
                                               out_channels=4, num_layers=2, cross_attention_dim=32,
                                               caption_channels=16, sample_size=8, patch_size=2)
            ).save_pretrained(pipe / "transformer")
    (pipe / "model_index.json").write_text(json.dumps({"transformer": ["diffusers", "PixArtTransformer2DModel"]}))

    setup = setup_state(cfg, default_mesh(), say=lambda *a, **k: None)
    assert setup.source == "init_weights seedx_agent, vit, vae, dit"
    mllm = nnx.merge(setup.graphdef, setup.state.model_state()).mllm
    # Each part against the torch module its file was written from (not against the converter under test).
    tol, rng = dict(atol=1e-4, rtol=1e-4), np.random.default_rng(0)
    tokens = rng.integers(0, cfg.model.llm.vocab_size, (2, 10))
    with torch.no_grad():
        ref = refs["llm"](input_ids=torch.tensor(tokens)).logits.numpy()
    np.testing.assert_allclose(np.asarray(mllm.llm(jnp.asarray(tokens)).logits), ref, **tol)
    px = rng.standard_normal((2, 3, 28, 28)).astype(np.float32)
    with torch.no_grad():
        ref = refs["vit"](torch.from_numpy(px))[1].numpy()  # the attention pool's 16 x 16 features
    np.testing.assert_allclose(np.asarray(mllm.vit(jnp.asarray(px.transpose(0, 2, 3, 1))).pooled), ref, **tol)
    for name, keys in (("input_resampler", 16), ("output_resampler", 4)):  # the ViT's 16 tokens; 4 LLM states
        x = rng.standard_normal((2, keys, getattr(cfg.model, name).kv_dim)).astype(np.float32)
        with torch.no_grad():
            ref = refs[name](torch.from_numpy(x)).numpy()
        np.testing.assert_allclose(np.asarray(getattr(mllm, name)(jnp.asarray(x))), ref, **tol, err_msg=name)
    np.testing.assert_array_equal(np.asarray(mllm.patch_pos_embed[...]), refs["patch_pos_embed"].numpy())


def test_a_checkpoint_that_does_not_fit_lists_every_problem_with_part_and_path(tmp_path):
    w = released_weights(tmp_path / "released")
    cfg = load_config(STAGE2, stage2_overrides(w, tmp_path / "run") + ["model.llm.num_layers=3",
                                                                        "model.llm.intermediate_size=100"])
    with pytest.raises(CheckpointError) as err:
        setup_state(cfg, default_mesh(), say=lambda *a, **k: None)
    msg = str(err.value)
    assert f"init_weights.llm {w['root'] / 'llama'}" in msg
    assert "num_layers: checkpoint 2 vs model.llm 3" in msg and "intermediate_size: checkpoint 176" in msg
    # shapes, past the config check: the tensors themselves are named
    from cig_jax.convert.init import place, _llm_plan

    cfg = load_config(STAGE2, stage2_overrides(w, tmp_path / "run"))
    plan = _llm_plan(str(w["root"] / "llama"), cfg)
    plan[("layers", "mlp", "up_proj", "kernel")] = ((2, 64, 99), None)
    del plan[("norm", "scale")]
    plan[("extra", "kernel")] = ((1,), None)
    from cig_jax.models.llm import LLM

    abstract = nnx.split(nnx.eval_shape(lambda: LLM(cfg.model.llm, rngs=nnx.Rngs(0))))[1]
    with pytest.raises(CheckpointError) as err:
        place(dict(nnx.to_flat_state(abstract)), plan, part="llm", source="init_weights.llm X",
              put=lambda p, a: None)
    msg = str(err.value)
    assert "init_weights.llm X: part 'llm'" in msg
    assert "norm.scale" in msg and "layers.mlp.up_proj.kernel: checkpoint (2, 64, 99) vs model (2, 64, 176)" in msg
    assert "extra.kernel" in msg
