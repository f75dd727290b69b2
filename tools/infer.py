"""Detect objects in images: `python tools/infer.py IMAGE|FOLDER [...] --checkpoint CKPT [--output-dir DIR]`.

`--model NAME|FOLDER` runs a zoo model (e.g. `dino-4scale-r50`: downloaded once into
`$DETR_LAB_CACHE_DIR`, hash checked, converted), a Hub-style model folder or a Hub repository id
instead of a checkpoint. `--backend onnxruntime --model model.onnx` runs an exported model (CPU;
export extra), and
`--backend openvino --model model.xml` an OpenVINO IR. `--slice 640 --overlap 0.2` detects each image in
overlapping 640-pixel windows merged class by class (small objects in large images; needs sahi).

Writes `<output-dir>/detections.json` (per image: boxes as absolute x1, y1, x2, y2 pixels, score,
category id, class name) and an annotated JPEG copy of each image (`--no-images`: the json only).
Keeps detections scoring >= 0.3 by default (the library's `DEFAULT_SCORE_THRESHOLD`), runs on CUDA when
available (`--device auto`), and shows the images done on a terminal (`--no-progress`: quiet).
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
    add_print_config_argument,
    parse_backend_arguments,
    print_config,
    run_tool,
)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="infer.py", description=__doc__.splitlines()[0])
    parser.add_argument("inputs", nargs="+", metavar="IMAGE", help="image files and/or folders of images")
    add_backend_arguments(
        parser, checkpoint_help="detr_lab, Lightning or official DETR file (pytorch backend)", pretrained=True
    )
    parser.add_argument("--output-dir", default="detections", help="results folder (default detections/)")
    parser.add_argument("--score-threshold", type=float, help="keep detections scoring >= this (default 0.3)")
    parser.add_argument("--device", default="auto",
                        help="auto (default: CUDA when available), cpu, cuda, cuda:1")
    parser.add_argument("--no-images", action="store_true",
                        help="write detections.json only, no annotated copies")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--batch-size", type=int, default=4, help="images per forward pass (default 4)")
    parser.add_argument("--config", help="YAML whose model must fit the checkpoint")
    add_print_config_argument(parser)
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
        if args.print_config:
            print_config(args.config, args.overrides)
            return
        from detr_lab.engine.detect import DEFAULT_SCORE_THRESHOLD
        from detr_lab.predict.infer import run_inference

        threshold = DEFAULT_SCORE_THRESHOLD if args.score_threshold is None else args.score_threshold
        result = run_inference(
            args.inputs,
            args.checkpoint if args.checkpoint is not None else args.model,
            output_dir=args.output_dir,
            score_threshold=threshold,
            device=args.device,
            batch_size=args.batch_size,
            config_path=args.config,
            overrides=args.overrides,
            backend=args.backend,
            slice_size=args.slice,
            overlap=args.overlap,
            slice_merge=args.slice_merge,
            pretrained=args.backend == "pytorch" and args.model is not None,
            draw=not args.no_images,
            progress=False if args.no_progress else None,  # a bar on a terminal
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
