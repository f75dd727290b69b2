"""Detection on image files with annotated copies and a json (`tools/infer.py` calls `run_inference`).

    result = run_inference(["photos/"], "runs/demo/checkpoints/last.ckpt", output_dir="detections")
    result = run_inference(["a.jpg"], "model.onnx", backend="onnxruntime")
    result = run_inference(["big.jpg"], "model.xml", backend="openvino", slice_size=640, overlap=0.2)
    result = run_inference(["a.jpg"], "dino-4scale-r50", pretrained=True)  # zoo name, model folder, Hub id

See `detections_file` for the json; each annotated copy is a JPEG drawn by
`detr_lab.visualize.draw.draw_detections`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from detr_lab.config import AugmentConfig
from detr_lab.data.errors import DatasetError
from detr_lab.data.images import load_rgb_image
from detr_lab.data.transforms import eval_resized_size
from detr_lab.errors import InputError
from detr_lab.predict.detections_file import (
    DETECTIONS_FILE,
    DetectionsWriter,
    detection_records,
    failure_record,
)
from detr_lab.predict.inputs import collect_images
from detr_lab.predict.predictor import Predictor
from detr_lab.predict.slicing import check_slicing
from detr_lab.visualize.draw import draw_detections, save_picture

BACKENDS = ("pytorch", "onnxruntime", "openvino")


@dataclass
class InferenceResult:
    """What `run_inference` did: the json written, the images with detections, the images that failed."""

    json_path: Path
    images: list[dict]  # as in the json's "images"
    failed: list[dict]  # {"file", "error"}, as in the json's "failed"


def _output_name(path: Path, used: set[str]) -> str:
    name, index = f"{path.stem}.jpg", 1
    while name in used:
        name, index = f"{path.stem}_{index}.jpg", index + 1
    used.add(name)
    return name


def _predict_each(predictor: Predictor, group: list[tuple[Path, np.ndarray]], score_threshold: float,
                  slicing: dict | None = None):
    """(path, image, detection or None, failure or None) per image: the group in one batch, or, if the
    batch fails, each image alone so that one bad image does not take the others with it. `slicing`:
    `Predictor.predict`'s slicing arguments (each image then runs in windows)."""
    try:
        detections = predictor.predict([image for _, image in group], score_threshold=score_threshold,
                                       **(slicing or {}))
        return [(path, image, det, None) for (path, image), det in zip(group, detections, strict=True)]
    except Exception as err:
        if len(group) == 1:
            path, image = group[0]
            return [(path, image, None, failure_record(path, err))]
    return [row for item in group for row in _predict_each(predictor, [item], score_threshold, slicing)]


