"""One generation protocol: the evaluation (`eval.run.generate_rounds`, a history policy over
`sample.complete.complete_conversations`) and sample.py draw the same images for the same conversation, seed and
options; and the KV-cache size a set of conversations needs is computed in one place."""
import dataclasses

import numpy as np
import pytest

from cig_jax.data import schema_io, synthetic
from cig_jax.eval import run as eval_run
from cig_jax.sample import cli as sample_cli
from cig_jax.sample.complete import check_context, context_needed
from cig_jax.sample.options import RoundOptions, round_seed
from cig_jax.sample.session import ChatSession, ContextOverflowError, answer_slots

SEED = 7
MAX_LEN = 1024


def _pending(conv, rounds):
    return dataclasses.replace(conv, rounds=[dataclasses.replace(r, assistant_text=None, assistant_image=None,
                                                                 metadata={}) if k in rounds else r
                                             for k, r in enumerate(conv.rounds)])


def _sample_py(checkpoint, conv, out, *flags):
    """sample.py's images for `conv` (its pending rounds), in process, on one device like the evaluation."""
    schema_io.save_conversation(conv, out / "in" / "chat.json")
    code = sample_cli.main(["--checkpoint", str(checkpoint), "--chat", str(out / "in" / "chat.json"),
                            "--out", str(out / "out"), "--seed", str(SEED), "--force-image", "--max-len", str(MAX_LEN),
                            "--devices", "1", "--no-progress", "--identity-backend", "none", *flags])
    assert code == 0
    done = schema_io.load_conversation(out / "out" / "chat.json")
    return [None if r.assistant_image is None else r.assistant_image.load(out / "out") for r in done.rounds]


@pytest.fixture(scope="module")
def conv():
    return synthetic.make_conversation("name_based", 31_337, 0, 32)


def test_eval_and_sample_py_draw_the_same_images(tiny_run, conv, tmp_path):
    session = ChatSession.from_checkpoint(tiny_run, max_len=MAX_LEN, batch_size=1, identity_embedder=False)
    options = session.options(num_steps=2)
    n = len(conv.rounds)
    # a generated history: every round from the model's own earlier answers
    gen = eval_run.generate_rounds(session, [conv], view="history", context="generated", seed=SEED, options=options)[0]
    mine = _sample_py(tiny_run, _pending(conv, range(n)), tmp_path / "generated", "--num-steps", "2")
    assert all(g is not None for g in gen) and len(mine) == n
    for r in range(n):
        assert np.array_equal(gen[r], mine[r]), f"round {r}: eval and sample.py differ"
    # the ground truth before the last round (the counterfactual probe's protocol)
    last = eval_run.generate_rounds(session, [conv], view="history", context="truth", seed=SEED, only_last=True,
                                    options=options)[0][-1]
    theirs = _sample_py(tiny_run, _pending(conv, [n - 1]), tmp_path / "truth", "--num-steps", "2")[-1]
    assert np.array_equal(last, theirs)
    assert not np.array_equal(last, gen[-1])  # a different history draws a different image (the check has teeth)


def test_round_options_resolve_once_from_the_config(tiny_run):
    session = ChatSession.from_checkpoint(tiny_run, max_len=256, batch_size=1, identity_embedder=False)
    cfg = session.cfg
    default = session.options()
    assert default == RoundOptions(cfg.sample.max_new_tokens, cfg.sample.temperature, cfg.sample.top_p,
                                   cfg.diffusion.num_steps, cfg.diffusion.visual_guidance_scale,
                                   cfg.diffusion.identity_guidance_scale, False)
    assert session.options(num_steps=0) == default  # 0 steps: the config's
    picked = session.options(max_new_tokens=2, temperature=0.5, force_image=True)
    assert (picked.max_new_tokens, picked.temperature, picked.force_image, picked.top_p) == (2, 0.5, True, default.top_p)
    with pytest.raises(dataclasses.FrozenInstanceError):
        picked.num_steps = 3
    res = session.round("Draw Maya at the beach.", seed=round_seed(SEED, 0), options=picked)
    sample = session.history.rounds[-1].metadata["sample"]
    want = dict(picked.as_metadata(), seed=SEED)  # how the round was made, saved with it (+ its identities)
    assert {k: sample[k] for k in want} == want and res.image is not None


def test_one_function_sizes_the_cache_for_sample_py_and_the_evaluation(tiny_run, conv):
    from cig_jax.train.checkpoint import checkpoint_parts

    cfg, template = checkpoint_parts(tiny_run)
    n = len(conv.rounds)
    asked = _pending(conv, range(n))
    need = context_needed(template, [asked], 4)
    assert need == sum(len(template.encode(dataclasses.replace(asked, rounds=[
        dataclasses.replace(r, assistant_text="") for r in asked.rounds[:k + 1]]), add_generation_prompt=False,
        end="round")) - (k and len(template.encode(dataclasses.replace(asked, rounds=[
            dataclasses.replace(r, assistant_text="") for r in asked.rounds[:k]]), add_generation_prompt=False,
            end="round"))) for k in range(n)) + n * answer_slots(4, template.num_image_tokens, 1)
    check_context(template, asked, need, 4)
    with pytest.raises(ContextOverflowError, match=f"needs up to {need} KV-cache slots"):
        check_context(template, asked, need - 1, 4)
    # a batch counts each round's longest row, and its answers' room for a batch
    assert context_needed(template, [asked, asked], 4) > need
    # the evaluation sizes its session from the same function, over every history it may complete
    assert eval_run.context_for(tiny_run, [conv], 1) >= context_needed(template, [asked], cfg.sample.max_new_tokens, 1)
