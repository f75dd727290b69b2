"""COCO mAP of a checkpoint on a split of a config's dataset or any annotation file (behind `tools/eval.py`).

    result = evaluate_checkpoint("configs/detr_r50.yaml", "detr-r50.pth", output="results.json")
    print(result.summary)
    options = EvalOptions(split="test", report=True)   # or annotations=..., images=...
    result = evaluate_checkpoint("configs/my_data.yaml", "best.ckpt", options=options)
    print(summary_line(result.stats, result.num_images, result.split), result.report.table)

The model (architecture, classes) comes from the checkpoint; the YAML gives the data settings. Model
overrides (`model.*=...`) are applied to the checkpoint's stored config, the others to the YAML.
`evaluate_model` scores any ready detector; `detr_lab.predict.onnx_evaluation.evaluate_onnx` runs
it on an exported model (onnxruntime).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from detr_lab.checkpoints import LoadedCheckpoint, load_checkpoint, split_model_overrides
from detr_lab.config import Config, load_config
from detr_lab.data.coco import CocoDetectionDataset
from detr_lab.data.datamodule import DetectionDataModule
from detr_lab.data.errors import DatasetError
from detr_lab.engine.coco_backends import check_backend
from detr_lab.engine.detect import detect
from detr_lab.engine.devices import resolve_device
from detr_lab.engine.eval_report import EvaluationReport, write_report
from detr_lab.engine.evaluator import CocoEvaluator
from detr_lab.errors import InputError, InputNotFoundError
from detr_lab.models.build import build_postprocess
from detr_lab.models.optimize import optimize_for_inference


@dataclass(frozen=True)
class EvalOptions:
    """What to evaluate and what to write besides the results json.

    split: "val" or "test" of the config's dataset (`data.test_images` / `data.test_annotations`, or a
        YOLO data.yaml's `test`); ignored when `annotations` is given.
    annotations, images: any COCO instances json and its image folder, instead of a split (both or
        neither).
    backend: "pycocotools" or "faster-coco-eval" (the `eval` extra; see `engine.coco_backends`).
    report: write the report folder (per-class AP, confusion matrix, PR curves; `engine.eval_report`)
        to `report_dir`, by default beside the results json (`default_report_dir`).
    confusion_iou, confusion_score: the confusion matrix's IoU and score thresholds.
    """

    split: str = "val"
    annotations: str | os.PathLike | None = None
    images: str | os.PathLike | None = None
    backend: str = "pycocotools"
    report: bool = False
    report_dir: str | os.PathLike | None = None
    confusion_iou: float = 0.5
    confusion_score: float = 0.3

    @property
    def name(self) -> str:
        """What is evaluated, in file names and the summary line: the split or the annotation file's stem."""
        return Path(self.annotations).stem if self.annotations is not None else self.split


@dataclass
class EvaluationResult:
    stats: dict[str, float]  # the 12 COCOeval numbers by name (see evaluator.STAT_NAMES)
    summary: str  # the 12-line COCOeval summary
    results_path: Path  # COCO results json, original category ids
    num_images: int
    config: Config  # as evaluated: the checkpoint's model (with overrides), the YAML's data
    forward_passes: int = 0  # batches run through the model
    split: str = "val"  # what was evaluated: "val", "test" or the annotation file's stem
    report: EvaluationReport | None = None  # the report folder's content, when one was written


SUMMARY_STATS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR100")  # the summary line's numbers


def summary_line(stats: dict[str, float], num_images: int, name: str = "val") -> str:
    """One line: `<name>: AP 0.512  AP50 0.830  AP75 ...  APs ...  APm ...  APl ...  AR100 ...  (N images)`,
    `-` where COCOeval has nothing to measure (-1)."""
    numbers = "  ".join(f"{key} {stats[key]:.3f}" if stats[key] > -1 else f"{key} -" for key in SUMMARY_STATS)
    return f"{name}: {numbers}  ({num_images} images)"


def evaluation_data(cfg: Config, options: EvalOptions) -> Config:
    """`cfg` with the data to evaluate as its validation split: an explicit annotation file and image
    folder (`dataset: coco`, `format: coco`, absolute paths), or `cfg` unchanged (the split is chosen by
    `DetectionDataModule(eval_split=...)`). Checks the options first, so that a tool fails before
    loading a model.

    Raises:
        InputError: only one of annotations / images, a split other than val / test, the test split of
            the synthetic dataset (it has none), or an unknown COCO backend.
        MissingExtraError: faster-coco-eval asked for and not installed.
        InputNotFoundError: the annotation file or image folder does not exist.
    """
    check_backend(options.backend)
    if options.split not in ("val", "test"):
        raise InputError(f"evaluation split {options.split!r} is not 'val' or 'test'")
    if options.annotations is None and options.split == "test" and cfg.data.dataset == "synthetic":
        raise InputError("data.dataset 'synthetic' has no test split; evaluate another annotation file "
                           "(tools/eval.py --annotations FILE --images DIR)")
    if (options.annotations is None) != (options.images is None):
        raise InputError("give both an annotation file and an image folder (--annotations FILE --images DIR)")
    if options.annotations is None:
        return cfg
    annotations, images = Path(options.annotations).resolve(), Path(options.images).resolve()
    if not annotations.is_file():
        raise InputNotFoundError(f"annotation file not found: {options.annotations}")
    if not images.is_dir():
        raise InputNotFoundError(f"image folder not found: {options.images}")
    data = dataclasses.replace(cfg.data, dataset="coco", format="coco", val_annotations=str(annotations),
                               val_images=str(images))
    return dataclasses.replace(cfg, data=data)


