"""Our LLM against Hugging Face transformers, number for number (fp32), loaded through our converter."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from cig_jax.convert.hf_llm import load_hf_llm, save_hf_llm
from cig_jax.sample.decode import choose_next
from cig_jax.models.llm import KVCache

torch.manual_seed(0)
torch.set_num_threads(1)


def _llama(tmp_path):
    cfg = transformers.LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 32},
        bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
    return _save(transformers.LlamaForCausalLM(cfg), tmp_path / "llama")


def _qwen2(tmp_path):
    cfg = transformers.Qwen2Config(
        vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True, rope_theta=10000.0,
        bos_token_id=1, eos_token_id=2, pad_token_id=0, use_sliding_window=False,
    )
    return _save(transformers.Qwen2ForCausalLM(cfg), tmp_path / "qwen2")


def _save(model, path):
    model = model.float().eval()
    with torch.no_grad():  # random init leaves biases at zero; make them count
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(path, safe_serialization=True)
    return model, path


@pytest.fixture(params=["llama", "qwen2"])
def hf_model(request, tmp_path):
    return (_llama if request.param == "llama" else _qwen2)(tmp_path)


def _padded_batch():
    rng = np.random.default_rng(0)
    tokens = rng.integers(3, 128, size=(3, 12))
    mask = np.ones((3, 12), np.int64)
    mask[1, :4] = 0  # left padding
    mask[2, :7] = 0
    tokens[mask == 0] = 0
    positions = np.clip(np.cumsum(mask, axis=1) - 1, 0, None)
    return tokens, mask, positions


def _hf_logits(model, tokens, mask, positions):
    with torch.no_grad():
        return model(input_ids=torch.tensor(tokens), attention_mask=torch.tensor(mask),
                     position_ids=torch.tensor(positions)).logits.numpy()


def test_logits_match_on_padded_batch(hf_model):
    model, path = hf_model
    ours = load_hf_llm(path)
    tokens, mask, positions = _padded_batch()
    ref = _hf_logits(model, tokens, mask, positions)
    got = np.asarray(ours(jnp.asarray(tokens), attention_mask=jnp.asarray(mask)).logits)
    valid = mask.astype(bool)
    np.testing.assert_allclose(got[valid], ref[valid], atol=1e-4, rtol=1e-4)


def test_unscanned_layers_give_same_logits(hf_model):
    model, path = hf_model
    tokens, mask, _ = _padded_batch()
    a = load_hf_llm(path)(jnp.asarray(tokens), attention_mask=jnp.asarray(mask)).logits
    b = load_hf_llm(path, scan_layers=False, remat_policy="none")(
        jnp.asarray(tokens), attention_mask=jnp.asarray(mask)).logits
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)


def test_greedy_decoding_with_cache_equals_generate(hf_model):
    model, path = hf_model
    ours = load_hf_llm(path)
    prompt = np.array([[5, 17, 33, 8, 99, 42, 7]])
    with torch.no_grad():
        ref = model.generate(torch.tensor(prompt), max_new_tokens=20, do_sample=False, min_new_tokens=20,
                             pad_token_id=0, eos_token_id=None)[0, prompt.shape[1]:].numpy()
    got = _greedy(ours, jnp.asarray(prompt), max_new_tokens=20, cache_len=64)
    np.testing.assert_array_equal(np.asarray(got)[0], ref)


def _greedy(model, prompt, *, max_new_tokens: int, cache_len: int):
    """Prompt [batch, len] -> [batch, max_new_tokens]: the prompt in one chunk into the KV cache, then one token at
    a time, each chosen by `decode.choose_next` (temperature 0) as sampling does."""
    out = model(prompt, cache=KVCache.init(model.cfg, prompt.shape[0], cache_len))
    toks = []
    for _ in range(max_new_tokens):
        tok = choose_next(out.logits[:, -1], jax.random.key(0))
        toks.append(tok)
        out = model(tok[:, None], cache=out.cache)
    return jnp.stack(toks, axis=1)


def test_chunked_prefill_equals_single_prefill(hf_model):
    _, path = hf_model
    ours = load_hf_llm(path)
    rng = np.random.default_rng(1)
    tokens = jnp.asarray(rng.integers(3, 128, size=(2, 15)))
    full = ours(tokens, cache=KVCache.init(ours.cfg, 2, 32))
    cache = KVCache.init(ours.cfg, 2, 32)
    chunks = []
    for lo, hi in [(0, 4), (4, 11), (11, 15)]:
        out = ours(tokens[:, lo:hi], cache=cache)
        cache = out.cache
        chunks.append(out.logits)
    np.testing.assert_allclose(np.concatenate(chunks, axis=1), np.asarray(full.logits), atol=1e-5)
    np.testing.assert_allclose(np.asarray(cache.k), np.asarray(full.cache.k), atol=1e-6)
    # one more token after the chunks decodes the same as after the single prefill
    nxt = jnp.argmax(full.logits[:, -1], axis=-1)[:, None]
    a = ours(nxt, cache=cache).logits
    b = ours(nxt, cache=full.cache).logits
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)


def test_export_then_hf_reload_reproduces_logits(hf_model, tmp_path):
    model, path = hf_model
    ours = load_hf_llm(path)
    out_dir = tmp_path / "exported"
    save_hf_llm(ours, out_dir, max_shard_bytes=60_000)  # forces several shards + index
    assert (out_dir / "model.safetensors.index.json").is_file()
    cls = type(model)
    reloaded = cls.from_pretrained(out_dir).float().eval()
    tokens, mask, positions = _padded_batch()
    valid = mask.astype(bool)
    np.testing.assert_allclose(_hf_logits(reloaded, tokens, mask, positions)[valid],
                               _hf_logits(model, tokens, mask, positions)[valid], atol=1e-5)
    # and our own loader reads the sharded export
    again = load_hf_llm(out_dir)
    np.testing.assert_allclose(np.asarray(again(jnp.asarray(tokens)).logits),
                               np.asarray(ours(jnp.asarray(tokens)).logits), atol=1e-6)


def test_mismatched_checkpoint_lists_offending_tensors(hf_model, tmp_path):
    _, path = hf_model
    cfg = json.loads((path / "config.json").read_text())
    cfg["num_hidden_layers"] = 3
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"model\.layers\.2\."):
        load_hf_llm(path)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_shifted_token_loss_and_its_gradient_match_torch_cross_entropy(dtype):
    """The loss with the hand-written VJP against torch's cross_entropy on the same shifted targets: value and
    d loss / d logits, with zero weights (padding, the prompt) and a last position that has no target."""
    from cig_jax.models.llm import next_token_loss, shifted_token_loss

    rng = np.random.default_rng(0)
    b, l, v = 3, 9, 50
    logits = (rng.standard_normal((b, l, v)) * 3).astype(np.float32)
    tokens = rng.integers(0, v, (b, l))
    weights = (rng.random((b, l)) > 0.3).astype(np.float32)
    x = jnp.asarray(logits).astype(dtype)
    fn = lambda lg: shifted_token_loss(lg, jnp.asarray(tokens), jnp.asarray(weights))[0]  # noqa: E731
    ours, grad = jax.value_and_grad(fn)(x)
    # the sliced form gives the same number (it is what callers passed before)
    sliced = next_token_loss(x[:, :-1], jnp.asarray(tokens)[:, 1:], jnp.asarray(weights)[:, 1:])[0]
    np.testing.assert_allclose(float(ours), float(sliced), rtol=1e-6)

    t = torch.tensor(np.asarray(x.astype(jnp.float32)), requires_grad=True)
    nll = torch.nn.functional.cross_entropy(t[:, :-1].reshape(-1, v), torch.tensor(tokens[:, 1:]).reshape(-1),
                                            reduction="none")
    w = torch.tensor(weights[:, 1:]).reshape(-1)
    ref = (nll * w).sum() / w.sum()
    ref.backward()
    np.testing.assert_allclose(float(ours), float(ref), rtol=1e-5)
    assert grad.dtype == x.dtype
    tol = 1e-6 if dtype == "float32" else 2e-3
    np.testing.assert_allclose(np.asarray(grad.astype(jnp.float32)), t.grad.numpy(), atol=tol)
    assert np.all(np.asarray(grad)[:, -1] == 0)  # the last position predicts nothing
