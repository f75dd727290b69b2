"""COCO mAP of a checkpoint: `python tools/eval.py --config X.yaml --checkpoint CKPT [--output results.json]`.

The model comes from the checkpoint (detr_lab, Lightning or official DETR); the config gives the
dataset, whose validation split is evaluated. `--set model.*=...` overrides reach the model.
`--backend onnxruntime --model model.onnx` evaluates an exported model instead (CPU; needs the
export extra), with the same batches; `--backend openvino --model model.xml` an OpenVINO IR.
Prints the 12-line COCOeval summary and writes the COCO results json (original category ids).
"""

from __future__ import annotations

import argparse
import sys

from detr_lab.engine.cli import add_backend_arguments, add_common_arguments, parse_backend_arguments, run_tool


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="eval.py", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="YAML config giving the dataset")
    add_backend_arguments(parser, checkpoint_help="checkpoint to evaluate (pytorch backend)")
    parser.add_argument("--output", help="COCO results json (default <trainer.output_dir>/"
                        "coco_results-<model file name>-<path hash>.json)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ... (default auto)")
    parser.add_argument("--batch-size", type=int, help="images per forward pass (default data.batch_size)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_common_arguments(parser)
    return parse_backend_arguments(parser, argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    def body() -> None:
        from detr_lab.engine.evaluate import evaluate_checkpoint
        from detr_lab.predict.onnx_evaluation import evaluate_onnx

        common = dict(
            overrides=args.overrides,
            output=args.output,
            batch_size=args.batch_size,
            progress=not args.no_progress,
        )
        if args.backend in ("onnxruntime", "openvino"):
            if args.device not in ("auto", "cpu"):
                raise ValueError(f"--backend {args.backend} runs on the CPU; got --device {args.device}")
            result = evaluate_onnx(args.config, args.model, backend=args.backend, **common)
        else:
            result = evaluate_checkpoint(args.config, args.checkpoint, device=args.device, **common)
        print(result.summary, end="")
        print(f"{result.num_images} images; COCO results written to {result.results_path}")

    return run_tool("eval.py", body, debug=args.debug)


if __name__ == "__main__":
    sys.exit(main())
