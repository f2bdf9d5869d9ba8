"""LoRA adapters on the LLM: start as a no-op, train alone, and merge into the base for export; against
independent references: a model built without LoRA (zero B) and PEFT's own merged model (trained B)."""
import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from cig_jax.config_model import LLMConfig
from cig_jax.convert.hf_llm import config_to_hf, hf_to_ours, llm_from_params
from cig_jax.convert.peft import peft_to_ours
from cig_jax.data.lm_smoke import permutation_walk
from cig_jax.models import layers
from cig_jax.models.llm import LLM, merge_lora, next_token_loss, selected_token_loss, shifted_token_loss

BASE = LLMConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2)
LORA = dataclasses.replace(BASE, lora_rank=16, lora_alpha=16.0, lora_dropout=0.05)
TOKENS = jnp.asarray(np.stack([permutation_walk(i, vocab=64, seq_len=32, seed=0)["tokens"] for i in range(4)]))


def _adapted(seed=0):
    model = LLM(LORA, rngs=nnx.Rngs(seed))
    base = LLM(BASE, rngs=nnx.Rngs(seed))
    return model, base


def test_adapters_start_as_the_base_model():
    model, _ = _adapted()
    adapters = [p for p, _ in nnx.to_flat_state(nnx.state(model, layers.LoRAParam))]
    assert len(adapters) == 2 * 7  # a and b on q, k, v, o, gate, up, down (stacked over layers)
    ref = merge_lora(model)(TOKENS).logits
    np.testing.assert_allclose(np.asarray(model(TOKENS).logits), np.asarray(ref), atol=1e-6)


def test_training_adapters_leaves_base_frozen_and_merge_reproduces_logits():
    model, _ = _adapted()
    # SEED-X's recipe: adapters and norms train, everything else is frozen
    trainable = nnx.Any(layers.LoRAParam, nnx.PathContains("norm"))
    graphdef, lora, rest = nnx.split(model, trainable, ...)
    base_before = jax.tree.map(np.asarray, rest)
    tx = optax.adam(3e-2)
    opt = tx.init(lora)

    def loss_fn(lora, key):
        m = nnx.merge(graphdef, lora, rest)
        logits = m(TOKENS, dropout_rng=key).logits
        return next_token_loss(logits[:, :-1], TOKENS[:, 1:], jnp.ones_like(TOKENS[:, 1:]))[0]

    @jax.jit
    def step(lora, opt, key):
        loss, g = jax.value_and_grad(loss_fn)(lora, key)
        upd, opt = tx.update(g, opt, lora)
        return optax.apply_updates(lora, upd), opt, loss

    losses = []
    for i in range(60):
        lora, opt, loss = step(lora, opt, jax.random.key(i))
        losses.append(float(loss))
    assert losses[-1] < 0.7 * losses[0], losses
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, rest), base_before)

    trained = nnx.merge(graphdef, lora, rest)
    merged = merge_lora(trained)
    assert merged.cfg.lora_rank == 0
    assert not list(nnx.to_flat_state(nnx.state(merged, layers.LoRAParam)))
    np.testing.assert_allclose(np.asarray(merged(TOKENS).logits), np.asarray(trained(TOKENS).logits), atol=1e-5)
    # dropout is active only when a key is given
    a = trained(TOKENS, dropout_rng=jax.random.key(1)).logits
    assert not np.allclose(np.asarray(a), np.asarray(trained(TOKENS).logits))


def _without_lora(model: LLM) -> LLM:
    """A model built with lora_rank 0 (no adapter code runs) holding `model`'s base weights."""
    values = {p: np.asarray(v[...]) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))
              if p[-1] not in ("lora_a", "lora_b")}
    return llm_from_params(dataclasses.replace(model.cfg, lora_rank=0), values, source="test")


def test_zero_b_adapters_equal_the_base_model_built_without_lora():
    model, _ = _adapted()
    assert all(not np.any(np.asarray(v[...])) for p, v in nnx.to_flat_state(nnx.state(model, layers.LoRAParam))
               if p[-1] == "lora_b")
    base = _without_lora(model)
    assert not list(nnx.to_flat_state(nnx.state(base, layers.LoRAParam)))
    # x @ W + (x @ A) @ 0: bit for bit the base model's logits
    np.testing.assert_array_equal(np.asarray(model(TOKENS).logits), np.asarray(base(TOKENS).logits))


