"""Two local processes x 4 CPU devices (jax.distributed on localhost) train like one process x 8 devices."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import portpicker

ROOT = Path(__file__).resolve().parents[1]
SMOKE = str(ROOT / "configs" / "smoke.yaml")
STEPS = 5


def _cmd(workdir):
    return [sys.executable, str(ROOT / "train.py"), "--config", SMOKE, "--set", f"train.workdir={workdir}",
            "--set", f"train.steps={STEPS}", "--set", "train.log_every=1", "--set", "train.tensorboard=false",
            "--set", "mesh.data=2", "--set", "mesh.fsdp=2", "--set", "mesh.tensor=2",
            "--set", "model.llm.hidden_size=128", "--set", "model.llm.intermediate_size=256"]


def _env(devices, **kw):
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    for k in ("CIG_COORDINATOR", "CIG_NUM_PROCESSES", "CIG_PROCESS_ID"):
        env.pop(k, None)
    env.update(kw)
    return env


def _losses(workdir):
    rows = [json.loads(l) for l in (Path(workdir) / "metrics.jsonl").read_text().splitlines()]
    return np.array([r["loss"] for r in rows]), [r["step"] for r in rows]


def test_two_processes_match_one_process(tmp_path):
    single = tmp_path / "single"
    subprocess.run(_cmd(single), check=True, env=_env(8), capture_output=True, timeout=600)

    multi = tmp_path / "multi"
    port = portpicker.pick_unused_port()
    procs = [
        subprocess.Popen(_cmd(multi), env=_env(4, CIG_COORDINATOR=f"localhost:{port}", CIG_NUM_PROCESSES="2",
                                               CIG_PROCESS_ID=str(i)),
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for i in range(2)
    ]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-3000:]
    assert "2 process(es)" in outs[0] and "over 8 cpu devices" in outs[0]

    ref, ref_steps = _losses(single)
    got, got_steps = _losses(multi)
    assert ref_steps == got_steps == list(range(1, STEPS + 1))
    np.testing.assert_allclose(got, ref, rtol=1e-5)
