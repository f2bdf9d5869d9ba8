"""The trainer's FLOPs count (cig_jax.train.flops, behind Task.flops_per_example and the MFU line) against XLA's
own count of the compiled training step, and the counting rule on a known answer."""
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

from cig_jax import sharding
from cig_jax.train.compile import compile_train_step
from cig_jax.config_io import load_config
from cig_jax.train.flops import count_loss_flops
from cig_jax.train.stages import build_task

ROOT = Path(__file__).resolve().parents[1]
# XLA's cost analysis counts a lax.scan body once and counts remat's recompute: unrolled layers, no remat.
UNROLLED = ["model.llm.scan_layers=false", "model.vit.scan_layers=false", "model.dit.scan_layers=false",
            "model.llm.remat_policy=none", "model.vit.remat_policy=none", "model.dit.remat_policy=none",
            "data.source=synthetic", "data.global_batch_size=2", "mesh.data=1", "mesh.fsdp=1", "mesh.tensor=1"]
CASES = {
    "stage2": ("stage2_personalize.yaml", []),
    "stage2_lora": ("stage2_personalize.yaml", ["model.llm.lora_rank=4"]),  # frozen base the gradient crosses
    # causal query blocks (seq 256 = 2 blocks) and the frozen DiT's loss on the predicted embeddings
    "stage3_detokenizer_loss": ("stage3_multiround.yaml", ["data.seq_len=256", "data.max_images=4",
                                                           "train.detokenizer_loss_weight=0.5"]),
}


@pytest.mark.long
@pytest.mark.parametrize("case", sorted(CASES))
def test_trainer_flops_match_xla_cost_analysis_of_the_compiled_step(case):
    name, extra = CASES[case]
    cfg = load_config(ROOT / "configs" / name, UNROLLED + extra)
    mesh = sharding.make_mesh(cfg.mesh, jax.devices()[:1])  # cost_analysis counts per device: one device
    report = compile_train_step(cfg, mesh, per_device_batch=cfg.data.global_batch_size, verbose=False)
    cost = report["compiled"].cost_analysis()
    xla = float((cost[0] if isinstance(cost, (list, tuple)) else cost)["flops"])
    counted = build_task(cfg).flops_per_example * cfg.data.global_batch_size
    assert abs(counted / xla - 1.0) < 0.10, (case, counted, xla)


def test_counting_rule_on_a_known_answer():
    """x @ W1 (trained) -> @ W2 (frozen) -> attention-like x x^T, with a stop_gradient branch: each matmul counts
    its forward x (1 + operands needing a gradient)."""
    b, d, f = 3, 8, 5
    w1, w2 = jnp.ones((d, f)), jnp.ones((f, f))
    x = jnp.ones((b, d))

    def loss(trained, frozen, batch):
        h = batch @ trained  # data x trained: 1 + 1 (dW)
        g = h @ frozen  # needs-grad x frozen: 1 + 1 (dX)
        s = g @ g.T  # both need grad: 1 + 2
        dead = jax.lax.stop_gradient(g) @ frozen  # no gradient: 1
        return jnp.sum(s) + jnp.sum(dead)

    fc = count_loss_flops(loss, w1, w2, x)
    expected = 2 * (2 * b * d * f) + 2 * (2 * b * f * f) + 3 * (2 * b * b * f) + 1 * (2 * b * f * f)
    assert fc.total == expected
    assert fc.counted["trained weights"] == 2 * (2 * b * d * f)
    assert fc.counted["frozen weights"] == 2 * (2 * b * f * f) + 2 * b * f * f
    assert fc.counted["activations"] == 3 * (2 * b * b * f)


def test_scanned_layers_count_their_length():
    """A stack under lax.scan counts each iteration; the carry gains its gradient inside the body."""
    n, b, d = 4, 2, 6

    def loss(trained, frozen, batch):
        def body(x, w):
            return x @ w, None

        y, _ = jax.lax.scan(body, batch, trained)
        return jnp.sum(y)

    fc = count_loss_flops(loss, jnp.ones((n, d, d)), (), jnp.ones((b, d)))
    # the carry needs a gradient from layer 1 on, and a scan's backward body is the same for every layer, so it
    # computes dX at layer 0 too: all n layers count 3x.
    assert fc.total == 3 * n * (2 * b * d * d)