def test_trained_adapters_equal_peft_merged_model(tmp_path):
    """PEFT trains the adapters (a few AdamW steps on a LlamaForCausalLM), saves them and merges them into the
    base (`merge_and_unload`); ours, loaded through convert.hf_llm + convert.peft with LoRA unmerged, gives the
    merged model's logits."""
    import peft
    import torch
    import transformers

    torch.manual_seed(0)
    cfg = dataclasses.replace(LORA, lora_dropout=0.0)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**config_to_hf(BASE))).float()
    base_tensors = {k: v.detach().numpy().copy() for k, v in hf.state_dict().items()}
    model = peft.get_peft_model(hf, peft.LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha,
                                                    target_modules=list(cfg.lora_targets), lora_dropout=0.0))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    tokens = torch.tensor(np.asarray(TOKENS)).long()
    for _ in range(5):
        opt.zero_grad()
        model(input_ids=tokens, labels=tokens).loss.backward()
        opt.step()
    assert all(p.abs().max() > 0 for n, p in model.named_parameters() if "lora_B" in n)  # trained, not zero
    model.save_pretrained(tmp_path)
    with torch.no_grad():
        merged = model.merge_and_unload().eval()
        ref = merged(input_ids=tokens).logits.numpy()
    values = {**hf_to_ours(base_tensors, cfg, source="hf"), **peft_to_ours(tmp_path, cfg)}
    ours = llm_from_params(cfg, values, source="test")
    assert ours.cfg.lora_rank == 16
    np.testing.assert_allclose(np.asarray(ours(TOKENS).logits), ref, atol=1e-4, rtol=1e-4)


def _dot_shapes(trainable) -> set:
    """Output shapes of the matmuls in the compiled gradient of the logits' mean with respect to `trainable`."""
    cfg = LLMConfig(vocab_size=72, hidden_size=48, intermediate_size=80, num_layers=2, num_heads=4, num_kv_heads=2,
                    lora_rank=8, lora_alpha=8.0, scan_layers=False, remat_policy="none")
    graphdef, train, frozen = nnx.split(LLM(cfg, rngs=nnx.Rngs(0)), trainable, ...)
    loss = lambda t, f, x: nnx.merge(graphdef, t, f)(x).logits.mean()  # noqa: E731
    hlo = jax.jit(jax.grad(loss)).lower(train, frozen, TOKENS[:2, :20]).compile().as_text()
    return set(re.findall(r"= f32\[([0-9,]+)\]\S* (?:dot|custom-call)\(", hlo))


def test_lora_step_computes_no_gradient_of_the_frozen_weights():
    """With the adapters trained and the base frozen (a jit argument, not differentiated), XLA computes no
    kernel-shaped product (dW = x^T dy) for any base weight: the backward costs the activations' gradients only."""
    kernels = {"48,48", "48,24", "48,80", "80,48", "48,72", "72,48"}  # q/o, k/v, gate/up, down, lm_head, embed
    assert not _dot_shapes(layers.LoRAParam) & kernels
    assert _dot_shapes(nnx.Param) & kernels  # the check sees them when the base trains too


def test_lm_head_only_where_the_loss_is_gives_the_full_heads_loss_and_gradient():
    """`selected_token_loss` (the LoRA step's loss: logits of the answer positions only) against the plain
    `shifted_token_loss` over the [b, l, vocab] logits: the same loss and the same adapter gradients."""
    model, _ = _adapted()
    graphdef, lora, rest = nnx.split(model, layers.LoRAParam, ...)
    mask = jnp.zeros_like(TOKENS).at[:, 20:].set(1).at[1, 5].set(1)  # an answer per row, and one stray position
    count = int(mask[:, 1:].sum())

    def full(p):
        return shifted_token_loss(nnx.merge(graphdef, p, rest)(TOKENS).logits, TOKENS, mask)[0]

    def selected(p):
        m = nnx.merge(graphdef, p, rest)
        return selected_token_loss(m, m(TOKENS, return_logits=False).hidden_states, TOKENS, mask, count + 3)[0]

    (want, g_want), (got, g_got) = jax.value_and_grad(full)(lora), jax.value_and_grad(selected)(lora)
    np.testing.assert_allclose(float(got), float(want), rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6), g_got, g_want)
