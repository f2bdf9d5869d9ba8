"""sample.py writes each conversation as soon as it is complete: a run killed with SIGKILL leaves finished
conversations on disk, `--skip-existing` completes the rest with the outputs of an uninterrupted run; `--num-images`
draws candidates with different seeds; every PNG carries how it was made."""
import copy
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image as PILImage

from cig_jax.data import schema
from cig_jax.data import schema_io

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "two_friends.json"


def _sample_main():
    from cig_jax.sample.cli import main  # what `python sample.py` runs

    return main


def _jsonl(folder: Path, n: int) -> Path:
    shutil.copytree(EXAMPLE.parent, folder, dirs_exist_ok=True)
    first = json.loads(EXAMPLE.read_text())
    lines = []
    for k in range(n):
        d = copy.deepcopy(first)
        d["id"] = f"conv{k}"
        d["rounds"][1]["user_text"] = f"Show Maya in place {k}."
        lines.append(json.dumps(d))
    path = folder / "many.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def _files(out: Path) -> dict:
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()
            and not p.name.startswith(".")}


ARGS = ["--devices", "1", "--no-progress", "--max-new-tokens", "3", "--force-image", "--batch-size", "1"]


@pytest.mark.long
def test_sigkill_mid_batch_then_skip_existing_matches_a_straight_run(tiny_run, tmp_path):
    chats = _jsonl(tmp_path / "in", 4)
    killed = tmp_path / "killed"
    env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
    proc = subprocess.Popen([sys.executable, str(ROOT / "sample.py"), "--checkpoint", str(tiny_run), "--chat",
                             str(chats), "--out", str(killed)] + ARGS, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    t0 = time.time()
    while not list(killed.glob("conv*.json")):
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        assert time.time() - t0 < 900, "sample.py wrote nothing in 15 minutes"
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    finished = sorted(p.name for p in killed.glob("conv*.json"))
    assert 1 <= len(finished) < 4, finished  # killed mid-batch
    for name in finished:  # every JSON on disk is a complete, readable conversation with its images
        conv = schema_io.load_conversation(killed / name)
        assert not schema.pending_rounds(conv) and all(r.assistant_image is not None for r in conv.rounds)

    main = _sample_main()
    assert main(["--checkpoint", str(tiny_run), "--chat", str(chats), "--out", str(killed), "--skip-existing"]
                + ARGS) == 0
    straight = tmp_path / "straight"
    assert main(["--checkpoint", str(tiny_run), "--chat", str(chats), "--out", str(straight)] + ARGS) == 0
    resumed, expected = _files(killed), _files(straight)
    assert sorted(resumed) == sorted(expected)
    assert [k for k in expected if resumed[k] != expected[k]] == []  # byte-identical: JSON, PNGs, transcript


def test_num_images_draws_candidates_with_their_parameters_in_the_pngs(tiny_run, tmp_path):
    shutil.copytree(EXAMPLE.parent, tmp_path / "in")
    out = tmp_path / "out"
    rc = _sample_main()(["--checkpoint", str(tiny_run), "--chat", str(tmp_path / "in" / EXAMPLE.name), "--out",
                         str(out), "--num-images", "3", "--seed", "5"] + ARGS)
    assert rc == 0
    conv = schema_io.load_conversation(out / EXAMPLE.name)
    for r, rnd in enumerate(conv.rounds):
        sample = rnd.metadata["sample"]
        cands = sample["candidates"]
        assert [c["seed"] for c in cands] == [5 + r + k * 1_000_003 for k in (1, 2)]
        first = np.asarray(PILImage.open(out / rnd.assistant_image.path))
        made = json.loads(PILImage.open(out / rnd.assistant_image.path).text["cig_jax"])
        assert made["seed"] == 5 + r and made["num_steps"] == sample["num_steps"] and made["force_image"] is True
        pixels = [first]
        for c in cands:
            png = PILImage.open(out / c["image"])
            assert json.loads(png.text["cig_jax"])["seed"] == c["seed"]
            pixels.append(np.asarray(png))
        assert all(not np.array_equal(pixels[i], pixels[j]) for i in range(3) for j in range(i))  # other seeds


def test_sample_cli_help_names_the_command_and_shows_defaults(capsys):
    try:
        _sample_main()(["--help"])
    except SystemExit:
        pass
    text = capsys.readouterr().out
    assert text.startswith("usage: python sample.py")
    assert "--skip-existing" in text and "--num-images" in text and "(default: 2048)" in text
