"""Two local processes x 4 CPU devices (jax.distributed on localhost) train like one process x 8 devices:
stage 2 ('personalize': the MLLM on conversations, ViT and detokenizer frozen), a two-stage recipe with one
distributed start per process, and the LM smoke stage (slow)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import portpicker
import pytest

ROOT = Path(__file__).resolve().parents[1]
SMOKE = str(ROOT / "configs" / "smoke.yaml")
STAGE2 = str(ROOT / "configs" / "stage2_personalize.yaml")
STEPS = 5
MESH = ["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"]
LM = ["model.llm.hidden_size=128", "model.llm.intermediate_size=256"]
# configs/model/demo.yaml shrunk, synthetic conversations drawn in memory; a global batch of 8 = 4 per process
PERSONALIZE = ["data.source=synthetic", "data.num_records=40", "data.seq_len=96", "data.max_images=2",
               "data.global_batch_size=8", "model.llm.num_layers=2", "model.vit.num_layers=1",
               "model.dit.num_layers=2", "train.init_from=", "optimizer.warmup_steps=2",
               "train.checkpoint_every=-1"]  # no checkpoint (the slow LM test covers the multi-process save)


def _cmd(config, workdir, overrides):
    sets = [f"train.workdir={workdir}", f"train.steps={STEPS}", "train.log_every=1", "train.tensorboard=false",
            *MESH, *overrides]
    return [sys.executable, str(ROOT / "train.py"), "--config", config, *[x for o in sets for x in ("--set", o)]]


def _env(devices, **kw):
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    for k in ("CIG_COORDINATOR", "CIG_NUM_PROCESSES", "CIG_PROCESS_ID"):
        env.pop(k, None)
    env.update(kw)
    return env


def _metrics(workdir):
    return [json.loads(l) for l in (Path(workdir) / "metrics.jsonl").read_text().splitlines()]


def _one_vs_two_processes(tmp_path, config, overrides):
    single = tmp_path / "single"
    out = subprocess.run(_cmd(config, single, overrides), env=_env(8), capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]

    multi = tmp_path / "multi"
    port = portpicker.pick_unused_port()
    procs = [
        subprocess.Popen(_cmd(config, multi, overrides),
                         env=_env(4, CIG_COORDINATOR=f"localhost:{port}", CIG_NUM_PROCESSES="2", CIG_PROCESS_ID=str(i)),
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for i in range(2)
    ]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-3000:]
    assert "2 process(es)" in outs[0] and "over 8 cpu devices" in outs[0]
    ref, got = _metrics(single), _metrics(multi)
    assert [r["step"] for r in ref] == [r["step"] for r in got] == list(range(1, STEPS + 1))
    return ref, got


@pytest.mark.long
def test_two_processes_match_one_process_stage2(tmp_path):
    ref, got = _one_vs_two_processes(tmp_path, STAGE2, PERSONALIZE)
    for key in ("loss", "lm_loss", "reg_loss"):
        np.testing.assert_allclose([r[key] for r in got], [r[key] for r in ref], rtol=1e-5, err_msg=key)
    assert ref[-1]["loss"] < ref[0]["loss"]  # it trains
    assert ref[0]["loss_tokens"] == got[0]["loss_tokens"]  # the same global batch, assembled from two hosts


@pytest.mark.long
def test_two_processes_match_one_process_with_length_buckets(tmp_path):
    """Stage 2 with data.length_buckets: both processes pad each global batch to the same bucket (decided from
    the whole batch), so 2 x 4 rows train like 1 x 8, batch for batch."""
    ref, got = _one_vs_two_processes(tmp_path, STAGE2, PERSONALIZE + ["data.length_buckets=[88]"])
    for key in ("loss", "lm_loss", "reg_loss", "loss_tokens"):
        np.testing.assert_allclose([r[key] for r in got], [r[key] for r in ref], rtol=1e-5, err_msg=key)
    cells = lambda rows: [round(r["padded_tokens_per_s"] * r["step_time_s"]) for r in rows]  # noqa: E731
    assert cells(got) == cells(ref) and len(set(cells(ref))) >= 2  # the same buckets, more than one of them


@pytest.mark.slow
def test_two_processes_match_one_process_lm(tmp_path):
    ref, got = _one_vs_two_processes(tmp_path, SMOKE, LM)
    np.testing.assert_allclose([r["loss"] for r in got], [r["loss"] for r in ref], rtol=1e-5)


@pytest.mark.long  # three processes compile two stages each: ~2.5 min on 2 busy cores
def test_two_processes_run_a_two_stage_recipe_with_one_distributed_start_each(tmp_path):
    """A recipe (dataset draw + stage 1 + stage 2 from stage 1's checkpoint) on 2 processes x 4 devices: each
    process starts jax.distributed once for both stages, process 0 alone draws the dataset while the other
    waits, and both stages log the losses of the same recipe on 1 process x 8 devices."""
    data = tmp_path / "data"
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        "recipe:\n"
        f"  data: {{dir: {data}, num_train: 32, num_val: 4, size: 64, seed: 0, kinds: [single_turn]}}\n"
        f"  stages: [{ROOT / 'configs' / 'stage1_detokenizer.yaml'}, {ROOT / 'configs' / 'stage2_personalize.yaml'}]\n")
    sets = [f"data.dir={data}", "data.global_batch_size=8", "data.seq_len=96", "data.max_images=2",
            "train.steps=2", "train.log_every=1", "train.tensorboard=false", "train.checkpoint_every=0",
            "optimizer.warmup_steps=1", "model.llm.num_layers=2", "model.vit.num_layers=1", "model.dit.num_layers=2",
            *MESH]
    cmd = [sys.executable, str(ROOT / "train.py"), "--config", str(recipe), *[x for o in sets for x in ("--set", o)]]

    single = tmp_path / "single"  # stage workdirs (workdir/demo_tiny/stage1, ...) are relative: one cwd per run
    single.mkdir()
    out = subprocess.run(cmd, env=_env(8), cwd=single, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    assert "[distributed]" not in out.stdout  # a single-process run starts nothing

    import shutil

    shutil.rmtree(data)  # the two-process run draws it again, on process 0
    multi = tmp_path / "multi"
    multi.mkdir()
    port = portpicker.pick_unused_port()
    procs = [subprocess.Popen(cmd, cwd=multi, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env=_env(4, CIG_COORDINATOR=f"localhost:{port}", CIG_NUM_PROCESSES="2",
                                       CIG_PROCESS_ID=str(i)))
             for i in range(2)]
    outs = [p.communicate(timeout=900)[0] for p in procs]
    for p, o in zip(procs, outs):
        assert p.returncode == 0, o[-3000:]
    for i, o in enumerate(outs):
        assert o.count("[distributed] started") == 1, o[-3000:]
        assert o.count("[recipe] stage 2/2 done") == 1
    assert "[recipe] drawing" in outs[0] and "[recipe] drawing" not in outs[1]
    assert "[recipe] waiting for process 0" in outs[1]
    for stage in ("stage1", "stage2"):
        ref = _metrics(single / "workdir" / "demo_tiny" / stage)
        got = _metrics(multi / "workdir" / "demo_tiny" / stage)
        assert [r["step"] for r in ref] == [r["step"] for r in got] == [1, 2]
        np.testing.assert_allclose([r["loss"] for r in got], [r["loss"] for r in ref], rtol=1e-5, err_msg=stage)
