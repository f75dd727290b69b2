"""Inference and training-step speed, peak memory, FLOPs and size of detector configs, fast vs reference.

    python tools/benchmark.py --config configs/detr_r50.yaml [--config Y.yaml ...] | --all
        [--device cpu|cuda] [--sizes 800x1066 512x683] [--batch-sizes 1 4]
        [--native-size] [--train-sizes 800x1066] [--train-batch-sizes 1] [--tasks inference train_step]
        [--modes fast reference fast_bf16 | --reference | --fast] [--runs 5] [--warmup 1]
        [--threads N [N ...]]
        [--breakdown] [--json runs/benchmark.json] [--set model.num_queries=300 ...]

Models are built with random weights (no downloads). By default each figure is measured on both the
fast path and the straightforward reference path in the same run, and the table shows the ratio
fast / reference of the median wall times (and of the CPU times). `fast_bf16` (opt-in) is the fast
path under bfloat16 autocast; its outputs differ from the float32 ones (the JSON says by how much).
`onnxruntime`, `openvino`, `onnxruntime_int8`, `openvino_int8` (opt-in, CPU inference, export extra)
time the model exported at each case's size (INT8: calibrated on the timed batch, latency only).
With several modes, a second table puts them side by side (inference latency, the fastest mode's
speed-up over the fast path, INT8's over FP32 in the same runtime); `--threads 1 2` measures every case
at each thread count (torch's and the exported runtimes'), and `--native-size` measures each config at
its own evaluation size (800 x 1066 for DETR, 640 x 640 for RT-DETR / D-FINE). The deployment latency
table of the README is one command:

    python tools/benchmark.py --config configs/detr_r50.yaml --config configs/deformable.yaml ... \
        --tasks inference --native-size --batch-sizes 1 --threads 1 2 \
        --modes fast onnxruntime openvino onnxruntime_int8 openvino_int8

`--all` takes every model config directly under configs/ except the demo ones (`demo*.yaml`). See
`detr_lab.benchmark` for what each mode and figure means. Prints the table and writes the full
report (every run's time, machine description, load average) as JSON.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from detr_lab.engine.cli import (
    ToolError,
    add_common_arguments,
    add_print_config_argument,
    print_config,
    run_tool,
)

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


def variant_configs(folder: Path = CONFIG_DIR) -> list[Path]:
    """Every model variant config directly under `folder`, demos excluded, sorted by name."""
    return sorted(p for p in folder.glob("*.yaml") if not p.name.startswith("demo"))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    from detr_lab.benchmark import DEFAULT_MODES, MODES, TASKS, parse_size

    parser = argparse.ArgumentParser(prog="benchmark.py", description=__doc__.splitlines()[0])
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--config", action="append", help="model config YAML (repeatable)")
    which.add_argument("--all", action="store_true", help="every non-demo config under configs/")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ... (default cpu)")
    parser.add_argument("--sizes", type=parse_size, nargs="+", default=[(800, 1066), (512, 683)],
                        metavar="HxW", help="inference image sizes (default 800x1066 512x683)")
    parser.add_argument("--native-size", action="store_true",
                        help="instead of --sizes, each config's own evaluation size of a 480x640 image")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4], help="inference (default 1 4)")
    parser.add_argument("--train-sizes", type=parse_size, nargs="+", metavar="HxW",
                        help="training-step image sizes (default: the first of --sizes)")
    parser.add_argument("--train-batch-sizes", type=int, nargs="+", default=[1], help="(default 1)")
    parser.add_argument("--tasks", nargs="+", choices=TASKS, default=list(TASKS))
    modes = parser.add_mutually_exclusive_group()
    modes.add_argument("--modes", nargs="+", choices=MODES, default=list(DEFAULT_MODES),
                       help="default: fast reference")
    modes.add_argument("--reference", dest="modes", action="store_const", const=["reference"],
                       help="only the reference path")
    modes.add_argument("--fast", dest="modes", action="store_const", const=["fast"],
                       help="only the fast path")
    parser.add_argument("--runs", type=int, default=5, help="timed calls per figure (default 5)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed calls first (default 1)")
    parser.add_argument("--threads", type=int, nargs="+",
                        help="CPU threads, one set of cases per value (default: torch's choice)")
    parser.add_argument("--breakdown", action="store_true",
                        help="inference: also time the detector's parts (backbone, encoder attention, ...)")
    parser.add_argument("--seed", type=int, default=0, help="seeds weights, images and targets")
    parser.add_argument("--json", type=Path, default=Path("runs/benchmark.json"), help="report path")
    add_print_config_argument(parser)
    add_common_arguments(parser)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    def body() -> None:
        from detr_lab.benchmark import BenchmarkSettings, format_report, run_benchmark, write_report

        configs = variant_configs() if args.all else [Path(p) for p in args.config]
        if not configs:
            raise ToolError(f"no model configs found under {CONFIG_DIR}")
        if args.print_config:
            for config in configs:
                print(f"# {config}")
                print_config(str(config), args.overrides)
            return
        settings = BenchmarkSettings(
            device=args.device,
            sizes=args.sizes,
            batch_sizes=args.batch_sizes,
            train_sizes=args.train_sizes,
            train_batch_sizes=args.train_batch_sizes,
            tasks=args.tasks,
            modes=args.modes,
            runs=args.runs,
            warmup=args.warmup,
            threads=args.threads,
            native_size=args.native_size,
            seed=args.seed,
            breakdown=args.breakdown,
            overrides=args.overrides,
        )
        report = run_benchmark(configs, settings, log=lambda line: print(line, file=sys.stderr, flush=True))
        print(format_report(report))
        print(f"report written to {write_report(report, args.json)}")

    return run_tool("benchmark.py", body, debug=args.debug)


if __name__ == "__main__":
    sys.exit(main())
