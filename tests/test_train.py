"""The training loop: auto-resume after SIGKILL is exact, and checkpoints restore onto other meshes."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

from cig_jax import sharding
from cig_jax.config import MeshConfig, load_config
from cig_jax.train import trainer
from cig_jax.train.checkpoint import CheckpointMismatchError

ROOT = Path(__file__).resolve().parents[1]
SMOKE = str(ROOT / "configs" / "smoke.yaml")


def _train_cmd(workdir, *extra):
    return [sys.executable, str(ROOT / "train.py"), "--config", SMOKE, "--set", f"train.workdir={workdir}",
            "--set", "train.steps=20", "--set", "train.checkpoint_every=10", "--set", "train.log_every=1",
            "--set", "train.async_checkpoints=true", *extra]


def _env(**kw):
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1")
    env.update(kw)
    return env


def _fingerprints(workdir):
    rows = [json.loads(l) for l in (Path(workdir) / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["batch_fingerprint"] for r in rows}


def _params(workdir):
    cfg = load_config(SMOKE, [f"train.workdir={workdir}", "train.steps=20"])
    mesh = sharding.make_mesh(MeshConfig(data=1, fsdp=1, tensor=1), jax.devices()[:1])
    model = trainer.load_trained(cfg, mesh=mesh)
    return {p: np.asarray(v.value) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def test_sigkill_then_auto_resume_matches_straight_run(tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    subprocess.run(_train_cmd(straight), check=True, env=_env(), capture_output=True, timeout=300)

    proc = subprocess.Popen(_train_cmd(resumed), env=_env(CIG_DEBUG_STALL_AFTER_STEP="10"),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 300
    for line in proc.stdout:  # wait until step 10's checkpoint is on disk and the run stalls
        if "stalled after step 10" in line or time.time() > deadline:
            break
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert (resumed / "checkpoints" / "10").is_dir() and not (resumed / "checkpoints" / "20").exists()

    out = subprocess.run(_train_cmd(resumed), check=True, env=_env(), capture_output=True, text=True, timeout=300)
    assert "[resume]" in out.stdout and "at step 10" in out.stdout

    assert _fingerprints(resumed) == _fingerprints(straight)  # identical data order, steps 1..20
    a, b = _params(straight), _params(resumed)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=str(k))


def test_checkpoint_restores_on_other_meshes(tmp_path):
    workdir = tmp_path / "run"
    overrides = [f"train.workdir={workdir}", "train.steps=3", "train.log_every=1", "train.tensorboard=false",
                 "mesh.data=2", "mesh.fsdp=4", "mesh.tensor=1", "model.llm.hidden_size=128",
                 "model.llm.intermediate_size=512"]
    cfg = load_config(SMOKE, overrides)
    trainer.run(cfg)
    saved_mesh = sharding.make_mesh(cfg.mesh)
    ref = trainer.load_trained(cfg, mesh=saved_mesh)
    ref_params = {p: np.asarray(v.value) for p, v in nnx.to_flat_state(nnx.state(ref, nnx.Param))}
    kernel = ref.layers.mlp.up_proj.kernel.value
    assert not kernel.sharding.is_fully_replicated

    for mesh in (sharding.make_mesh(MeshConfig(data=1, fsdp=2, tensor=2), jax.devices()[:4]),
                 sharding.make_mesh(MeshConfig(data=1, fsdp=1, tensor=1), jax.devices()[:1])):
        model = trainer.load_trained(cfg, mesh=mesh)
        got = {p: v.value for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
        for p, v in got.items():
            assert set(v.sharding.device_set) <= set(mesh.devices.flat)
            np.testing.assert_array_equal(np.asarray(v), ref_params[p], err_msg=str(p))


def test_checkpoint_from_another_model_config_is_a_clear_error(tmp_path):
    workdir = tmp_path / "run"
    cfg = load_config(SMOKE, [f"train.workdir={workdir}", "train.steps=2", "train.tensorboard=false",
                              "mesh.fsdp=1", "mesh.data=-1"])
    trainer.run(cfg)
    other = load_config(SMOKE, [f"train.workdir={workdir}", "train.steps=4", "model.llm.num_layers=3",
                                "train.tensorboard=false", "mesh.fsdp=1", "mesh.data=-1"])
    with pytest.raises(CheckpointMismatchError, match=r"model\.llm\.num_layers"):
        trainer.run(other)
