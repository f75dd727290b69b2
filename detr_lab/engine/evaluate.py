"""COCO mAP of a checkpoint on the validation split of a config's dataset (behind `tools/eval.py`).

    result = evaluate_checkpoint("configs/detr_r50.yaml", "detr-r50.pth", output="results.json")
    print(result.summary)

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

from detr_lab.checkpoints import load_checkpoint, split_model_overrides
from detr_lab.config import Config, load_config
from detr_lab.data.coco import CocoDetectionDataset
from detr_lab.data.datamodule import DetectionDataModule
from detr_lab.data.errors import DatasetError
from detr_lab.engine.detect import detect
from detr_lab.engine.devices import resolve_device
from detr_lab.engine.evaluator import CocoEvaluator
from detr_lab.models.build import build_postprocess
from detr_lab.models.optimize import optimize_for_inference


@dataclass
class EvaluationResult:
    stats: dict[str, float]  # the 12 COCOeval numbers by name (see evaluator.STAT_NAMES)
    summary: str  # the 12-line COCOeval summary
    results_path: Path  # COCO results json, original category ids
    num_images: int
    config: Config  # as evaluated: the checkpoint's model (with overrides), the YAML's data
    forward_passes: int = 0  # batches run through the model


class ModelMismatchWarning(UserWarning):
    """The YAML given to eval.py describes another model than the checkpoint holds."""


def default_results_path(cfg: Config, checkpoint: str | os.PathLike) -> Path:
    """`<trainer.output_dir>/coco_results-<checkpoint stem>-<8 hex digits of its absolute path>.json`."""
    resolved = Path(checkpoint).resolve()
    digest = hashlib.sha1(str(resolved).encode()).hexdigest()[:8]
    return Path(cfg.trainer.output_dir) / f"coco_results-{resolved.stem}-{digest}.json"


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
    checkpoint: str | os.PathLike,
    *,
    overrides: Sequence[str] = (),
    output: str | os.PathLike | None = None,
    device: str = "auto",
    batch_size: int | None = None,
    progress: bool = True,
) -> EvaluationResult:
    """Run the checkpoint's model over the val split, score it with COCOeval, write the results json.

    Args:
        config_path: YAML config giving the dataset (`data.*`); its `model` section is not used.
        checkpoint: any checkpoint `load_checkpoint` reads (detr_lab, Lightning, official DETR).
        overrides: dotted `key=value`; `model.*` ones go to the checkpoint's config.
        output: where to write the COCO results json (default: `default_results_path`, one file per
            checkpoint, so evaluating another checkpoint with the same YAML does not overwrite it).
        device: "auto", "cpu", "cuda", "cuda:1", ...
        batch_size: images per forward pass (default `data.batch_size`).
    """
    model_overrides, data_overrides = split_model_overrides(list(overrides))
    if batch_size is not None:
        data_overrides.append(f"data.batch_size={batch_size}")
    cfg = load_config(config_path, data_overrides)
    loaded = load_checkpoint(checkpoint, overrides=model_overrides)
    warn_model_differences(cfg.model, loaded.config.model, config_path, checkpoint)
    cfg = dataclasses.replace(cfg, model=loaded.config.model)

    target_device = resolve_device(device)
    model = optimize_for_inference(loaded.model.to(target_device).eval())
    return evaluate_model(cfg, model, loaded.category_ids, target_device, output=output, progress=progress,
                          source=checkpoint, class_names=loaded.class_names)


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
) -> EvaluationResult:
    """Predict the val split of `cfg.data` with `model`, score it with COCOeval, write the results json.

    Args:
        cfg: the data settings to evaluate on and the model config (its post-processing).
        model: a ready detector on `device` in eval mode (see `detect`), e.g. an optimized `nn.Module`
            or an onnxruntime `OnnxDetector`.
        category_ids: the dataset category id of each class index.
        output: the results json (default `default_results_path(cfg, source)`).
        source: the model's file, naming the default results json.
        class_names: the names of `category_ids`; a YOLO set whose class indices differ from them is
            then mapped by name (see `DetectionDataModule`).
    Raises:
        DatasetError: an unreadable validation set (see `DetectionDataModule`), or one with nothing to
            evaluate: no images, or no object (non-crowd annotation) to score the detections against.
    """
    datamodule = DetectionDataModule(cfg, category_ids=list(category_ids), class_names=class_names)
    datamodule.prepare_data()
    datamodule.setup("validate")
    check_something_to_evaluate(datamodule.val_dataset)
    evaluator = CocoEvaluator(datamodule.val_dataset.coco, list(category_ids))
    postprocess = build_postprocess(cfg.model)
    loader = datamodule.val_dataloader()
    predict_dataset(model, postprocess, loader, evaluator, device, progress=progress)
    stats = evaluator.compute()
    results_path = evaluator.write_results(output or default_results_path(cfg, source))
    return EvaluationResult(stats, evaluator.summary_text(), results_path, len(evaluator.results), cfg,
                            forward_passes=len(loader))
