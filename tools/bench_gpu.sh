#!/usr/bin/env bash
# GPU benchmark, one GPU, under 5 minutes:
#   1. correctness of the Triton deformable attention kernels against the PyTorch reference (pytest);
#   2. deformable attention core timings, Triton vs reference, forward and forward+backward, at the
#      Deformable-DETR-R50 encoder and decoder shapes, float32 / float16 / bfloat16 values;
#   3. end-to-end DETR and Deformable DETR inference and training-step timings (tools/benchmark.py).
# Results go to $OUT_DIR (default runs/bench_gpu). Extra arguments for tools/benchmark.py: $BENCHMARK_ARGS.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${OUT_DIR:-runs/bench_gpu}
mkdir -p "$OUT_DIR"

python -c "import sys, torch
if not torch.cuda.is_available(): sys.exit('bench_gpu.sh: torch sees no CUDA device')
print(torch.cuda.get_device_name(0), 'torch', torch.__version__)"

echo "== 1. Triton kernels vs reference on the GPU"
timeout 120 python -m pytest -q -p no:cacheprovider tests/attention/test_deformable_triton.py -k cuda

echo "== 2. Deformable attention core: Triton vs PyTorch reference"
timeout 120 python tools/bench_deformable_core.py --device cuda --dtype float32 float16 bfloat16 \
    --runs 20 --warmup 3 --json "$OUT_DIR/deformable_core.json"

echo "== 3. End-to-end DETR and Deformable DETR: inference and training step (tools/benchmark.py)"
DEFAULT_BENCHMARK_ARGS="--config configs/deformable.yaml --config configs/detr_r50.yaml --sizes 800x1066 \
    --batch-sizes 1 4 --tasks inference train_step --runs 10 --warmup 3 --json $OUT_DIR/model.json"
# shellcheck disable=SC2086  # word splitting intended: a list of arguments
timeout 150 python tools/benchmark.py --device cuda ${BENCHMARK_ARGS:-$DEFAULT_BENCHMARK_ARGS}
