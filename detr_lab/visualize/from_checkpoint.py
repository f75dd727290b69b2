"""Pictures from a checkpoint (behind `tools/visualize.py`): validation predictions, attention.

The model is loaded without the inference rewrites of `optimize_for_inference`, so that the hooks
of `detr_lab.visualize.capture` see the attention modules as built.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from detr_lab.checkpoints import load_checkpoint
from detr_lab.config import load_config
from detr_lab.data.datamodule import DetectionDataModule
from detr_lab.data.images import load_rgb_image
from detr_lab.engine.cli import ToolError, split_model_overrides
from detr_lab.engine.evaluate import resolve_device
from detr_lab.engine.inference import Predictor
from detr_lab.visualize.draw import draw_detections


def load_predictor(
    checkpoint: str | os.PathLike, *, overrides: Sequence[str] = (), device: str = "cpu"
) -> Predictor:
    """A `Predictor` of any checkpoint `load_checkpoint` reads, not optimized (hooks see every module).

    `model.*` overrides reach the checkpoint's stored config (e.g. `model.encoder.attention=act`).
    Raises:
        ToolError: the checkpoint file does not exist.
    """
    path = Path(checkpoint)
    if not path.is_file():
        raise ToolError(f"checkpoint not found: {path}")
    model_overrides, _ = split_model_overrides(list(overrides))
    loaded = load_checkpoint(path, overrides=model_overrides)
    return Predictor(loaded.model, loaded.config, loaded.category_ids, loaded.class_names,
                     resolve_device(device), optimize=False)


def model_input(predictor: Predictor, image_path: str | os.PathLike) -> torch.Tensor:
    """An image file through the predictor's evaluation transform: normalized float `[3, H, W]`."""
    rgb = load_rgb_image(image_path)
    image, _, _ = predictor.transform(rgb, np.zeros((0, 4), np.float32), np.zeros((0,), np.int64))
    return image.to(predictor.device)


def validation_predictions(
    checkpoint: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    config: str | os.PathLike | None = None,
    overrides: Sequence[str] = (),
    num_images: int = 4,
    score_threshold: float = 0.5,
    device: str = "cpu",
) -> list[Path]:
    """Draw predictions against ground truth on the first `num_images` validation images.

    The dataset is `config`'s (default: the checkpoint's stored config), read with the checkpoint's
    class mapping. Writes `<out_dir>/val_<image id>.png`; returns the paths.
    """
    if num_images < 1:
        raise ToolError(f"--num-images must be >= 1, got {num_images}")
    predictor = load_predictor(checkpoint, overrides=overrides, device=device)
    _, other_overrides = split_model_overrides(list(overrides))
    cfg = load_config(config, other_overrides) if config is not None else predictor.config
    datamodule = DetectionDataModule(cfg, category_ids=predictor.category_ids)
    datamodule.prepare_data()
    datamodule.setup("validate")
    dataset = datamodule.val_dataset
    paths = []
    for index in range(min(num_images, len(dataset))):
        sample = dataset.load_sample(index)
        detection = predictor.predict([sample.image])[0]
        paths.append(draw_detections(
            sample.image, Path(out_dir) / f"val_{sample.image_id}.png",
            gt_boxes=sample.boxes, gt_labels=sample.labels,
            boxes=detection["boxes"].numpy(), labels=detection["labels"].numpy(),
            scores=detection["scores"].numpy(), class_names=predictor.class_names,
            score_threshold=score_threshold, title=f"{sample.path.name} (image id {sample.image_id}):",
        ))
    return paths
