"""The training command line as a user runs it: real subprocesses of `python train.py` from another directory."""
import os
import subprocess
import sys
from pathlib import Path

import yaml
import pytest

from cig_jax.config_io import load_config

REPO = Path(__file__).resolve().parents[1]


def train_py(*args, cwd, timeout=600):
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("XLA_FLAGS", None)  # one CPU device, as a user's laptop
    return subprocess.run([sys.executable, str(REPO / "train.py"), *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_help_exits_0_and_lists_print_config_and_dry_run(tmp_path):
    for flag in ("--help", "-h"):
        r = train_py(flag, cwd=tmp_path)
        assert r.returncode == 0, r.stderr
        assert "--print-config" in r.stdout and "--dry-run" in r.stdout and "--set" in r.stdout
        assert r.stdout.startswith("usage: python train.py")
        assert "configs/demo.yaml" in r.stdout  # the configs it can take


def test_no_config_is_an_error_with_usage_and_trains_nothing(tmp_path):
    r = train_py(cwd=tmp_path)
    assert r.returncode == 2
    assert "usage: python train.py" in r.stderr and "--config" in r.stderr
    assert "Traceback" not in r.stderr
    assert list(tmp_path.iterdir()) == []  # no silent default job: no workdir/


def test_unknown_argument_and_missing_file_exit_2_in_one_line(tmp_path):
    r = train_py("--config", str(REPO / "configs/smoke.yaml"), "--bogus", cwd=tmp_path)
    assert r.returncode == 2 and "--bogus" in r.stderr and "Traceback" not in r.stderr
    r = train_py("--config", "nowhere.yaml", cwd=tmp_path)
    assert r.returncode == 2 and "nowhere.yaml" in r.stderr and "Traceback" not in r.stderr
    r = train_py("--config", str(REPO / "configs/smoke.yaml"), "--set", "model.llm.remat_policy=sometimes", cwd=tmp_path)
    assert r.returncode == 2 and "model.llm.remat_policy" in r.stderr and "Traceback" not in r.stderr
    assert list(tmp_path.iterdir()) == []


def test_print_config_loads_back_to_an_equal_config(tmp_path):
    stage = REPO / "configs/stage2_personalize.yaml"
    r = train_py("--config", str(stage), "--set", "train.steps=7", "--print-config", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    (tmp_path / "printed.yaml").write_text(r.stdout)
    expected = load_config(stage, ["train.steps=7"])
    assert load_config(tmp_path / "printed.yaml") == expected
    assert expected != load_config(stage)  # the override is in what was printed

    # a recipe prints each stage's resolved config, one YAML document each
    r = train_py("--config", str(REPO / "configs/demo.yaml"), "--print-config", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    docs = list(yaml.safe_load_all(r.stdout))
    assert [d["train"]["stage"] for d in docs] == ["detokenizer", "personalize", "multiround"]
    stages = ("stage1_detokenizer_smollm2", "stage2_personalize_smollm2", "stage3_multiround_smollm2")
    for i, (d, name) in enumerate(zip(docs, stages)):
        (tmp_path / f"s{i}.yaml").write_text(yaml.safe_dump(d))
        assert load_config(tmp_path / f"s{i}.yaml") == load_config(REPO / f"configs/{name}.yaml")
    assert list(p.name for p in tmp_path.iterdir() if p.is_dir()) == []


def test_dry_run_prints_per_device_memory_and_flops_and_writes_nothing(tmp_path):
    r = train_py("--config", str(REPO / "configs/stage2_personalize.yaml"), "--dry-run", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "[memory] per device:" in r.stdout and "GiB" in r.stdout
    assert "FLOPs per step" in r.stdout
    assert not (tmp_path / "workdir").exists()  # stage 2's workdir is relative: no checkpoint, no directory


@pytest.mark.long
def test_a_run_leaves_config_yaml_that_reloads_to_the_same_config(tmp_path):
    workdir = tmp_path / "run"
    overrides = ["train.steps=2", "train.log_every=1", f"train.workdir={workdir}"]
    args = [a for o in overrides for a in ("--set", o)]
    r = train_py("--config", str(REPO / "configs/smoke.yaml"), *args, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    saved = workdir / "config.yaml"
    assert saved.is_file()
    assert load_config(saved) == load_config(REPO / "configs/smoke.yaml", overrides)
    # and train.py takes it again as --config (the finished run resumes and does nothing more)
    r = train_py("--config", str(saved), cwd=tmp_path)
    assert r.returncode == 0, r.stderr


MODULE_COMMANDS = ["cig_jax.bench.aot", "cig_jax.bench.decode", "cig_jax.bench.dit_step", "cig_jax.bench.gpu_step",
                   "cig_jax.bench.history_cache", "cig_jax.bench.init_memory", "cig_jax.bench.input_pipeline",
                   "cig_jax.bench.llm_step", "cig_jax.bench.lora_step", "cig_jax.bench.nonmarkov", "cig_jax.train.export", "cig_jax.train.stage0",
                   "cig_jax.data.synthetic", "cig_jax.data.tfds_builder", "cig_jax.data.video", "cig_jax.eval.metrics",
                   "cig_jax.eval.nonmarkov", "cig_jax.eval.run", "cig_jax.sample.cli"]


def test_every_module_command_has_one_cli_style(capsys):
    """`python -m <module> --help` of every module command: exits 0, shows the command a user types as prog, and
    its long flags are dashed (and a --set, where there is one, takes KEY=VALUE and repeats)."""
    import importlib
    import re

    found = {p.relative_to(REPO).with_suffix("").as_posix().replace("/", ".")
             for p in (REPO / "cig_jax").rglob("*.py") if 'if __name__ == "__main__"' in p.read_text()}
    assert found - {"cig_jax.config_io"} == set(MODULE_COMMANDS), "a module command is missing from this list"
    for name in MODULE_COMMANDS:
        module = importlib.import_module(name)
        entry = getattr(module, "main")
        with pytest.raises(SystemExit) as e:
            entry(["--help"])
        out = capsys.readouterr().out
        assert e.value.code in (0, None), name
        usage = " ".join(out.split("options:")[0].split())  # the usage block, wrapped lines joined
        assert usage.startswith(f"usage: python -m {name} ") or (
            name == "cig_jax.sample.cli" and usage.startswith("usage: python sample.py")) or (
            name == "cig_jax.bench.nonmarkov" and usage.startswith("usage: python -m cig_jax.eval.nonmarkov ")), (
            name, usage[:80])
        flags = re.findall(r"(?<![\w-])--[A-Za-z][\w-]*", out)
        assert flags and not [f for f in flags if "_" in f], (name, flags)
        if "--set" in flags:
            assert "--set KEY=VALUE" in usage, name
