"""Benchmark: a checkpoint's PyTorch fast path against its exported files (onnxruntime / OpenVINO,
FP32 / INT8), one process, the backends taking turns.

    python tools/bench_exported.py --checkpoint last.ckpt --size 160x160 --threads 1 2 --runs 20 \
        --file onnxruntime=m.onnx --file onnxruntime_int8=m-int8.onnx \
        --file openvino=m.xml --file openvino_int8=m-int8.xml [--json report.json]

Each `--file NAME=PATH` is run by the runtime its suffix names (.onnx: onnxruntime, .xml: OpenVINO)
on the same random batch of one image of `--size` (no padding; a fixed-size export must have been
traced at that size). The files come from `tools/export.py` (with `--quantize int8` for INT8, whose
report holds the accuracy proof); this tool only times them (`detr_lab.benchmark.exported`). Per
thread count it prints the median wall time of each backend and its speed relative to PyTorch's fast
path, and the machine.
"""

from __future__ import annotations

import argparse
import sys

from detr_lab.engine.cli import add_common_arguments, run_tool
from detr_lab.errors import InputError


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="bench_exported.py", description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True,
                        help="the trained checkpoint the files were exported from")
    parser.add_argument("--file", action="append", default=[], metavar="NAME=PATH",
                        help="an exported model to time (repeatable)")
    parser.add_argument("--size", default="160x160", help="HxW of the image (default 160x160)")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="thread counts (default 1 2)")
    parser.add_argument("--runs", type=int, default=20, help="timed calls per backend (default 20)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed rounds first (default 3)")
    parser.add_argument("--block", type=int, default=4, help="calls per turn (default 4)")
    parser.add_argument("--json", help="also write the report here")
    add_common_arguments(parser, overrides=False)
    return parser.parse_args(argv)


def parse_files(items: list[str]) -> dict[str, str]:
    """`["name=path", ...]` -> `{name: path}`; InputError for an item without `=` or a repeated name."""
    files: dict[str, str] = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise InputError(f"--file {item!r}: expected NAME=PATH, e.g. onnxruntime_int8=model-int8.onnx")
        if name in files:
            raise InputError(f"--file: the name {name!r} is given twice")
        files[name] = path
    return files


def parse_size(text: str) -> tuple[int, int]:
    height, sep, width = text.lower().partition("x")
    if not sep or not height.isdigit() or not width.isdigit() or min(int(height), int(width)) < 1:
        raise InputError(f"--size {text!r}: expected HxW, e.g. 160x160")
    return int(height), int(width)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    def body() -> None:
        import torch

        from detr_lab.benchmark.exported import backend_calls, time_backends
        from detr_lab.benchmark.machine import describe_machine, load_average, machine_line
        from detr_lab.benchmark.report import write_report
        from detr_lab.checkpoints import load_checkpoint

        files = parse_files(args.file)
        height, width = parse_size(args.size)
        if args.runs < 1 or args.warmup < 0 or args.block < 1 or min(args.threads) < 1:
            raise InputError("--runs, --block and --threads must be at least 1, --warmup at least 0")
        loaded = load_checkpoint(args.checkpoint)
        rows = []
        for threads in args.threads:
            threads_before = torch.get_num_threads()  # backend_calls sets torch's; given back after
            try:
                calls = backend_calls(loaded, files, height=height, width=width, threads=threads)
                result = time_backends(calls, runs=args.runs, warmup=args.warmup, block=args.block)
            finally:
                torch.set_num_threads(threads_before)
            rows.append({"threads": threads, "backends": result})
            print(f"{threads} thread(s), {height} x {width}, batch 1, median of {args.runs}:")
            for name, value in result.items():
                print(f"  {name:<20} {value['wall_ms']['median']:9.2f} ms   x{value['vs_pytorch_fast']:.2f} "
                      "vs pytorch_fast")
        machine = describe_machine("cpu")
        machine["load_average_end"] = load_average()
        print(machine_line(machine))
        if args.json:
            report = {"machine": machine, "checkpoint": str(args.checkpoint), "files": files,
                      "settings": {"size": [height, width], "runs": args.runs, "warmup": args.warmup,
                                   "block": args.block}, "results": rows}
            print(f"report written to {write_report(report, args.json)}")

    return run_tool("bench_exported.py", body, debug=args.debug)


if __name__ == "__main__":
    sys.exit(main())
