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
from tqdm import tqdm

from detr_lab.config import AugmentConfig
from detr_lab.data.errors import DatasetError
from detr_lab.data.images import load_rgb_image
from detr_lab.data.transforms import eval_resized_size
from detr_lab.engine.detect import DEFAULT_DEVICE, DEFAULT_SCORE_THRESHOLD
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


def annotated_names(paths: Sequence[Path], output_dir: Path) -> dict[Path, str]:
    """The file name of each image's annotated copy in `output_dir`: `<stem>.jpg`, then `<stem>_1.jpg`,
    ... where stems repeat (in input order).

    Raises:
        InputError: a copy would replace one of the input images (e.g. `--output-dir` is the input
            folder and an input is a `.jpg`); the message names both and the way out.
    """
    used: set[str] = set()
    names: dict[Path, str] = {}
    for path in paths:
        name, index = f"{path.stem}.jpg", 1
        while name in used:
            name, index = f"{path.stem}_{index}.jpg", index + 1
        used.add(name)
        names[path] = name
    inputs = {os.path.realpath(path) for path in paths}  # realpath: no error on link loops
    for path, name in names.items():
        if os.path.realpath(output_dir / name) in inputs:
            raise InputError(
                f"--output-dir {output_dir}: the annotated copy of {path} would replace the input image "
                f"{output_dir / name}; choose an output folder that holds no input image"
            )
    return names


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
    score_threshold: float = DEFAULT_SCORE_THRESHOLD,
    device: str = DEFAULT_DEVICE,
    batch_size: int = 4,
    config_path: str | os.PathLike | None = None,
    overrides: Sequence[str] = (),
    backend: str = "pytorch",
    pretrained: bool = False,
    draw: bool = True,
    progress: bool | None = False,
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
    "failed" with its reason and the others go on. The json is written when the run starts (replacing
    an earlier run's), then every 16 images or 10 s while running, and once at the end, also when the
    run stops on an error or an interrupt ("complete" is then false). No output replaces an input:
    a folder whose annotated copies would land on input images is refused before anything is written.

    Batches hold images of one resized size only (see `same_size_groups`), so no image is padded and
    each image's detections do not depend on `batch_size` or on the other inputs.

    `draw` False writes the json only (its "annotated" entries are null); `progress` shows a bar of
    the images done on stderr (None: only when stderr is a terminal).
    Raises:
        InputNotFoundError: a missing named image or model file. InputError: a bad argument, or an
            output folder where an annotated copy would replace an input image.
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
    output_dir = Path(output_dir)
    # refuses to write over an input image (no pictures with draw=False: nothing to refuse)
    names = annotated_names(found.paths, output_dir) if draw else {}
    if backend != "pytorch":
        predictor = Predictor.from_exported(backend, checkpoint, overrides=overrides)
    elif pretrained:
        predictor = Predictor.from_pretrained(checkpoint, overrides=overrides, device=device)
    else:
        predictor = Predictor.from_checkpoint(
            checkpoint, config_path=config_path, overrides=overrides, device=device
        )
    output_dir.mkdir(parents=True, exist_ok=True)
    header = {"checkpoint": str(checkpoint), "score_threshold": score_threshold,
              "images_to_process": len(found.paths)}
    writer = DetectionsWriter(output_dir / DETECTIONS_FILE, header)
    writer.failed.extend(found.failed)
    writer.start()  # an earlier run's json is replaced before the first new picture
    complete = False
    disable = None if progress is None else not progress  # None: tqdm shows it on a terminal only
    bar = tqdm(total=len(found.paths), desc="infer", unit="img", disable=disable, leave=False)
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
                    name = names[path] if draw else None
                    if name is not None:
                        boxes, labels = detection["boxes"].numpy(), detection["labels"].tolist()
                        annotated = draw_detections(image, boxes, labels, predictor.class_names,
                                                    scores=detection["scores"].tolist())
                        save_picture(annotated, output_dir / name, quality=92)
                    height, width = image.shape[:2]
                    writer.images.append({
                        "file": str(path), "width": width, "height": height, "annotated": name,
                        "detections": detection_records(detection),
                    })
                    writer.flush()  # by count and time
            bar.update(len(found.paths[start : start + batch_size]))
            writer.flush()
        complete = True
    finally:
        bar.close()
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
