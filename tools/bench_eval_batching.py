"""Evaluation throughput with same-size batches vs the official padded batches.

    python tools/bench_eval_batching.py --config X.yaml --checkpoint CKPT [--batch-size 4] [--repeats 2]

Runs `evaluate_checkpoint` over the config's validation split in both batching modes, taking turns
(`detr_lab.timer`), after one warm-up pass of each, and prints, per mode: forward passes, images per
second (best pass) and AP. Same-size batching never pads, so its AP is the one every batch size
gives; its cost is the extra forward passes of small size groups (an image whose resized size is
unique goes alone).
"""

from __future__ import annotations

import argparse
import sys

from detr_lab.engine.cli import add_common_arguments, run_tool


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="bench_eval_batching.py", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2, help="timed passes per mode (best is kept)")
    parser.add_argument("--device", default="cpu")
    add_common_arguments(parser)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    def body() -> None:
        import tempfile
        from pathlib import Path

        from detr_lab.engine.evaluate import evaluate_checkpoint
        from detr_lab.timer import time_interleaved

        results = {}
        with tempfile.TemporaryDirectory() as scratch:

            def evaluate(mode: str):
                def call() -> None:
                    overrides = [*args.overrides, f"data.eval_batching={mode}"]
                    results[mode] = evaluate_checkpoint(
                        args.config, args.checkpoint, overrides=overrides, device=args.device,
                        output=Path(scratch) / "results.json", batch_size=args.batch_size, progress=False,
                    )
                return call

            modes = ("padded", "same_size")
            times = time_interleaved({mode: evaluate(mode) for mode in modes}, runs=args.repeats, warmup=1)
        for mode in modes:
            result, best = results[mode], min(times[mode]["wall"])
            print(f"{mode:9s} batch {args.batch_size}: {result.num_images} images, "
                  f"{result.forward_passes} forward passes, {result.num_images / best:.2f} images/s "
                  f"(best of {args.repeats}), AP {result.stats['AP']:.4f}")

    return run_tool("bench_eval_batching.py", body, debug=args.debug)


if __name__ == "__main__":
    sys.exit(main())
