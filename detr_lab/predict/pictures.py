"""Predictions against ground truth on validation images (`tools/visualize.py predictions`).

    paths = validation_predictions("last.ckpt", "pictures/", num_images=4)
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from detr_lab.checkpoints import split_model_overrides
from detr_lab.config import load_config
from detr_lab.data.datamodule import DetectionDataModule
from detr_lab.engine.detect import DEFAULT_DEVICE, DEFAULT_SCORE_THRESHOLD
from detr_lab.errors import InputError
from detr_lab.predict.predictor import Predictor
from detr_lab.visualize.draw import draw_ground_truth_and_predictions, save_picture


def validation_predictions(
    checkpoint: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    config: str | os.PathLike | None = None,
    overrides: Sequence[str] = (),
    num_images: int = 4,
    score_threshold: float = DEFAULT_SCORE_THRESHOLD,
    device: str = DEFAULT_DEVICE,
) -> list[Path]:
    """Draw ground truth beside the predictions on the first `num_images` validation images.

    The dataset is `config`'s (default: the checkpoint's stored config), read with the checkpoint's
    class mapping; `model.*` overrides reach the checkpoint's model, the others the dataset config.
    Writes `<out_dir>/val_<image id>.png` (see `draw_ground_truth_and_predictions`); returns the paths.
    Raises:
        InputError: `num_images` < 1. InputNotFoundError: a missing checkpoint.
        DatasetError: an unreadable validation set.
    """
    if num_images < 1:
        raise InputError(f"--num-images must be >= 1, got {num_images}")
    _, other_overrides = split_model_overrides(overrides)
    predictor = Predictor.from_checkpoint(checkpoint, overrides=overrides, device=device, optimize=False)
    cfg = load_config(config, other_overrides) if config is not None else predictor.config
    datamodule = DetectionDataModule(cfg, category_ids=predictor.category_ids,
                                     class_names=predictor.class_names)
    datamodule.prepare_data()
    datamodule.setup("validate")
    dataset = datamodule.val_dataset
    paths = []
    for index in range(min(num_images, len(dataset))):
        sample = dataset.load_sample(index)
        detection = predictor.predict([sample.image], score_threshold=score_threshold)[0]
        picture = draw_ground_truth_and_predictions(
            sample.image, sample.boxes, sample.labels.tolist(), detection["boxes"].numpy(),
            detection["labels"].tolist(), detection["scores"].tolist(), predictor.class_names,
            score_threshold=score_threshold,
        )
        paths.append(save_picture(picture, Path(out_dir) / f"val_{sample.image_id}.png"))
    return paths
