"""The real TPU compiler on a CPU host (libtpu, the [tpu] extra): `python -m cig_jax.bench.aot --topology`
compiles a stage's training step for a TPU slice with splash attention and reports per-chip memory against
the chip's HBM and the compiled FLOPs. Slow (libtpu's compile of even a tiny step takes a minute or more here)."""
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="needs libtpu: pip install -e '.[tpu]'")
def test_aot_compiles_a_stage_step_for_a_tpu_slice_with_splash_attention():
    cmd = [sys.executable, "-m", "cig_jax.bench.aot", "--config", str(ROOT / "configs" / "stage3_multiround.yaml"),
           "--topology", "v5p:2x2x1", "--mesh", "fsdp=4", "--attention", "splash",
           "--set", "model.llm.num_layers=2", "--set", "model.dit.num_layers=2", "--set", "data.seq_len=256"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=1500, cwd=ROOT)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    line = next(l for l in out.stdout.splitlines() if l.startswith("[aot] TPU"))
    assert "over 4 tpu devices" in out.stdout
    assert "of 95 GiB HBM" in line  # v5p's HBM, so the per-chip total was compared with it
    flops = float(line.split("compiled FLOPs per step per chip ")[1].split(";")[0])
    kernels = int(line.rsplit("kernels in the program: ", 1)[1])
    assert flops > 0 and kernels > 0  # splash compiled to Mosaic kernels, not the einsum fallback
