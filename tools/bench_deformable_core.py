"""Deformable attention core: reference vs fast implementations at Deformable-DETR-R50 shapes.

Shapes (see `detr_lab.benchmark.deformable_core`): an 800 x 1066 image's 4 levels
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

from detr_lab.benchmark.deformable_core import (
    DTYPES,
    KINDS,
    R50_SPATIAL_SHAPES,
    format_core_table,
    run_core_benchmark,
)
from detr_lab.benchmark.detectors import parse_size
from detr_lab.benchmark.report import write_report
from detr_lab.engine.cli import add_common_arguments, run_tool


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="bench_deformable_core.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--kinds", nargs="+", default=list(KINDS), choices=KINDS)
    parser.add_argument(
        "--impls", nargs="+", default=None, help="default: reference cpu_fast (CPU); reference triton (CUDA)"
    )
    parser.add_argument(
        "--dtype", nargs="+", default=["float32"], choices=sorted(DTYPES),
        help="value dtype(s); locations and weights stay float32",
    )  # fmt: skip
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--levels", type=parse_size, nargs="+", default=list(R50_SPATIAL_SHAPES),
                        metavar="HxW", help="the value's levels (default: Deformable-DETR-R50, 800 x 1066)")
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--no-backward", action="store_true", help="time the forward pass only")
    parser.add_argument("--json", type=Path, default=Path("runs/bench_deformable_core.json"))
    add_common_arguments(parser, overrides=False)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    def body() -> None:
        report = run_core_benchmark(
            device=args.device, kinds=args.kinds, impls=args.impls, dtypes=args.dtype, batch=args.batch,
            runs=args.runs, warmup=args.warmup, threads=args.threads, backward=not args.no_backward,
            spatial_shapes=[tuple(level) for level in args.levels],
            log=lambda line: print(line, file=sys.stderr),
        )  # fmt: skip
        print(json.dumps(report["machine"]))
        print(format_core_table(report["rows"]))
        print(f"wrote {write_report(report, args.json)}")

    return run_tool("bench_deformable_core.py", body, debug=args.debug)


if __name__ == "__main__":
    raise SystemExit(main())
