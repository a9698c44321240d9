#!/usr/bin/env bash
# Every GPU measurement of the benchmarks in one run (a lent H200 has 15 minutes a session,
# machine start included, so each step has its own time limit and a failure does not stop
# the next). Usage, on the GPU machine, in the repository root:
#
#   OUT=/tmp/gpu bash benchmarks/gpu.sh
#
# Writes log.txt (with the surface engine's table of benchmarks/models.py), hessian.json,
# zoo/{results.json,surfaces.png} and mpo/{results.json, acc_diff.png} to $OUT. Needs torch with CUDA and the package's Python dependencies
# (the device image lacks anywidget/ipywidgets/plotly/pyhessian: carry them as wheels).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT=${OUT:-/tmp/gpu}
SKIP=${SKIP:-}  # e.g. SKIP=zoo: steps to leave out (models, hessian, zoo, mpo)
mkdir -p "$OUT/zoo" "$OUT/mpo"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
log="$OUT/log.txt"

step() {  # step KEY SECONDS NAME COMMAND...
  local key=$1 limit=$2 name=$3; shift 3
  [[ " $SKIP " == *" $key "* ]] && return
  echo "== $name ($(date +%T), limit ${limit}s)" | tee -a "$log"
  local t0=$SECONDS
  timeout "$limit" "$@" 2>&1 | tee -a "$log"
  echo "== $name: exit ${PIPESTATUS[0]} after $((SECONDS - t0)) s" | tee -a "$log"
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee -a "$log"
python3 -c 'import torch; print("torch", torch.__version__, torch.cuda.get_device_name())' 2>&1 \
  | tee -a "$log"
# Issue 15's GPU goals first: ResNet-18 bf16 <= 2 ms/pt and >= 20x the loss-landscape loop,
# fp32 >= 1.2x the plain loop on ResNet-50 (two paired rounds; the GPU drifts less than a
# shared CPU).
step models 240 "surface engine vs plain loops: ResNet-18, ResNet-50 (fp32, tf32, bf16)" \
  python3 benchmarks/models.py --device cuda --models resnet18,resnet50 \
  --precisions fp32,tf32,bf16 --rounds 2
step hessian 150 "Hessian vs PyHessian, ResNet-18 on 1024 samples" \
  python3 benchmarks/hessian.py --device cuda --repeats 3 --json "$OUT/hessian.json"
step zoo 210 "skip connections: ResNet-20/56 with and without shortcuts" \
  python3 benchmarks/zoo_gpu.py --out "$OUT/zoo"
step mpo 200 "MPO random squares: acc_diff vs p, plain/BN/skip" \
  python3 benchmarks/mpo_squares_gpu.py --out "$OUT/mpo" ${MPO_ARGS:---seeds 0,1}
rm -f "$OUT"/zoo/*.npz "$OUT"/mpo/*.npz
ls -la "$OUT" "$OUT/zoo" "$OUT/mpo" | tee -a "$log"
