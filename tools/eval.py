"""COCO mAP of a checkpoint: `python tools/eval.py --config X.yaml --checkpoint CKPT [--split test]`.

The model comes from the checkpoint (detr_lab, Lightning or official DETR); the config gives the
dataset, whose validation split is evaluated, or its test split (`--split test`), or any COCO
annotation file with its images (`--annotations FILE --images DIR`). `--set model.*=...` overrides
reach the model. `--model NAME|FOLDER` evaluates a zoo model, a model folder written by
`save_pretrained` (a folder also works as `--checkpoint`) or a Hub repository. `--backend onnxruntime
--model model.onnx` evaluates an exported model instead (CPU; needs the export extra), with the same
batches; `--backend openvino --model model.xml` an OpenVINO IR.
Prints one summary line (AP, AP50, AP75, APs/m/l, AR100) and the per-class table (the 12-line COCOeval
table too with --verbose); writes the COCO results json (original category ids) and a report folder:
per-class AP / AP50 / AR100 CSV, a confusion matrix with background (CSV, PNG), PR curves per class.
`--save-pretrained FOLDER` also writes the evaluated model as a Hub-style folder whose model card holds
this evaluation and its report.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from detr_lab.engine.cli import (
    add_backend_arguments,
    add_common_arguments,
    add_print_config_argument,
    check_not_an_input,
    parse_backend_arguments,
    print_config,
    run_tool,
)
from detr_lab.engine.coco_backends import BACKENDS
from detr_lab.errors import InputError


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="eval.py", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="YAML config giving the dataset")
    add_backend_arguments(parser, pretrained=True,
                          checkpoint_help="checkpoint file or model folder to evaluate (pytorch backend)")
    parser.add_argument("--output", help="COCO results json (default <trainer.output_dir>/"
                        "coco_results-<model file name>-<path hash>.json)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ... (default auto)")
    parser.add_argument("--batch-size", type=int, help="images per forward pass (default data.batch_size)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    data = parser.add_argument_group("what to evaluate")
    data.add_argument("--split", choices=("val", "test"), default="val",
                      help="split of the config's dataset (default val; test: data.test_images / "
                      "data.test_annotations, or the data.yaml's test)")
    data.add_argument("--annotations", help="a COCO instances json to evaluate instead of a split")
    data.add_argument("--images", help="the image folder of --annotations")
    report = parser.add_argument_group("report")
    report.add_argument("--verbose", action="store_true", help="also print the 12-line COCOeval table")
    report.add_argument("--report-dir", help="report folder (default: beside the results json, its name "
                        "without .json + '-report')")
    report.add_argument("--no-report", action="store_true", help="no report folder and no per-class table")
    report.add_argument("--confusion-iou", type=float, default=0.5,
                        help="least IoU of a match in the confusion matrix (default 0.5)")
    report.add_argument("--confusion-score", type=float, default=0.3,
                        help="least score of a detection in the confusion matrix (default 0.3)")
    report.add_argument("--save-pretrained", metavar="FOLDER",
                        help="pytorch backend: also write the evaluated model as a Hub-style folder (config, "
                        "safetensors weights, classes, a model card with this evaluation and its report)")
    report.add_argument("--coco-backend", choices=BACKENDS, default="pycocotools",
                        help="COCO evaluation: pycocotools (default) or faster-coco-eval (the eval extra; "
                        "faster on large sets, same AP)")
    add_print_config_argument(parser)
    add_common_arguments(parser)
    args = parse_backend_arguments(parser, argv, pretrained=True)
    if (args.annotations is None) != (args.images is None):
        parser.error("--annotations and --images go together")
    if args.annotations is not None and args.split != "val":
        parser.error("--split and --annotations exclude each other")
    if args.save_pretrained is not None and args.backend != "pytorch":
        parser.error("--save-pretrained needs the pytorch backend (an exported model has no weights to save)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    def body() -> None:
        if args.print_config:
            print_config(args.config, args.overrides)
            return
        from detr_lab.checkpoints import split_model_overrides
        from detr_lab.config import load_config
        from detr_lab.engine.evaluate import EvalOptions, evaluate_checkpoint, evaluation_data, summary_line
        from detr_lab.predict.onnx_evaluation import evaluate_onnx
        from detr_lab.zoo import load_model_reference

        inputs = {"--config": args.config, "--checkpoint": args.checkpoint, "--model": args.model,
                  "--annotations": args.annotations, "--images": args.images}
        check_not_an_input(args.output, inputs, option="--output")
        check_not_an_input(args.save_pretrained, inputs, option="--save-pretrained")
        folder = Path(args.save_pretrained) if args.save_pretrained is not None else None
        if folder is not None and folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
            raise InputError(f"--save-pretrained {folder} exists and is not an empty folder; choose a new "
                             "one (nothing is written over an earlier model)")
        options = EvalOptions(
            split=args.split,
            annotations=args.annotations,
            images=args.images,
            backend=args.coco_backend,
            report=not args.no_report,
            report_dir=args.report_dir,
            confusion_iou=args.confusion_iou,
            confusion_score=args.confusion_score,
        )
        common = dict(
            overrides=args.overrides,
            output=args.output,
            batch_size=args.batch_size,
            progress=not args.no_progress,
            options=options,
        )
        pretrained = args.backend == "pytorch" and args.checkpoint is None  # --model NAME|FOLDER|REPO
        reference = args.model if args.checkpoint is None else args.checkpoint
        if args.backend in ("onnxruntime", "openvino"):
            if args.device not in ("auto", "cpu"):
                raise ValueError(f"--backend {args.backend} runs on the CPU; got --device {args.device}")
            result = evaluate_onnx(args.config, args.model, backend=args.backend, **common)
        else:
            model_overrides, data_overrides = split_model_overrides(args.overrides)
            evaluation_data(load_config(args.config, data_overrides), options)  # data errors first
            loaded = load_model_reference(reference, model_overrides, pretrained=pretrained)
            result = evaluate_checkpoint(args.config, loaded, device=args.device, source=reference,
                                         **{**common, "overrides": data_overrides})
        print(summary_line(result.stats, result.num_images, result.split))
        if args.verbose:
            print(result.summary, end="")
        if result.report is not None:
            print(result.report.table, end="")
            print(f"report: {result.report.folder} (per_class.csv, confusion_matrix.csv / .png at IoU "
                  f"{args.confusion_iou:g} and score {args.confusion_score:g}, pr_curves/)")
        print(f"COCO results written to {result.results_path}")
        if args.save_pretrained is not None:
            from detr_lab.engine.evaluate import SUMMARY_STATS
            from detr_lab.zoo import save_pretrained

            # loaded again: evaluation rewrote the first copy for inference (folded norms, traced backbone)
            loaded = load_model_reference(reference, model_overrides, pretrained=pretrained)
            evaluation = {key: round(result.stats[key], 4) for key in SUMMARY_STATS}
            evaluation.update(split=result.split, images=result.num_images, coco_backend=args.coco_backend)
            save_pretrained(folder, loaded, evaluation=evaluation,
                            source={"model" if pretrained else "checkpoint": str(reference)},
                            report=result.report.folder if result.report is not None else None)
            print(f"model folder written to {folder} (config.json, model.safetensors, README.md)")

    return run_tool("eval.py", body, debug=args.debug)


if __name__ == "__main__":
    sys.exit(main())
