"""COCO mAP of a checkpoint on the validation split of a config's dataset (behind `tools/eval.py`).

    result = evaluate_checkpoint("configs/detr_r50.yaml", "detr-r50.pth", output="results.json")
    print(result.summary)

The model (architecture, classes) comes from the checkpoint; the YAML gives the data settings. Model
overrides (`model.*=...`) are applied to the checkpoint's stored config, the others to the YAML.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from detr_lab.checkpoints import load_checkpoint
from detr_lab.config import Config, load_config
from detr_lab.data.datamodule import DetectionDataModule
from detr_lab.engine.cli import split_model_overrides
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


def resolve_device(device: str) -> torch.device:
    """"auto" -> CUDA when available, else CPU; anything else as torch.device (error if unavailable)."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device '{device}' requested but CUDA is not available")
    return resolved


@torch.inference_mode()
def predict_dataset(
    model: torch.nn.Module,
    postprocess: torch.nn.Module,
    loader: Iterable,
    evaluator: CocoEvaluator,
    device: torch.device,
    *,
    progress: bool = False,
) -> CocoEvaluator:
    """Feed every batch `(images, padding_mask, targets)` of `loader` through `model` (as it is: call
    `.eval()` first) and `postprocess`, adding the detections to `evaluator`; return it."""
    for images, padding_mask, targets in tqdm(loader, desc="evaluating", disable=not progress):
        outputs = model(images.to(device), padding_mask.to(device))
        orig_sizes = torch.stack([target["orig_size"] for target in targets]).to(device)  # [B, 2] (h, w)
        detections = postprocess(outputs, orig_sizes)
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
        output: where to write the COCO results json (default `<trainer.output_dir>/coco_results.json`).
        device: "auto", "cpu", "cuda", "cuda:1", ...
        batch_size: images per forward pass (default `data.batch_size`).
    """
    model_overrides, data_overrides = split_model_overrides(list(overrides))
    if batch_size is not None:
        data_overrides.append(f"data.batch_size={batch_size}")
    cfg = load_config(config_path, data_overrides)
    loaded = load_checkpoint(checkpoint, overrides=model_overrides)
    cfg = dataclasses.replace(cfg, model=loaded.config.model)

    datamodule = DetectionDataModule(cfg, category_ids=loaded.category_ids)
    datamodule.prepare_data()
    datamodule.setup("validate")
    evaluator = CocoEvaluator(datamodule.val_dataset.coco, loaded.category_ids)
    postprocess = build_postprocess(loaded.config.model)
    target_device = resolve_device(device)
    model = optimize_for_inference(loaded.model.to(target_device).eval())
    loader = datamodule.val_dataloader()
    predict_dataset(model, postprocess, loader, evaluator, target_device, progress=progress)
    stats = evaluator.compute()
    results_path = evaluator.write_results(output or Path(cfg.trainer.output_dir) / "coco_results.json")
    return EvaluationResult(stats, evaluator.summary_text(), results_path, len(evaluator.results), cfg)
