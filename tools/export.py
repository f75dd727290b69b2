"""Export a checkpoint to ONNX: `python tools/export.py --checkpoint CKPT --output model.onnx [--dynamic]`.

Inputs `images` float [B, 3, H, W] (normalized) and `padding_mask` bool [B, H, W] (True = padding);
outputs `pred_logits` [B, Q, C] and `pred_boxes` [B, Q, 4] (normalized cxcywh) of the final layer.
Class names, category ids and the model config go into the ONNX metadata. `--verify` runs the file
with onnxruntime against PyTorch (random sizes and, with --config, validation images) and exits
non-zero when logits or boxes differ by more than --tolerance (1e-4).
"""

from __future__ import annotations

import argparse
import sys

from detr_lab.engine.cli import (
    EXIT_FAILURE,
    add_common_arguments,
    add_print_config_argument,
    check_not_an_input,
    print_config,
    run_tool,
)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="export.py", description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", help="detr_lab, Lightning or official checkpoint (required)")
    parser.add_argument("--output", help="the .onnx file to write (required)")
    parser.add_argument("--opset", type=int, default=17, help="ONNX opset (default 17)")
    parser.add_argument("--height", type=int, help="traced image height (default: the checkpoint's "
                        "square input size for RT-DETR's input policy, else 800)")
    parser.add_argument("--width", type=int, help="traced image width (default: as --height, else 1066)")
    parser.add_argument("--batch", type=int, help="traced batch size (default 2 with --dynamic, else 1)")
    parser.add_argument("--dynamic", action="store_true", help="dynamic batch size, height and width")
    parser.add_argument(
        "--deformable-core", choices=("gather", "grid_sample"), default="gather",
        help="deformable attention as bilinear gathers (default; any size, TensorRT-safe) or ONNX "
        "GridSample (opset >= 16, fixed size only)",
    )
    parser.add_argument("--verify", action="store_true", help="compare onnxruntime with PyTorch")
    parser.add_argument("--config", help="with --verify: also compare on this config's validation images")
    parser.add_argument("--verify-batches", type=int, default=3, help="random batches to verify (default 3)")
    parser.add_argument("--tolerance", type=float, default=1e-4, help="largest accepted |difference|")
    add_print_config_argument(parser)
    add_common_arguments(parser)
    args = parser.parse_args(argv)
    if args.config is not None and not args.verify and not args.print_config:
        parser.error("--config gives the validation images of --verify; add --verify")
    if not args.print_config and (args.checkpoint is None or args.output is None):
        parser.error("the following arguments are required: --checkpoint, --output")
    if args.verify_batches < 0 or args.tolerance < 0:
        parser.error("--verify-batches and --tolerance must be >= 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    passed = True

    def body() -> None:
        nonlocal passed
        if args.print_config:
            print_config(args.config, args.overrides)
            return
        from detr_lab.export.from_checkpoint import export_checkpoint

        check_not_an_input(args.output, {"--checkpoint": args.checkpoint, "--config": args.config},
                           option="--output")
        result = export_checkpoint(
            args.checkpoint,
            args.output,
            overrides=args.overrides,
            height=args.height,
            width=args.width,
            batch=args.batch,
            dynamic=args.dynamic,
            opset=args.opset,
            deformable_core=args.deformable_core,
            verify=args.verify,
            config_path=args.config,
            num_random=args.verify_batches,
            tolerance=args.tolerance,
        )
        print(f"ONNX model written to {result.path}")
        if result.report is not None:
            print(result.report.text())
            passed = result.report.passed

    code = run_tool("export.py", body, debug=args.debug)
    if code == 0 and not passed:
        print("export.py: error: onnxruntime differs from PyTorch beyond the tolerance", file=sys.stderr)
        return EXIT_FAILURE
    return code


if __name__ == "__main__":
    sys.exit(main())
