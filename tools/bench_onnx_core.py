"""Time the deformable core's two ONNX forms on onnxruntime: `python tools/bench_onnx_core.py [--runs 5]`.

"gather" (bilinear gathers, the exported default) against "grid_sample" (ONNX GridSample per level),
at the Deformable DETR-R50 encoder shape of an 800 x 1066 image (17821 queries, 4 levels, 8 heads,
4 points, head width 32); prints the medians and each form's largest difference from the PyTorch
reference core.
"""

from __future__ import annotations

import argparse
import json
import sys

from detr_lab.engine.cli import add_common_arguments, run_tool


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench_onnx_core.py", description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5, help="timed calls per form (default 5)")
    parser.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads (default 1)")
    add_common_arguments(parser, overrides=False)
    args = parser.parse_args(argv)

    def body() -> None:
        from detr_lab.export.core_benchmark import benchmark_export_cores

        if args.runs < 1 or args.threads < 1:
            raise ValueError(f"--runs and --threads must be >= 1, got {args.runs} and {args.threads}")
        result = benchmark_export_cores(runs=args.runs, threads=args.threads)
        for name in ("gather", "grid_sample"):
            figures = result[name]
            print(f"{name}: median {figures['median_s'] * 1e3:.0f} ms wall, "
                  f"{figures['cpu_median_s'] * 1e3:.0f} ms CPU over {args.runs} runs, "
                  f"max |diff| from the reference {figures['max_abs_difference']:.2g}")
        print(json.dumps(result))

    return run_tool("bench_onnx_core.py", body, debug=args.debug)


if __name__ == "__main__":
    sys.exit(main())
