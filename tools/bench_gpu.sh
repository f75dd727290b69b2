#!/usr/bin/env bash
# Throughput of every member of the family on one GPU, in one prepared run of under 5 minutes:
#   1. correctness of the Triton deformable attention kernels against the PyTorch reference (pytest);
#   2. the deformable attention core, Triton vs the PyTorch reference, forward and forward + backward,
#      at the Deformable-DETR-R50 encoder and decoder shapes, float32 / float16 / bfloat16 values;
#   3. inference and training step (forward, matching, loss, backward) of DETR-R50, Deformable-DETR-R50,
#      DINO-4scale-R50, RT-DETRv2-R50 and D-FINE-L, in float32 and under bf16 autocast (tools/benchmark.py);
#   4. one JSON of it all: $OUT_DIR/bench_gpu.json (the parts' own reports stay beside it).
#
#   tools/bench_gpu.sh                      # the GPU run (CUDA device 0)
#   tools/bench_gpu.sh --device cpu --tiny  # the same steps on the CPU at toy sizes (CI: tests/tools)
#
# Options: --device cuda|cpu (default cuda), --tiny (64 x 64 images, small attention levels, one timed
# call: checks that the script works, measures nothing), --out DIR (default runs/bench_gpu, or $OUT_DIR).
# Extra arguments for tools/benchmark.py: $BENCHMARK_ARGS (replace the sizes, runs and overrides);
# $BENCH_GPU_CONFIGS replaces the list of model configs; $MODEL_TIMEOUT the limit of step 3 (seconds, 170).
set -euo pipefail
cd "$(dirname "$0")/.."
DEVICE=cuda
TINY=0
OUT_DIR=${OUT_DIR:-runs/bench_gpu}
while [ $# -gt 0 ]; do
    case "$1" in
        --device) DEVICE=$2; shift 2 ;;
        --tiny) TINY=1; shift ;;
        --out) OUT_DIR=$2; shift 2 ;;
        *) echo "bench_gpu.sh: unknown argument '$1' (expected --device cuda|cpu, --tiny, --out DIR)" >&2; exit 2 ;;
    esac
done
case "$DEVICE" in
    cuda|cpu) ;;
    *) echo "bench_gpu.sh: --device is '$DEVICE'; expected cuda or cpu" >&2; exit 2 ;;
esac
mkdir -p "$OUT_DIR"
CONFIGS=${BENCH_GPU_CONFIGS:-"configs/detr_r50.yaml configs/deformable.yaml configs/dino_4scale.yaml configs/rtdetrv2_r50vd.yaml \
configs/dfine_l.yaml"}

if [ "$DEVICE" = cuda ]; then
    python -c "import sys, torch
if not torch.cuda.is_available(): sys.exit('bench_gpu.sh: torch sees no CUDA device (use --device cpu)')
print(torch.cuda.get_device_name(0), 'torch', torch.__version__)"
    echo "== 1. Triton kernels vs reference on the GPU"
    timeout 60 python -m pytest -q -p no:cacheprovider tests/attention/test_deformable_triton.py -k cuda \
        | tee "$OUT_DIR/kernel_tests.txt"
    CORE_ARGS="--dtype float32 float16 bfloat16 --runs 20 --warmup 3"
    MODEL_ARGS="--sizes 800x1066 --batch-sizes 1 4 --train-sizes 800x1066 --train-batch-sizes 2 --runs 5 --warmup 2"
else
    echo "== 1. Triton kernels: no GPU, left out" | tee "$OUT_DIR/kernel_tests.txt"
    CORE_ARGS="--dtype float32 bfloat16 --runs 5 --warmup 1"
    MODEL_ARGS="--sizes 800x1066 --batch-sizes 1 --train-batch-sizes 1 --runs 3 --warmup 1"
fi
if [ "$TINY" = 1 ]; then
    CORE_ARGS="--dtype float32 bfloat16 --runs 1 --warmup 0 --levels 16x16 8x8 4x4 2x2"
    MODEL_ARGS="--sizes 64x64 --batch-sizes 1 --train-batch-sizes 1 --runs 1 --warmup 0 \
        --set model.num_queries=10 --set model.decoder.num_layers=1 --set model.denoising.dn_number=2"
fi

echo "== 2. Deformable attention core: Triton (GPU) or the CPU kernel vs the PyTorch reference"
# shellcheck disable=SC2086  # word splitting intended: lists of arguments
timeout 90 python tools/bench_deformable_core.py --device "$DEVICE" $CORE_ARGS --json "$OUT_DIR/deformable_core.json"

echo "== 3. Every member: inference and training step, float32 and bf16 autocast (tools/benchmark.py)"
CONFIG_ARGS=""
for config in $CONFIGS; do CONFIG_ARGS="$CONFIG_ARGS --config $config"; done
# shellcheck disable=SC2086
timeout "${MODEL_TIMEOUT:-170}" python tools/benchmark.py --device "$DEVICE" $CONFIG_ARGS --tasks inference train_step \
    --modes fast fast_bf16 ${BENCHMARK_ARGS:-$MODEL_ARGS} --json "$OUT_DIR/models.json"

echo "== 4. One report"
python - "$OUT_DIR" "$DEVICE" "$TINY" <<'PYTHON'
import json
import sys
from pathlib import Path

from detr_lab.benchmark.report import write_report

out, device, tiny = Path(sys.argv[1]), sys.argv[2], sys.argv[3] == "1"
report = {
    "device": device,
    "tiny": tiny,
    "kernel_tests": (out / "kernel_tests.txt").read_text().strip().splitlines()[-1:],
    "deformable_core": json.loads((out / "deformable_core.json").read_text()),
    "models": json.loads((out / "models.json").read_text()),
}
print(f"bench_gpu.sh: report written to {write_report(report, out / 'bench_gpu.json')}")
PYTHON
