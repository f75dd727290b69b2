"""Export a checkpoint to ONNX or OpenVINO: `python tools/export.py --checkpoint CKPT --output model.onnx`.

Inputs `images` float [B, 3, H, W] (normalized) and `padding_mask` bool [B, H, W] (True = padding);
outputs `pred_logits` [B, Q, C] and `pred_boxes` [B, Q, 4] (normalized cxcywh) of the final layer.
Class names, category ids and the model config go into the ONNX metadata. `--verify` runs the file
with onnxruntime against PyTorch (random sizes and, with --config, validation images) and exits
non-zero when logits or boxes differ by more than --tolerance (1e-4).

`--format openvino --output model.xml` converts the ONNX graph to OpenVINO IR (FP32; `--fp16` only
with --verify, written only when the proof passes); --verify then runs OpenVINO against PyTorch.
`--quantize int8 --config X.yaml --calibration-images N` writes an INT8 model for the format's runtime
(onnxruntime static QDQ, or NNCF for OpenVINO) after a measured sensitivity analysis, with a report of
the FP32 and INT8 COCO AP on the validation set (--report, default beside the output); it exits
non-zero and writes no INT8 model when the AP drop exceeds --max-ap-drop (1.0 point), unless --force.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

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
        "--deformable-core", choices=("auto", "gather", "grid_sample"), default="auto",
        help="deformable attention as ONNX GridSample (opset >= 16, fixed size only; faster on "
        "onnxruntime's CPU) or bilinear gathers (any size; use it for TensorRT); default auto: "
        "grid_sample for a fixed-size export, gather with --dynamic",
    )
    parser.add_argument("--verify", action="store_true", help="compare onnxruntime with PyTorch")
    parser.add_argument("--config", help="with --verify: also compare on this config's validation images")
    parser.add_argument("--verify-batches", type=int, default=3, help="random batches to verify (default 3)")
    parser.add_argument("--tolerance", type=float, default=1e-4, help="largest accepted |difference|")
    add_print_config_argument(parser)
    parser.add_argument("--format", choices=("onnx", "openvino"), default="onnx",
                        help="onnx (default) or openvino (IR converted from the ONNX graph; --output X.xml)")
    parser.add_argument("--fp16", action="store_true",
                        help="openvino: FP16 weights and inference, written only when --verify passes")
    parser.add_argument("--quantize", choices=("int8",),
                        help="INT8 post-training quantization (needs --config)")
    parser.add_argument("--calibration-images", type=int, default=32,
                        help="INT8 calibration images (default 32)")
    parser.add_argument("--calibration-split", choices=("train", "val"), default="train",
                        help="INT8 calibration images from the config's train (default) or val split")
    parser.add_argument("--max-ap-drop", type=float, default=1.0,
                        help="INT8: largest accepted COCO AP drop in points (default 1.0)")
    parser.add_argument("--force", action="store_true", help="INT8: write the model even past --max-ap-drop")
    parser.add_argument("--no-sensitivity", action="store_true",
                        help="INT8: skip the sensitivity analysis (quantize every candidate group)")
    parser.add_argument("--report", help="INT8 report json (default <output>.int8-report.json)")
    add_common_arguments(parser)
    args = parser.parse_args(argv)
    if args.print_config:
        return args
    if args.checkpoint is None or args.output is None:
        parser.error("the following arguments are required: --checkpoint, --output")
    if args.config is not None and not (args.verify or args.quantize):
        parser.error("--config gives the validation images of --verify; add --verify")
    if args.quantize and args.config is None:
        parser.error("--quantize int8 needs --config: its images calibrate, its validation set measures AP")
    if args.fp16 and (args.format != "openvino" or not args.verify or args.quantize):
        parser.error("--fp16 is for --format openvino with --verify (kept only when its proof passes)")
    if args.calibration_images < 1 or args.max_ap_drop < 0:
        parser.error("--calibration-images must be >= 1 and --max-ap-drop >= 0")
    if args.verify_batches < 0 or args.tolerance < 0:
        parser.error("--verify-batches and --tolerance must be >= 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    failure = None

    def body() -> None:
        nonlocal failure
        if args.print_config:
            print_config(args.config, args.overrides)
            return
        from detr_lab.config import load_config
        from detr_lab.export.from_checkpoint import export_checkpoint
        from detr_lab.predict.int8_proof import quantize_with_proof

        check_not_an_input(args.output, {"--checkpoint": args.checkpoint, "--config": args.config},
                           option="--output")
        output = Path(args.output)
        with tempfile.TemporaryDirectory(prefix="detr_lab_export_") as scratch:
            fp32_output = output
            onnx_output = None
            if args.quantize:  # the FP32 model is quantized, not kept
                fp32_output = Path(scratch) / f"fp32{'.xml' if args.format == 'openvino' else '.onnx'}"
                onnx_output = Path(scratch) / "fp32.onnx" if args.format == "openvino" else None
            result = export_checkpoint(
                args.checkpoint,
                fp32_output,
                overrides=args.overrides,
                height=args.height,
                width=args.width,
                batch=args.batch,
                dynamic=args.dynamic,
                opset=args.opset,
                deformable_core=args.deformable_core,
                verify=args.verify,
                config_path=args.config if args.verify else None,
                num_random=args.verify_batches,
                tolerance=args.tolerance,
                format=args.format,
                precision="f16" if args.fp16 else "f32",
                onnx_output=onnx_output,
            )
            kind = "OpenVINO" if args.format == "openvino" else "ONNX"
            if result.path is not None and not args.quantize:
                print(f"{kind} model written to {result.path}")
            if result.report is not None:
                print(result.report.text())
                if not result.report.passed:
                    failure = f"{result.report.backend} differs from PyTorch beyond the tolerance"
                    if result.path is None:
                        failure += "; no FP16 model written"
                    return
            if args.quantize:
                report_path = Path(args.report or output.with_name(output.name + ".int8-report.json"))
                backend = "openvino" if args.format == "openvino" else "onnxruntime"
                report = quantize_with_proof(
                    result.path, output, load_config(args.config, _data_overrides(args.overrides)),
                    backend=backend, onnx_path=result.onnx_path, calibration_images=args.calibration_images,
                    calibration_split=args.calibration_split, max_ap_drop=args.max_ap_drop, force=args.force,
                    analyze=not args.no_sensitivity, report_path=report_path,
                )
                print(report.text())
                print(f"INT8 report written to {report_path}")
                if report.written:
                    print(f"INT8 {kind} model written to {output}" + (" (forced past --max-ap-drop)"
                                                                      if not report.passed else ""))
                else:
                    failure = (f"INT8 loses {report.ap_drop:.2f} AP points (more than --max-ap-drop "
                               f"{args.max_ap_drop:g}); no INT8 model written (--force writes it anyway)")

    code = run_tool("export.py", body, debug=args.debug)
    if code == 0 and failure is not None:
        print(f"export.py: error: {failure}", file=sys.stderr)
        return EXIT_FAILURE
    return code


def _data_overrides(overrides: list[str]) -> list[str]:
    return [item for item in overrides if not item.startswith("model.")]


if __name__ == "__main__":
    sys.exit(main())
