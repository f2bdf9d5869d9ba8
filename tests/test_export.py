"""Export round trip: a run converted once from released weights (`python -m cig_jax.train.stage0`, a stage-0
checkpoint) is exported (`python -m cig_jax.train.export`); transformers / peft / diffusers reload every
folder and reproduce our outputs (fp32, 1e-4); importing the export again gives bitwise-equal parameters;
the exported Jinja chat template renders text-only conversations as data/chat_template.py lays them out."""
import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from cig_jax.config_io import load_config
from cig_jax.train import export as export_lib
from cig_jax.train import stage0 as stage0_lib
from cig_jax.models.llm import merge_lora
from cig_jax.sample.session import default_mesh
from cig_jax.train.checkpoint import load_trained
from cig_jax.train.state import setup_state
from test_pretrained import STAGE2, released_weights, stage2_overrides

pytestmark = pytest.mark.long  # minutes each: `python -m pytest -m long` (.ci/run), not the default suite

torch.set_num_threads(1)


def _flat(module):
    return {p: np.asarray(v.value) for p, v in nnx.to_flat_state(nnx.state(module, nnx.Param))}


def _same(a: dict, b: dict) -> list:
    assert a.keys() == b.keys()
    return [p for p in a if not np.array_equal(a[p], b[p])]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    w = released_weights(root / "released")
    overrides = stage2_overrides(w, root / "unused")
    stage0 = root / "stage0"
    stage0_lib.main(["--config", str(STAGE2), "--out", str(stage0)] + [a for o in overrides for a in ("--set", o)])
    written = export_lib.main(["--checkpoint", str(stage0), "--out", str(root / "out")])
    cfg = load_config(STAGE2, overrides + [f"train.workdir={stage0}"])
    return dict(root=root, out=root / "out", written=written, cfg=cfg, model=load_trained(cfg, mesh=default_mesh()),
                overrides=overrides, w=w)


def test_exported_folders_reload_in_their_libraries_and_reproduce_our_outputs(exported):
    import diffusers
    import peft
    import transformers

    out, model = exported["out"], exported["model"]
    assert exported["written"] == ["llm", "llm_base", "llm_adapters", "vit", "seedx_agent", "vae", "dit"]
    rng = np.random.default_rng(1)
    tokens = rng.integers(3, 640, (2, 10))
    ours = np.asarray(model.mllm.llm(jnp.asarray(tokens)).logits)
    with torch.no_grad():
        merged = transformers.LlamaForCausalLM.from_pretrained(out / "llm").eval()
        np.testing.assert_allclose(merged(input_ids=torch.tensor(tokens)).logits.numpy(), ours, atol=1e-4, rtol=1e-4)
        base = transformers.LlamaForCausalLM.from_pretrained(out / "llm_base").eval()
        adapted = peft.PeftModel.from_pretrained(base, out / "llm_adapters").eval()
        np.testing.assert_allclose(adapted(input_ids=torch.tensor(tokens)).logits.numpy(), ours, atol=1e-4, rtol=1e-4)
    assert (out / "llm" / "generation_config.json").is_file() and "Training stages" in (out / "llm" / "README.md").read_text()

    px = rng.standard_normal((2, 3, 32, 32)).astype(np.float32)
    with torch.no_grad():
        ref = transformers.CLIPVisionModel.from_pretrained(out / "vit").eval()(pixel_values=torch.from_numpy(px))
    np.testing.assert_allclose(np.asarray(model.mllm.vit(jnp.asarray(px.transpose(0, 2, 3, 1))).last_hidden_state),
                               ref.last_hidden_state.numpy(), atol=1e-4, rtol=1e-4)

    images = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        ref = diffusers.AutoencoderKL.from_pretrained(out / "vae").eval()(images, sample_posterior=False).sample.numpy()
    vae = model.detokenizer.vae
    mean, _ = vae.encode(jnp.asarray(images.numpy().transpose(0, 2, 3, 1)))
    np.testing.assert_allclose(np.asarray(vae.decode(mean)).transpose(0, 3, 1, 2), ref, atol=1e-4, rtol=1e-4)

    latents, cond = torch.randn(2, 4, 16, 16), torch.randn(2, 5, 64)
    t, mask = torch.tensor([10.0, 900.0]), torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    with torch.no_grad():
        ref = diffusers.PixArtTransformer2DModel.from_pretrained(out / "dit").eval()(
            latents, encoder_hidden_states=cond, timestep=t, encoder_attention_mask=mask,
            added_cond_kwargs={"resolution": None, "aspect_ratio": None}).sample.numpy()
    got = model.detokenizer.dit(jnp.asarray(latents.numpy().transpose(0, 2, 3, 1)), jnp.asarray(t.numpy()),
                                jnp.asarray(cond.numpy()), jnp.asarray(mask.numpy()))
    np.testing.assert_allclose(np.asarray(got).transpose(0, 3, 1, 2), ref, atol=1e-4, rtol=1e-4)


