#!/usr/bin/env bash
# Stage 2 at ~1.1B parameters, bf16, 50 steps on one GPU: step time, tokens/s and MFU (issue 6, item 5).
# Run on a GPU machine from the repo root. Packages missing there (grain, array-record, portpicker for
# Python 3.12) may be carried as wheels in .whl/; they are installed into /tmp/site (the machine's own jax and
# flax are kept).
set -euo pipefail
rm -rf /tmp/site
if ls .whl/grain-*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .whl/grain-*.whl .whl/array_record-*.whl .whl/portpicker-*.whl
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.92
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv || true
python3 -c "import jax, flax; print('jax', jax.__version__, 'flax', flax.__version__, jax.devices())"
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
python3 train.py --config configs/stage2_personalize_1b.yaml --set train.workdir=/tmp/stage2_1b --set data.tokenizer= "$@" 2>&1 \
  | grep -v -i "warning" | tee "$OUT/stage2_1b.log"
cp /tmp/stage2_1b/metrics.jsonl "$OUT/stage2_1b_metrics.jsonl"
