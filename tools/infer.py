"""Detect objects in images: `python tools/infer.py IMAGE|FOLDER [...] --checkpoint CKPT [--output-dir DIR]`.

`--model NAME|FOLDER` runs a zoo model (e.g. `dino-4scale-r50`: downloaded once into
`$DETR_LAB_CACHE_DIR`, hash checked, converted), a Hub-style model folder or a Hub repository id
instead of a checkpoint. `--backend onnxruntime --model model.onnx` runs an exported model (CPU;
export extra), and
`--backend openvino --model model.xml` an OpenVINO IR. `--slice 640 --overlap 0.2` detects each image in
overlapping 640-pixel windows merged class by class (small objects in large images; needs sahi).

Writes `<output-dir>/detections.json` (per image: boxes as absolute x1, y1, x2, y2 pixels, score,
category id, class name) and an annotated JPEG copy of each image. Runs on the CPU by default.
An image that cannot be read or processed does not stop the others: it is listed (with its reason) on
stdout and under "failed" in detections.json, and the exit status is then 1.
"""

from __future__ import annotations

import argparse
import sys

from detr_lab.engine.cli import (
    ToolError,
    add_backend_arguments,
    add_common_arguments,
    parse_backend_arguments,
    run_tool,
)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="infer.py", description=__doc__.splitlines()[0])
    parser.add_argument("inputs", nargs="+", metavar="IMAGE", help="image files and/or folders of images")
    add_backend_arguments(
        parser, checkpoint_help="detr_lab, Lightning or official DETR file (pytorch backend)", pretrained=True
    )
    parser.add_argument("--output-dir", default="detections", help="results folder (default detections/)")
    parser.add_argument("--score-threshold", type=float, default=0.5, help="keep detections scoring >= this")
    parser.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:1, auto")
    parser.add_argument("--batch-size", type=int, default=4, help="images per forward pass (default 4)")
    parser.add_argument("--config", help="YAML whose model must fit the checkpoint")
    parser.add_argument("--slice", type=int, metavar="PIXELS", help="sliced inference: window side in pixels")
    parser.add_argument("--overlap", type=float, help="with --slice: window overlap (default 0.2)")
    parser.add_argument("--slice-merge", choices=("nms", "nmm"),
                        help="with --slice: class-wise greedy non-maximum merging (default) or NMS")
    add_common_arguments(parser)
    args = parse_backend_arguments(parser, argv, pretrained=True)
    if args.slice is None and (args.overlap is not None or args.slice_merge is not None):
        parser.error("--overlap and --slice-merge set up --slice; add --slice PIXELS")
    args.overlap = 0.2 if args.overlap is None else args.overlap
    args.slice_merge = args.slice_merge or "nmm"
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    def body() -> None:
        from detr_lab.predict.infer import run_inference

        result = run_inference(
            args.inputs,
            args.checkpoint if args.checkpoint is not None else args.model,
            output_dir=args.output_dir,
            score_threshold=args.score_threshold,
            device=args.device,
            batch_size=args.batch_size,
            config_path=args.config,
            overrides=args.overrides,
            backend=args.backend,
            slice_size=args.slice,
            overlap=args.overlap,
            slice_merge=args.slice_merge,
            pretrained=args.backend == "pytorch" and args.model is not None,
        )
        for failure in result.failed:
            print(f"failed: {failure['error']}")
        print(f"detections of {len(result.images)} images written to {result.json_path}")
        if result.failed:
            total = len(result.images) + len(result.failed)
            raise ToolError(f"{len(result.failed)} of {total} images failed (listed under 'failed' in "
                            f"{result.json_path}); first: {result.failed[0]['error']}")

    return run_tool("infer.py", body, debug=args.debug)


if __name__ == "__main__":
    sys.exit(main())
