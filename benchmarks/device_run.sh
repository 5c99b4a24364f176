#!/usr/bin/env bash
# One prepared GPU session: kernel correctness on CUDA, then the attention and generation benchmarks.
# Run from the repository root on a machine with a GPU; results go to ${OUT:-benchmarks/results}.
set -uo pipefail
OUT=${OUT:-benchmarks/results}
if [ -d .whl ]; then  # wheels carried to a machine without network (transformers 5.24, pydantic)
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
echo "== kernel correctness on CUDA"
MITIGATE_TEST_DEVICE=cuda timeout 180 python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py 2>&1 | tail -15
echo "== attention layer benchmark (bf16)"
timeout 240 python3 benchmarks/attention.py --device cuda --out "$OUT/attention-cuda-bfloat16.json"
echo "== generation benchmark (LLaVA-1.5-7B shapes, random weights)"
timeout 300 python3 benchmarks/generation.py --device cuda --batch 1 8 --new-tokens 64 --out "$OUT/generation-cuda.json"