def _check_arguments(
    batch_size: int, score_threshold: float, backend: str, config_path: object, device: str
) -> None:
    if batch_size < 1:
        raise InputError(f"--batch-size must be >= 1, got {batch_size}")
    if not 0.0 <= score_threshold <= 1.0:
        raise InputError(f"--score-threshold must be in [0, 1], got {score_threshold}")
    if backend not in BACKENDS:
        raise InputError(f"--backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if backend != "pytorch" and (config_path is not None or device not in ("cpu", "auto")):
        raise InputError(f"--backend {backend} takes no --config (the model is fixed) and runs on the CPU")


def run_inference(
    inputs: Sequence[str | os.PathLike],
    checkpoint: str | os.PathLike,
    *,
    output_dir: str | os.PathLike = "detections",
    score_threshold: float = 0.5,
    device: str = "cpu",
    batch_size: int = 4,
    config_path: str | os.PathLike | None = None,
    overrides: Sequence[str] = (),
    backend: str = "pytorch",
    pretrained: bool = False,
    slice_size: int | None = None,
    overlap: float = 0.2,
    slice_merge: str = "nmm",
) -> InferenceResult:
    """Detect objects in images; write `<output_dir>/detections.json` and an annotated JPEG per image.

    `checkpoint` is the model file: a checkpoint (backend "pytorch"), an exported `.onnx` file (backend
    "onnxruntime": CPU, no `config_path`, data overrides only), or an OpenVINO `.xml` IR (backend
    "openvino", the same restrictions); all write the same outputs.
    With `pretrained`, `checkpoint` is what `Predictor.from_pretrained` takes instead: a zoo name, a
    Hub-style model folder or a Hub repository id (pytorch backend, no `config_path`).
    With `slice_size`, each image runs in overlapping `slice_size` windows merged class by class
    (`Predictor.predict`).

    Every image that could be read has its detections in the json (see `detections_file`); an image
    that cannot be decoded or processed (truncated file, broken link in a folder...) is listed under
    "failed" with its reason and the others go on. The json is rewritten every 30 s while running and
    once at the end, also when the run stops on an error or an interrupt ("complete" is then false).

    Batches hold images of one resized size only (see `same_size_groups`), so no image is padded and
    each image's detections do not depend on `batch_size` or on the other inputs.
    Raises:
        InputNotFoundError: a missing named image or model file. InputError: a bad argument.
        CheckpointError / ConfigError: a checkpoint that does not fit the config.
    """
    _check_arguments(batch_size, score_threshold, backend, config_path, device)
    slicing = None
    if slice_size is not None:
        check_slicing(slice_size, overlap, slice_merge)
        slicing = {"slice_size": slice_size, "overlap": overlap, "slice_merge": slice_merge}
    found = collect_images(inputs)
    if pretrained and (backend != "pytorch" or config_path is not None):
        raise InputError("--model NAME|FOLDER runs on the pytorch backend and takes no --config")
    if backend != "pytorch":
        predictor = Predictor.from_exported(backend, checkpoint, overrides=overrides)
    elif pretrained:
        predictor = Predictor.from_pretrained(checkpoint, overrides=overrides, device=device)
    else:
        predictor = Predictor.from_checkpoint(
            checkpoint, config_path=config_path, overrides=overrides, device=device
        )
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    header = {"checkpoint": str(checkpoint), "score_threshold": score_threshold}
    writer = DetectionsWriter(output_dir / DETECTIONS_FILE, header)
    writer.failed.extend(found.failed)
    used: set[str] = set()
    complete = False
    try:
        for start in range(0, len(found.paths), batch_size):
            decoded = []
            for path in found.paths[start : start + batch_size]:
                try:
                    decoded.append((path, load_rgb_image(path)))
                except DatasetError as err:  # missing since listed, truncated, not an image
                    writer.failed.append(failure_record(path, err))
            for group in same_size_groups(decoded, predictor.config.data.augment):
                rows = _predict_each(predictor, group, score_threshold, slicing)
                for path, image, detection, failure in rows:
                    if failure is not None:
                        writer.failed.append(failure)
                        continue
                    name = _output_name(path, used)
                    boxes, labels = detection["boxes"].numpy(), detection["labels"].tolist()
                    annotated = draw_detections(image, boxes, labels, predictor.class_names,
                                                scores=detection["scores"].tolist())
                    save_picture(annotated, output_dir / name, quality=92)
                    height, width = image.shape[:2]
                    writer.images.append({
                        "file": str(path), "width": width, "height": height, "annotated": name,
                        "detections": detection_records(detection),
                    })
            writer.flush()
        complete = True
    finally:
        writer.flush(force=True, complete=complete)
    return InferenceResult(writer.path, writer.images, writer.failed)


def same_size_groups(
    images: Sequence[tuple[Path, np.ndarray]], augment: AugmentConfig
) -> list[list[tuple[Path, np.ndarray]]]:
    """Split (path, uint8 [H, W, 3] image) pairs into groups whose evaluation-resized sizes are equal
    (order kept within a group; groups in order of first appearance). A batch of one group needs no
    padding, and padding changes DETR's outputs (facebookresearch/detr #217)."""
    groups: dict[tuple[int, int], list[tuple[Path, np.ndarray]]] = {}
    for path, image in images:
        size = eval_resized_size(image.shape[0], image.shape[1], augment)
        groups.setdefault(size, []).append((path, image))
    return list(groups.values())
