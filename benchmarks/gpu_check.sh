#!/usr/bin/env bash
# One prepared GPU session (no network, under 8 minutes on an H100/H200): kernel correctness on CUDA, then
# the attention and generation benchmarks. Run from the repository root:
#   bash benchmarks/gpu_check.sh            # results into ${OUT:-benchmarks/results}, logs beside them
# Python packages the machine lacks travel as wheels in .whl/ (benchmarks/device_wheels.sh fetches them
# on a machine with network); each step has its own time budget, so a slow step never costs the others.
set -uo pipefail
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 MITIGATE_TRITON_AUTOTUNE=${MITIGATE_TRITON_AUTOTUNE:-0}
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "wheel install failed"; exit 1; }
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
step() {  # step NAME SECONDS COMMAND...: run with a budget, log to $OUT/NAME.log, never stop the script
  local name=$1 budget=$2; shift 2
  echo "== $name (budget ${budget}s)"
  local start=$SECONDS
  timeout "$budget" "$@" 2>&1 | tee "$OUT/$name.log" | tail -n 25
  echo "== $name: exit ${PIPESTATUS[0]} after $((SECONDS - start))s"
}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, transformers, triton; print('torch', torch.__version__, 'transformers', transformers.__version__, 'triton', triton.__version__)" | tee -a "$OUT/gpu.txt"
# 1. correctness on the GPU: every kernel path against the reference (bf16 and fp32), the fused kernel's tests
step kernels 110 env MITIGATE_TEST_DEVICE=cuda HYPOTHESIS_PROFILE=ci python3 -m pytest -q -x -p no:cacheprovider \
  tests/test_kernels.py tests/test_triton_grouped.py
# 2. one attention layer (LLaVA-1.5-7B shapes, bf16): the fused kernel vs SDPA at T = 600, 2900, 8192
step triton_attention 75 python3 benchmarks/triton_attention.py --out "$OUT/triton-attention-cuda.json"
# (its "triton" decode row is the fused kernel with its epilogue, which eager bf16 generation uses; its
# "torch" row is the torch kernel's folded step, which fp32 generation uses: compare the two here)
step attention 45 env MITIGATE_TRITON_EAGER_DECODE=fused python3 benchmarks/attention.py --device cuda \
  --out "$OUT/attention-cuda-bfloat16.json"
# 3. generation, LLaVA-1.5-7B shapes with random weights: dynamic cache eagerly, then the compiled static
#    cache with CUDA graphs (dynamo + cudagraphs: the inductor backend compiles each configuration for
#    minutes; `--compile-backend inductor` in a longer session)
step generation_dynamic 120 python3 benchmarks/generation.py --device cuda --modes dynamic --batch 1 8 \
  --new-tokens 24 --rounds 3 --out "$OUT/generation-cuda-dynamic.json"
step generation_static 130 python3 benchmarks/generation.py --device cuda --modes static --batch 1 8 \
  --new-tokens 24 --rounds 3 --compile-backend cudagraphs --compile-mode none \
  --out "$OUT/generation-cuda-static.json"
echo "== done; results in $OUT"
