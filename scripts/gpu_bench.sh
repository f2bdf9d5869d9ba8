#!/usr/bin/env bash
# One GPU (H100 / H200), under 8 minutes: the stage-2 1.1B MLLM step and a PixArt-XL-size DiT step at 1024 px
# latents in bf16, each with its variants measured separately; prints step time, tokens or images per second
# and MFU with its formula (cig_jax.bench.gpu_step; issue 21). Run from the repo root:
#     bash scripts/gpu_bench.sh            # both suites, log + JSON under $OUT (default /tmp/out)
#     TINY=1 bash scripts/gpu_bench.sh     # the same code at toy sizes (runs on CPU: checks the script)
# Packages missing on a bare GPU machine (grain, array-record, portpicker) may be carried as wheels in .whl/;
# they go into /tmp/site and the machine's own jax and flax are kept.
set -euo pipefail
rm -rf /tmp/site
if ls .whl/grain-*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .whl/grain-*.whl .whl/array_record-*.whl .whl/portpicker-*.whl
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
ARGS=(--suite stage2 --suite dit --steps "${STEPS:-10}" --budget-s "${BUDGET_S:-380}" --json "$OUT/gpu_bench.json")
if [[ -n "${TINY:-}" ]]; then
  ARGS+=(--tiny)
else
  nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv || true
fi
# 470 s hard stop: the suite skips variants that would start after BUDGET_S, a stuck one is cut here.
timeout "${TIMEOUT_S:-470}" "$PY" -m cig_jax.bench.gpu_step "${ARGS[@]}" "$@" 2>&1 \
  | grep -v -i "warning" | tee "$OUT/gpu_bench.log"
