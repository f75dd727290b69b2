"""Train a detector: `python tools/train.py --config configs/demo.yaml [--set key=value ...]`.

    --resume auto|PATH   continue an interrupted run (auto: <output_dir>/checkpoints/last.ckpt if present)
    --init-from CKPT     start from a checkpoint's weights where names and shapes match (fine-tuning)

When training ends it prints the final validation AP, the best checkpoint and the paths of an example
image (ground truth beside predictions) and of the AP-over-time plot (`<output_dir>/summary/`).

Multi-GPU (one process per GPU):
    torchrun --nproc_per_node 8 tools/train.py --config configs/detr_r50.yaml --set trainer.devices=8
"""

from __future__ import annotations

import argparse
import sys

from detr_lab.engine.cli import add_common_arguments, add_print_config_argument, print_config, run_tool


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="train.py", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="YAML config (see configs/)")
    parser.add_argument("--resume", metavar="PATH|auto", help="resume from a checkpoint ('auto': last.ckpt)")
    parser.add_argument("--init-from", metavar="CKPT", help="initial weights (fine-tuning)")
    add_print_config_argument(parser)
    add_common_arguments(parser)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    def body() -> None:
        if args.print_config:
            print_config(args.config, args.overrides)
            return
        from detr_lab.config import load_config

        cfg = load_config(args.config, args.overrides)  # before importing torch: config errors come fast
        from detr_lab.engine.trainer import train

        train(cfg, resume=args.resume, init_from=args.init_from)

    return run_tool("train.py", body, debug=args.debug)


if __name__ == "__main__":
    sys.exit(main())