class ModelMismatchWarning(UserWarning):
    """The YAML given to eval.py describes another model than the checkpoint holds."""


def default_results_path(cfg: Config, checkpoint: str | os.PathLike, name: str = "val") -> Path:
    """`<trainer.output_dir>/coco_results-<checkpoint stem>-<8 hex digits of its absolute path>.json`
    for the val split, with `-<name>` before `.json` for another split or annotation file."""
    resolved = Path(checkpoint).resolve()
    digest = hashlib.sha1(str(resolved).encode()).hexdigest()[:8]
    suffix = "" if name == "val" else f"-{name}"
    return Path(cfg.trainer.output_dir) / f"coco_results-{resolved.stem}-{digest}{suffix}.json"


def default_report_dir(results_path: str | os.PathLike) -> Path:
    """The report folder beside the results json: `<results json without .json>-report/`."""
    results_path = Path(results_path)
    return results_path.with_name(f"{results_path.stem}-report")


def _flatten(value, prefix: str = "") -> dict[str, object]:
    if dataclasses.is_dataclass(value):
        items = {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
        return {k: v for name, item in items.items() for k, v in _flatten(item, f"{prefix}{name}.").items()}
    return {prefix.rstrip("."): value}


def warn_model_differences(yaml_model, checkpoint_model, config_path, checkpoint) -> list[str]:
    """Warn (`ModelMismatchWarning`) when the YAML's model section differs from the checkpoint's, which
    is the one evaluated; return the differing keys. Backbone weight sources are not compared."""
    ignored = {"backbone.pretrained", "backbone.weights_path"}
    mine, theirs = _flatten(yaml_model), _flatten(checkpoint_model)
    differing = [key for key in mine if key not in ignored and mine[key] != theirs.get(key)]
    if differing:
        shown = ", ".join(f"model.{key}: {mine[key]!r} in the YAML, {theirs.get(key)!r} in the checkpoint"
                          for key in differing[:4])
        more = f" and {len(differing) - 4} more" if len(differing) > 4 else ""
        warnings.warn(f"{config_path}: the model section differs from {checkpoint}'s ({shown}{more}); "
                      "evaluating the checkpoint's model", ModelMismatchWarning, stacklevel=2)
    return differing


def check_something_to_evaluate(dataset: CocoDetectionDataset) -> None:
    """Raise `DatasetError` when COCOeval would have nothing to measure on `dataset` (every number -1):
    no images, or no non-crowd object among them."""
    if len(dataset) == 0:
        raise DatasetError(f"nothing to evaluate: {dataset.annotation_file} has no images")
    objects = sum(1 for ann in dataset.coco.dataset["annotations"] if not ann["iscrowd"])
    if objects == 0:
        raise DatasetError(f"nothing to evaluate: {dataset.annotation_file} has {len(dataset)} images but no "
                           "object (non-crowd annotation) to score detections against; every AP would be -1")


@torch.inference_mode()
def predict_dataset(
    model: Callable[[torch.Tensor, torch.Tensor], dict],
    postprocess: torch.nn.Module,
    loader: Iterable,
    evaluator: CocoEvaluator,
    device: torch.device,
    *,
    progress: bool = False,
) -> CocoEvaluator:
    """Feed every batch `(images, padding_mask, targets)` of `loader` through `model` (an `nn.Module` as
    it is: call `.eval()` first; or an onnxruntime `OnnxDetector`) and `postprocess` (see `detect`),
    adding the detections to `evaluator`; return it."""
    for images, padding_mask, targets in tqdm(loader, desc="evaluating", disable=not progress):
        orig_sizes = torch.stack([target["orig_size"] for target in targets])  # [B, 2] (h, w)
        detections = detect(model, postprocess, images, padding_mask, orig_sizes, device)
        by_image = zip(targets, detections, strict=True)
        evaluator.update({int(target["image_id"]): detection for target, detection in by_image})
    return evaluator


def evaluate_checkpoint(
    config_path: str | os.PathLike,
    checkpoint: str | os.PathLike | LoadedCheckpoint,
    *,
    overrides: Sequence[str] = (),
    output: str | os.PathLike | None = None,
    device: str = "auto",
    batch_size: int | None = None,
    progress: bool = True,
    options: EvalOptions | None = None,
    source: str | os.PathLike | None = None,
) -> EvaluationResult:
    """Run the checkpoint's model over a split (or annotation file), score it with COCOeval, write the
    results json (and the report folder with `options.report`).

    Args:
        config_path: YAML config giving the dataset (`data.*`); its `model` section is not used.
        checkpoint: any checkpoint `load_checkpoint` reads (detr_lab, Lightning, official DETR), or a
            model already loaded, e.g. by `detr_lab.zoo.load_model_reference` (a model folder, a zoo
            name), named by `source`.
        source: what `checkpoint` was loaded from when it is a `LoadedCheckpoint` (names the default
            results json and the warnings); default the checkpoint's path.
        overrides: dotted `key=value`; `model.*` ones go to the checkpoint's config.
        output: where to write the COCO results json (default: `default_results_path`, one file per
            checkpoint, so evaluating another checkpoint with the same YAML does not overwrite it).
        device: "auto", "cpu", "cuda", "cuda:1", ...
        batch_size: images per forward pass (default `data.batch_size`).
        options: the split or annotation file, the COCO backend, the report (see `EvalOptions`).
    Raises:
        InputError, InputNotFoundError: see `evaluation_data`, or `model.*` overrides with a loaded
        model; DatasetError: an unreadable set.
    """
    options = options or EvalOptions()
    model_overrides, data_overrides = split_model_overrides(list(overrides))
    if batch_size is not None:
        data_overrides.append(f"data.batch_size={batch_size}")
    cfg = evaluation_data(load_config(config_path, data_overrides), options)  # checked before the model loads
    if isinstance(checkpoint, LoadedCheckpoint):
        if model_overrides:
            raise InputError(f"{', '.join(model_overrides)}: a loaded model's overrides are applied when it "
                             "is loaded (e.g. load_model_reference(reference, overrides))")
        loaded, checkpoint = checkpoint, source if source is not None else "the given model"
    else:
        loaded = load_checkpoint(checkpoint, overrides=model_overrides)
    warn_model_differences(cfg.model, loaded.config.model, config_path, checkpoint)
    cfg = dataclasses.replace(cfg, model=loaded.config.model)

    target_device = resolve_device(device)
    model = optimize_for_inference(loaded.model.to(target_device).eval())
    return evaluate_model(cfg, model, loaded.category_ids, target_device, output=output, progress=progress,
                          source=checkpoint, class_names=loaded.class_names, options=options)


def evaluate_model(
    cfg: Config,
    model: Callable[[torch.Tensor, torch.Tensor], dict],
    category_ids: Sequence[int],
    device: torch.device,
    *,
    output: str | os.PathLike | None,
    progress: bool,
    source: str | os.PathLike,
    class_names: Sequence[str] | None = None,
    options: EvalOptions | None = None,
) -> EvaluationResult:
    """Predict the val split of `cfg.data` (or `options.split`) with `model`, score it with COCOeval,
    write the results json and, with `options.report`, the report folder.

    Args:
        cfg: the data settings to evaluate on and the model config (its post-processing).
        model: a ready detector on `device` in eval mode (see `detect`), e.g. an optimized `nn.Module`
            or an onnxruntime `OnnxDetector`.
        category_ids: the dataset category id of each class index.
        output: the results json (default `default_results_path(cfg, source, options.name)`).
        source: the model's file, naming the default results json.
        class_names: the names of `category_ids`; a YOLO set whose class indices differ from them is
            then mapped by name (see `DetectionDataModule`).
        options: see `EvalOptions` (`annotations` / `images` must already be in `cfg`, see
            `evaluation_data`).
    Raises:
        DatasetError: an unreadable evaluation set (see `DetectionDataModule`), or one with nothing to
            evaluate: no images, or no object (non-crowd annotation) to score the detections against.
        InputError / MissingExtraError: an unknown backend, or faster-coco-eval not installed.
    """
    options = options or EvalOptions()
    check_backend(options.backend)
    split = "val" if options.annotations is not None else options.split
    datamodule = DetectionDataModule(
        cfg, category_ids=list(category_ids), class_names=class_names, eval_split=split
    )
    datamodule.prepare_data()
    datamodule.setup("validate")
    check_something_to_evaluate(datamodule.val_dataset)
    evaluator = CocoEvaluator(datamodule.val_dataset.coco, list(category_ids), backend=options.backend)
    postprocess = build_postprocess(cfg.model)
    loader = datamodule.val_dataloader()
    predict_dataset(model, postprocess, loader, evaluator, device, progress=progress)
    stats = evaluator.compute()
    results_path = evaluator.write_results(output or default_results_path(cfg, source, options.name))
    report = None
    if options.report:
        folder = options.report_dir or default_report_dir(results_path)
        report = write_report(folder, evaluator, iou_threshold=options.confusion_iou,
                              score_threshold=options.confusion_score)
    return EvaluationResult(stats, evaluator.summary_text(), results_path, len(evaluator.results), cfg,
                            forward_passes=len(loader), split=options.name, report=report)
