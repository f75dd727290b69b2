"""Deformable attention core: reference vs fast implementations at Deformable-DETR-R50 shapes.

Shapes (see `detr_lab.models.attention.kernels.benchmark`): an 800 x 1066 image's 4 levels
(100x134, 50x67, 25x34, 13x17; Lv = 17821), 8 heads x 32 channels, 4 points; "encoder" has one
query per position (Lq = 17821), "decoder" 300 queries. Batch 1 unless `--batch`.

Each pass (forward under no_grad; forward + backward w.r.t. value, locations and weights) is timed
`--runs` times after `--warmup` calls, implementations called in turn within each run. Prints a table
(wall time median, min, max, interquartile range in ms; speed-up = reference median / median; the
median process CPU time, all threads) and writes JSON with the machine description (CPU model, torch
threads, versions, load average, OpenMP environment). On a machine shared with other busy processes,
run with `OMP_WAIT_POLICY=PASSIVE` (or `--threads 1`): GNU OpenMP's busy-waiting otherwise slows
every multi-threaded op by scheduler time slices.

    python tools/bench_deformable_core.py                       # CPU: reference vs cpu_fast
    python tools/bench_deformable_core.py --threads 1           # single-threaded
    python tools/bench_deformable_core.py --device cuda --dtype float32 bfloat16   # + Triton
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from detr_lab.models.attention.kernels import triton_available
from detr_lab.models.attention.kernels.benchmark import benchmark_core, machine_description

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--kinds", nargs="+", default=["encoder", "decoder"], choices=["encoder", "decoder"])
    parser.add_argument(
        "--impls", nargs="+", default=None, help="default: reference cpu_fast (CPU); reference triton (CUDA)"
    )
    parser.add_argument(
        "--dtype", nargs="+", default=["float32"], choices=sorted(DTYPES),
        help="value dtype(s); locations and weights stay float32",
    )
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--no-backward", action="store_true", help="time the forward pass only")
    parser.add_argument("--json", type=Path, default=Path("runs/bench_deformable_core.json"))
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: no CUDA device is available", file=sys.stderr)
        return 2
    impls = args.impls
    if impls is None:
        impls = ["reference", "triton"] if args.device == "cuda" else ["reference", "cpu_fast"]
    if "triton" in impls and not triton_available():
        print("Triton cannot be imported: leaving it out", file=sys.stderr)
        impls = [impl for impl in impls if impl != "triton"]
    machine = machine_description(args.device)
    print(json.dumps(machine))
    rows = []
    for dtype_name in args.dtype:
        for kind in args.kinds:
            rows += benchmark_core(
                impls, kind, device=args.device, value_dtype=DTYPES[dtype_name], batch=args.batch,
                warmup=args.warmup, runs=args.runs, backward=not args.no_backward,
            )
    print(
        f"{'kind':8} {'pass':17} {'dtype':9} {'impl':10} {'median ms':>10} {'min':>9} {'max':>9} {'IQR':>8} "
        f"{'speed-up':>9} {'CPU ms':>9}"
    )
    for row in rows:
        speedup = f"{row['speedup']:8.2f}x" if "speedup" in row else ""
        print(
            f"{row['kind']:8} {row['pass']:17} {row['dtype']:9} {row['impl']:10} {row['median_ms']:10.1f} "
            f"{row['min_ms']:9.1f} {row['max_ms']:9.1f} {row['iqr_ms']:8.1f} {speedup:>9} "
            f"{row['cpu_median_ms']:9.1f}"
        )
    machine["load_average_after"] = machine_description(args.device).get("load_average_1_5_15min")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    report = {"machine": machine, "args": {**vars(args), "json": str(args.json)}, "rows": rows}
    args.json.write_text(json.dumps(report, indent=2))
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
