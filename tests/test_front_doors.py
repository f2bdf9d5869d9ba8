"""Every command as a user meets it, in real subprocesses: `python train.py`, `sample.py`, `app.py` and every
`python -m cig_jax...` module with a `__main__`.

- `--help` exits 0, documents every flag and shows each default once (read from the parser the command itself
  builds: a shim around `argparse.ArgumentParser.parse_args` records its actions, then lets `--help` run).
- A missing checkpoint, a missing file and a bad `--set` each end with exit status 2 and exactly one line on
  stderr naming the flag / file / key, and no traceback.

The subprocesses run a few at a time, all started once per module (about a minute on 2 busy cores).
"""
from __future__ import annotations

import concurrent.futures as cf
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from flax import nnx

from conftest import save_tiny_checkpoint

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = ["train.py", "sample.py", "app.py"]
MODULES = sorted(p.relative_to(REPO).with_suffix("").as_posix().replace("/", ".")
                 for p in (REPO / "cig_jax").rglob("*.py") if 'if __name__ == "__main__"' in p.read_text())
COMMANDS = SCRIPTS + MODULES
SAME_AS = {"cig_jax.sample.cli": "sample.py", "cig_jax.bench.nonmarkov": "cig_jax.eval.nonmarkov"}  # one command, two doors

# Runs the command as `python <script>` / `python -m <module>` would, with a shim recording the parser's actions.
HELP_SHIM = r"""
import argparse, json, os, runpy, sys
target, report = sys.argv[1], os.environ["CIG_HELP_REPORT"]
original = argparse.ArgumentParser.parse_args
def parse_args(self, args=None, namespace=None):
    fmt = self._get_formatter()
    rows = [{"flags": a.option_strings, "help": fmt._expand_help(a) if a.help else ""}
            for a in self._actions if a.option_strings and a.help != argparse.SUPPRESS]
    json.dump({"prog": self.prog, "actions": rows}, open(report, "w"))
    return original(self, ["--help"], namespace)
argparse.ArgumentParser.parse_args = parse_args
if target.endswith(".py"):
    sys.argv = [target, "--help"]
    runpy.run_path(target, run_name="__main__")
else:
    sys.argv = [target.replace(".", "/") + ".py", "--help"]
    runpy.run_module(target, run_name="__main__", alter_sys=True)
"""


def _argv(command: str, args) -> list:
    head = [str(REPO / command)] if command.endswith(".py") else ["-m", command]
    return [sys.executable, *head, *args]


def _env(**extra) -> dict:
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""), **extra)
    env.pop("XLA_FLAGS", None)
    return env


