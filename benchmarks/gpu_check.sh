#!/usr/bin/env bash
# The device check: run it on a machine with a CUDA GPU (never required; CPU-only machines skip all of this).
# In at most ~8 minutes it runs the GPU-marked tests, the scoring cost at every precision on the GPU, the cost model
# and a short Fashion-MNIST time-to-target with the data on the GPU, and writes every table to one file.
#
#   bash benchmarks/gpu_check.sh [OUT_FILE]        (default: runs/gpu_check.txt; needs `make install` first)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/gpu_check.txt}
PY=${PY:-.venv/bin/python}
mkdir -p "$(dirname "$OUT")"
: > "$OUT"
section() { echo; echo "== $1 ($(date -u +%H:%M:%S))"; }
{
  section "device"
  $PY -c "import torch; print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name(0), torch.cuda.device_count(), 'GPUs')" || exit 1
  section "GPU-marked tests"
  timeout 180 $PY -m pytest -q -p no:cacheprovider -m gpu tests 2>&1 | tail -15
  section "scoring cost per precision (fp32, bf16, fp16; scale 1 and 0.5; inductor)"
  timeout 180 $PY benchmarks/scoring_cost.py --device cuda --precisions fp32,bf16,fp16 --scales 1,0.5 --compile inductor --train-limit 12800 2>&1 | tail -16
  section "cost model (fp32 scoring; then auto)"
  timeout 120 $PY benchmarks/cost_model.py --device cuda --train-limit 25600 2>&1 | tail -7
  timeout 120 $PY benchmarks/cost_model.py --device cuda --train-limit 25600 --score-precision auto 2>&1 | tail -7
  section "time to target, 1 seed, 4 epochs, data on the GPU"
  rm -rf runs/gpu_ttt
  timeout 240 $PY benchmarks/time_to_target.py --device cuda --seeds 0 --epochs 4 --strategies traditional,sb,stale-sb \
      --out runs/gpu_ttt 2>&1 | tail -30
} 2>&1 | tee -a "$OUT"
echo "tables written to $OUT"