def test_reimporting_the_export_gives_bitwise_equal_parameters(exported):
    out, model, cfg = exported["out"], exported["model"], exported["cfg"]
    again = dataclasses.replace(cfg, init_weights=dataclasses.replace(
        cfg.init_weights, llm=str(out / "llm_base"), llm_adapters=str(out / "llm_adapters"), vit=str(out / "vit"),
        vae=str(out / "vae"), dit=str(out / "dit"), tokenizer=str(out / "llm")))
    setup = setup_state(again, default_mesh(), say=lambda *a, **k: None)
    re = nnx.merge(setup.graphdef, setup.state.model_state())
    for part in (lambda m: m.mllm.llm, lambda m: m.mllm.vit, lambda m: m.detokenizer.vae, lambda m: m.detokenizer.dit):
        assert _same(_flat(part(re)), _flat(part(model))) == []
    assert _flat(re.detokenizer.dit.id_encoder)  # the identity branch came back from cig_extra.safetensors

    # the SEED-X agent file: resamplers and patch positions as trained, the LLM with its LoRA merged
    agent = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, llm=dataclasses.replace(
        cfg.model.llm, lora_rank=0)), init_weights=dataclasses.replace(
        cfg.init_weights, llm="", llm_adapters="", seedx_agent=str(out / "seedx_agent" / "agent.safetensors")))
    setup = setup_state(agent, default_mesh(), say=lambda *a, **k: None)
    re = nnx.merge(setup.graphdef, setup.state.model_state())
    for part in (lambda m: m.mllm.input_resampler, lambda m: m.mllm.output_resampler):
        assert _same(_flat(part(re)), _flat(part(model))) == []
    assert _same(_flat(re.mllm.llm), _flat(merge_lora(model.mllm.llm))) == []


def _hf_chat_ids(tokenizer, messages) -> list:
    out = tokenizer.apply_chat_template(messages, tokenize=True)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def test_jinja_chat_template_renders_text_only_conversations_as_chat_template_py(exported):
    """What a Hugging Face user of the exported folder gets from `apply_chat_template(..., tokenize=True)` is,
    token for token, what training and sampling feed the model (`ChatTemplate.encode` with the run's tokenizer):
    for the run's SentencePiece LLaMA-2-style tokenizer and for the tiny byte-level BPE, saved and reloaded."""
    import transformers

    from cig_jax.data.chat_template import ChatTemplate, load_tokenizer
    from cig_jax.data.tiny_tokenizer import build_tiny_tokenizer
    from cig_jax.data.schema import IMAGE_PLACEHOLDER, Conversation, Round
    from cig_jax.data.synthetic import generate

    exported_tok = transformers.AutoTokenizer.from_pretrained(str(exported["out"] / "llm"))
    run_template = ChatTemplate(load_tokenizer(exported["w"]["tokenizer"]), num_image_tokens=4)  # what training used
    # a byte-level tokenizer decodes ids back to exactly the text they came from: the reference layout
    tiny = build_tiny_tokenizer(exported["root"] / "tiny_tokenizer")
    tiny.chat_template = exported_tok.chat_template
    template = ChatTemplate(tiny, num_image_tokens=4)
    tiny.save_pretrained(str(exported["root"] / "tiny_export"))
    tiny_exported = transformers.AutoTokenizer.from_pretrained(str(exported["root"] / "tiny_export"))
    checked, same = 0, {"tiny": 0, "sentencepiece": 0}
    for conv in generate(40, seed=5):
        rounds = [Round(user_text=r.user_text.replace(IMAGE_PLACEHOLDER, "").strip() or "Hello.",
                        assistant_text=r.assistant_text) for r in conv.rounds if r.assistant_text]
        if not rounds:
            continue
        conv = Conversation(id=conv.id, rounds=rounds)
        ids = template.encode(conv).input_ids.tolist()
        messages = [m for r in rounds for m in ({"role": "user", "content": r.user_text},
                                                 {"role": "assistant", "content": r.assistant_text})]
        rendered = tiny.apply_chat_template(messages, tokenize=False)
        assert rendered == tiny.decode(ids)
        assert exported_tok.apply_chat_template(messages, tokenize=False) == rendered  # same <s> / </s> strings
        same["tiny"] += _hf_chat_ids(tiny_exported, messages) == ids
        same["sentencepiece"] += _hf_chat_ids(exported_tok, messages) == run_template.encode(conv).input_ids.tolist()
        checked += 1
        if checked == 20:
            break
    assert checked == 20
    assert same == {"tiny": 20, "sentencepiece": 20}, f"token ids equal in {same} of 20 conversations"