def _error_cases(ckpt: Path, tmp: Path) -> dict:
    """(command, case) -> (args, a piece the one line must hold)."""
    chat = str(REPO / "examples" / "two_friends.json")
    gone, bad = str(tmp / "no_such_run"), ["--set", "nosuch.key=1"]
    small = str(REPO / "configs" / "smoke.yaml")
    return {
        ("train.py", "missing file"): (["--config", str(tmp / "nowhere.yaml")], "nowhere.yaml"),
        ("train.py", "bad --set"): (["--config", small, "--print-config", *bad], "nosuch"),
        ("sample.py", "missing checkpoint"): (["--checkpoint", gone, "--chat", chat, "--out", str(tmp / "s")],
                                              "no_such_run"),
        ("sample.py", "missing file"): (["--checkpoint", str(ckpt), "--chat", str(tmp / "nowhere.json"), "--out",
                                         str(tmp / "s")], "nowhere.json"),
        ("sample.py", "bad --set"): (["--checkpoint", str(ckpt), "--chat", chat, "--out", str(tmp / "s"), *bad],
                                     "nosuch"),
        ("app.py", "missing checkpoint"): (["--checkpoint", gone], "no_such_run"),
        ("app.py", "bad --set"): (["--checkpoint", str(ckpt), *bad], "nosuch"),
        ("cig_jax.eval.run", "missing checkpoint"): (["--checkpoint", gone, "--out", str(tmp / "e")], "no_such_run"),
        ("cig_jax.eval.run", "bad --set"): (["--checkpoint", str(ckpt), "--out", str(tmp / "e"), *bad], "nosuch"),
        ("cig_jax.train.export", "missing checkpoint"): (["--checkpoint", gone, "--out", str(tmp / "x")],
                                                           "no_such_run"),
        ("cig_jax.train.stage0", "missing file"): (["--config", str(tmp / "nowhere.yaml"), "--out", str(tmp / "i")],
                                                   "nowhere.yaml"),
        ("cig_jax.train.stage0", "bad --set"): (["--config", small, "--out", str(tmp / "i"), *bad], "nosuch"),
        ("cig_jax.config_io", "missing file"): ([str(tmp / "nowhere.yaml")], "nowhere.yaml"),
        ("cig_jax.config_io", "bad --set"): ([small, *bad], "nosuch"),
        ("cig_jax.data.tfds_builder", "missing file"): (["--data-dir", str(tmp / "t"), "--source",
                                                         str(tmp / "no_json_here")], "no_json_here"),
        ("cig_jax.data.video", "missing file"): (["--videos", str(tmp / "no_clips"), "--out", str(tmp / "v")],
                                                 "no_clips"),
        ("cig_jax.eval.metrics", "missing file"): (["--truth", str(tmp / "no_truth")], "no_truth"),
        ("cig_jax.bench.aot", "missing file"): (["--config", str(tmp / "nowhere.yaml")], "nowhere.yaml"),
        ("cig_jax.bench.aot", "bad --set"): (["--config", small, *bad], "nosuch"),
        ("cig_jax.bench.input_pipeline", "missing file"): (["--config", str(tmp / "nowhere.yaml")], "nowhere.yaml"),
        ("cig_jax.bench.input_pipeline", "bad --set"): (["--config", small, *bad], "nosuch"),
        ("cig_jax.bench.init_memory", "missing checkpoint"): (["--checkpoint", gone], "no_such_run"),
        ("cig_jax.eval.nonmarkov", "missing checkpoint"): (["--init", gone, "--workdir", str(tmp / "n")],
                                                           "no_such_run"),
        ("cig_jax.eval.nonmarkov", "bad --set"): (["--workdir", str(tmp / "n"), *bad], "nosuch"),
        ("cig_jax.bench.nonmarkov", "bad --set"): (["--workdir", str(tmp / "n"), *bad], "nosuch"),
    }


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Every subprocess of this file, run once, a few at a time: {key: (returncode, stdout, stderr, report)}."""
    tmp = tmp_path_factory.mktemp("front_doors")
    ckpt = save_tiny_checkpoint(tmp / "run")
    jobs = {}
    for command in COMMANDS:
        report = tmp / f"help_{command.replace('/', '_')}.json"
        target = str(REPO / command) if command.endswith(".py") else command
        jobs[(command, "help")] = ([sys.executable, "-c", HELP_SHIM, target], _env(CIG_HELP_REPORT=str(report)),
                                   report)
    for key, (args, _) in _error_cases(ckpt, tmp).items():
        jobs[key] = (_argv(key[0], args), _env(), None)

    def run(key):
        argv, env, report = jobs[key]
        r = subprocess.run(argv, cwd=tmp, env=env, capture_output=True, text=True, timeout=600)
        return key, (r.returncode, r.stdout, r.stderr,
                     json.loads(report.read_text()) if report is not None and report.exists() else None)

    with cf.ThreadPoolExecutor(max_workers=4) as pool:
        results = dict(pool.map(run, jobs))
    return results, _error_cases(ckpt, tmp)


def test_every_command_is_covered():
    assert set(SCRIPTS) <= {p.name for p in REPO.glob("*.py")}
    assert "cig_jax.eval.run" in MODULES and "cig_jax.train.export" in MODULES and len(MODULES) >= 15


@pytest.mark.parametrize("command", COMMANDS)
def test_help_exits_0_documents_every_flag_and_shows_each_default_once(runs, command):
    rc, out, err, report = runs[0][(command, "help")]
    assert rc == 0 and report is not None, err[-2000:]
    shown = SAME_AS.get(command, command)
    expected = f"python {shown}" if shown.endswith(".py") else f"python -m {shown}"
    assert out.startswith(f"usage: {expected}") and report["prog"] == expected, out[:200]
    assert "Traceback" not in err and "(default: None)" not in out, err[-2000:]
    flags = [row for row in report["actions"] if row["flags"] != ["-h", "--help"]]
    twice = [row["flags"] for row in flags if row["help"].lower().count("default") > 1]
    assert not twice, twice
    undocumented = [row["flags"] for row in flags if not row["help"].strip()]
    assert not undocumented, undocumented


def _error_keys():
    return sorted(_error_cases(Path("/ckpt"), Path("/tmp")))


@pytest.mark.parametrize("key", _error_keys(), ids=lambda k: f"{k[0]}-{k[1]}")
def test_user_error_is_one_line_exit_2_no_traceback(runs, key):
    results, cases = runs
    rc, _, err, _ = results[key]
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1, (rc, err[-3000:])
    assert "Traceback" not in err and "error:" in lines[0] and cases[key][1] in lines[0], lines


# Runs `python -m MODULE ARGS` as a base install (`pip install -e .`) would: PyTorch and diffusers unimportable.
BASE_INSTALL = r"""
import runpy, sys
sys.modules["torch"] = None
sys.modules["diffusers"] = None
module = sys.argv[1]
sys.argv = [module.replace(".", "/") + ".py"] + sys.argv[2:]
runpy.run_module(module, run_name="__main__", alter_sys=True)
"""


def test_export_on_the_base_install_names_the_extra_before_writing_then_exports_the_rest(tmp_path):
    """Without torch / diffusers: one line naming the 'export' extra and the --skip that exports the rest, and no
    folder written; with that --skip, exit 0 and every other part out, the ViT readable with safetensors alone and
    equal to the checkpoint's weights."""
    from safetensors.numpy import load_file

    from cig_jax.sample.session import default_mesh
    from cig_jax.train.checkpoint import load_trained
    from cig_jax.train.checkpoint import saved_config

    ckpt = save_tiny_checkpoint(tmp_path / "run", ["model.vit.pool=none", "model.vit.attn_pool=null"])
    out = tmp_path / "export"
    argv = [sys.executable, "-c", BASE_INSTALL, "cig_jax.train.export", "--checkpoint", str(ckpt), "--out", str(out)]
    r = subprocess.run(argv, env=_env(), capture_output=True, text=True, timeout=600)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and "pip install -e '.[export]'" in lines[0], r.stderr[-3000:]
    assert not out.exists()
    skip = lines[0].split("--skip ")[1].split()[0]
    assert "dit" in skip.split(",") and "llm" not in skip.split(",")
    r = subprocess.run(argv + ["--skip", skip], env=_env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert "PyTorch was not found" not in r.stdout + r.stderr and "could not be restored" not in r.stderr
    assert (out / "llm" / "config.json").is_file() and (out / "seedx_agent" / "agent.safetensors").is_file()
    assert not (out / "dit").exists()
    model = load_trained(saved_config(ckpt, source="test"), mesh=default_mesh(), workdir=ckpt)
    theirs = load_file(str(out / "vit" / "cig_vit.safetensors"))
    ours = {".".join(map(str, p)): np.asarray(v.get_value())
            for p, v in nnx.to_flat_state(nnx.state(model.mllm.vit, nnx.Param))}
    assert theirs.keys() == ours.keys() and all(np.array_equal(theirs[k], ours[k]) for k in ours)
