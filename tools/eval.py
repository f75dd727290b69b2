"""COCO mAP of a checkpoint: `python tools/eval.py --config X.yaml --checkpoint CKPT [--output results.json]`.

The model comes from the checkpoint (detr_lab, Lightning or official DETR); the config gives the
dataset, whose validation split is evaluated. `--set model.*=...` overrides reach the model.
Prints the 12-line COCOeval summary and writes the COCO results json (original category ids).
"""

from __future__ import annotations

import argparse
import sys

from detr_lab.engine.cli import add_common_arguments, run_tool


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="eval.py", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="YAML config giving the dataset")
    parser.add_argument("--checkpoint", required=True, help="checkpoint to evaluate")
    parser.add_argument("--output", help="COCO results json (default <trainer.output_dir>/"
                        "coco_results-<checkpoint name>-<path hash>.json)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ... (default auto)")
    parser.add_argument("--batch-size", type=int, help="images per forward pass (default data.batch_size)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_common_arguments(parser)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    def body() -> None:
        from detr_lab.engine.evaluate import evaluate_checkpoint

        result = evaluate_checkpoint(
            args.config,
            args.checkpoint,
            overrides=args.overrides,
            output=args.output,
            device=args.device,
            batch_size=args.batch_size,
            progress=not args.no_progress,
        )
        print(result.summary, end="")
        print(f"{result.num_images} images; COCO results written to {result.results_path}")

    return run_tool("eval.py", body, debug=args.debug)


if __name__ == "__main__":
    sys.exit(main())
