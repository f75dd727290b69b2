"""Detection on images with a checkpoint or an exported ONNX model: the Python prediction API.

    from detr_lab.engine.inference import Predictor

    predictor = Predictor.from_checkpoint("runs/demo/checkpoints/last.ckpt")   # PyTorch, no Lightning
    predictor = Predictor.from_onnx("model.onnx")                               # or onnxruntime
    for detections in predictor.predict(["a.jpg", pil_image, rgb_array], score_threshold=0.5):
        detections["boxes"], detections["scores"], detections["category_ids"], detections["class_names"]

Images go through the model config's evaluation transform (shorter side `eval_size`, longer side
<= `eval_max_size`, normalization) and are batched with zero padding and a padding mask, exactly as
validation batches are. Boxes come back as absolute (x1, y1, x2, y2) pixels of each original image.
`run_inference` (behind `tools/infer.py`) writes them as JSON with annotated copies of the images.
"""

from __future__ import annotations

import colorsys
import dataclasses
import errno
import json
import os
import stat
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from detr_lab.checkpoints import apply_overrides, load_checkpoint, load_state_exactly
from detr_lab.config import AugmentConfig, Config, load_config
from detr_lab.data.collate import pad_images
from detr_lab.data.errors import DatasetError
from detr_lab.data.images import load_rgb_image, pil_to_rgb_array
from detr_lab.data.transforms import build_eval_transform, shorter_side_size
from detr_lab.engine.cli import ToolError, split_model_overrides
from detr_lab.engine.devices import resolve_device
from detr_lab.export.runtime import OnnxDetector
from detr_lab.models.build import build_model, build_postprocess
from detr_lab.models.optimize import optimize_for_inference

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif")
DETECTIONS_FILE = "detections.json"


@dataclass
class InputImages:
    """What `collect_images` found: readable-looking image paths, and entries that cannot be read at all."""

    paths: list[Path]
    failed: list[dict]  # {"file", "error" (one line naming the file)}: dangling links, link loops, non-files


def _folder_entries(folder: Path) -> tuple[list[Path], list[dict]]:
    """Image files of `folder` (by suffix, sorted, not recursive); broken links and non-files are reported."""
    found, failed = [], []
    for entry in sorted(folder.iterdir()):
        is_image = entry.suffix.lower() in IMAGE_SUFFIXES
        try:
            target = entry.stat()  # follows symbolic links
        except OSError as err:  # dangling link, link loop, permission
            kind = "symbolic link loop" if err.errno == errno.ELOOP else (
                "dangling symbolic link" if entry.is_symlink() else "unreadable entry")
            failed.append({"file": str(entry), "error": f"{entry}: {kind}: {err.strerror or err}"})
            continue
        if not is_image:
            continue
        if stat.S_ISREG(target.st_mode):
            found.append(entry)
        elif not stat.S_ISDIR(target.st_mode):
            failed.append({"file": str(entry), "error": f"{entry}: not a regular file"})
    return found, failed


def collect_images(inputs: Sequence[str | os.PathLike]) -> InputImages:
    """Image files named on the command line; a folder contributes its image files (sorted, not recursive).

    In a folder, a symbolic link that does not resolve (dangling, or a loop) is listed in `failed`
    with its reason, whatever its name; files without an image suffix are not images and are ignored.
    Raises:
        ToolError: a named path that does not exist, or a folder with neither image files nor broken
            entries.
    """
    paths: list[Path] = []
    failed: list[dict] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found, broken = _folder_entries(path)
            if not found and not broken:
                raise ToolError(f"no image files ({', '.join(IMAGE_SUFFIXES)}) in folder {path}")
            paths.extend(found)
            failed.extend(broken)
        elif path.is_file():
            paths.append(path)
        else:
            raise ToolError(f"image not found: {path}")
    if not paths and not failed:
        raise ToolError("no input images given")
    return InputImages(paths, failed)


ImageInput = str | os.PathLike | Image.Image | np.ndarray


def to_rgb_array(image: ImageInput) -> np.ndarray:
    """A path, PIL image or array -> uint8 `[H, W, 3]` RGB.

    Arrays may be uint8 `[H, W, 3]` RGB or `[H, W]` grayscale (replicated to three channels).
    Raises:
        ToolError: a missing file; CorruptImageError: an unreadable one; ValueError: an array of
        another dtype or shape.
    """
    if isinstance(image, (str, os.PathLike)):
        path = Path(image)
        if not path.is_file():
            raise ToolError(f"image not found: {path}")
        return load_rgb_image(path)
    if isinstance(image, Image.Image):
        return pil_to_rgb_array(image)
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or not (image.ndim == 2 or (image.ndim == 3 and image.shape[2] == 3)):
            raise ValueError(
                f"image arrays must be uint8 [H, W, 3] RGB or [H, W] gray, got {image.dtype} {image.shape}"
            )
        return np.repeat(image[..., None], 3, axis=2) if image.ndim == 2 else image
    raise ValueError(f"images must be paths, PIL images or numpy arrays, got {type(image).__name__}")


@dataclass
class Predictor:
    """A model, its post-processing and its evaluation transform, ready for `predict`.

    `model` is an `nn.Module` detector (PyTorch backend) or an `OnnxDetector` (onnxruntime backend,
    CPU); build one with `from_checkpoint` or `from_onnx`. With `optimize` (default) a PyTorch model
    is rewritten in place by `optimize_for_inference` (same outputs, faster; not to be trained or
    saved afterwards).
    """

    model: torch.nn.Module | Callable[[torch.Tensor, torch.Tensor], dict]
    config: Config
    category_ids: list[int]
    class_names: list[str]
    device: torch.device
    optimize: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.model, torch.nn.Module):
            self.model = self.model.to(self.device).eval()
            if self.optimize:
                self.model = optimize_for_inference(self.model)
        elif self.device.type != "cpu":
            raise ValueError(f"the onnxruntime backend runs on the CPU, not on '{self.device}'")
        self.postprocess = build_postprocess(self.config.model)
        self.transform = build_eval_transform(self.config.data.augment)

    @property
    def backend(self) -> str:
        """"pytorch" or "onnxruntime"."""
        return "pytorch" if isinstance(self.model, torch.nn.Module) else "onnxruntime"

    @classmethod
    def from_onnx(
        cls,
        model_path: str | os.PathLike,
        *,
        overrides: Sequence[str] = (),
        threads: int | None = None,
    ) -> Predictor:
        """An exported model (`tools/export.py`) run by onnxruntime on the CPU (needs the export extra).

        The config (transform, post-processing), classes and category ids come from the file's metadata.
        Args:
            overrides: dotted `key=value` for the data settings, e.g. `data.augment.eval_size=640`
                (`model.*` ones are refused: the exported graph is fixed).
            threads: onnxruntime intra-op threads (default: one per core).
        Raises:
            ToolError: a missing file or a `model.*` override; MetadataError: not a detr_lab export.
        """
        path = Path(model_path)
        if not path.is_file():
            raise ToolError(f"ONNX model not found: {path}")
        model_overrides, other_overrides = split_model_overrides(list(overrides))
        if model_overrides:
            raise ToolError(f"model overrides {model_overrides} cannot change an exported ONNX model")
        detector = OnnxDetector(path, threads=threads)
        meta = detector.metadata
        config = _apply_overrides(meta.config, other_overrides) if other_overrides else meta.config
        return cls(detector, config, meta.category_ids, meta.class_names, torch.device("cpu"), optimize=False)

    @classmethod
    def from_checkpoint(
        cls,
        checkpoint: str | os.PathLike,
        *,
        config_path: str | os.PathLike | None = None,
        overrides: Sequence[str] = (),
        device: str = "cpu",
    ) -> Predictor:
        """Load any checkpoint `load_checkpoint` reads.

        Args:
            config_path: optional YAML whose model must fit the checkpoint's weights (a mismatch is a
                `CheckpointError` naming the differing tensors); its `data.augment` sets the transform.
            overrides: dotted `key=value`; `model.*` ones go to the checkpoint's stored config.
        """
        path = Path(checkpoint)
        if not path.is_file():
            raise ToolError(f"checkpoint not found: {path}")
        model_overrides, other_overrides = split_model_overrides(list(overrides))
        loaded = load_checkpoint(path, overrides=model_overrides)
        model, config = loaded.model, loaded.config
        if config_path is not None:
            config = load_config(config_path, [*model_overrides, *other_overrides])
            backbone = dataclasses.replace(config.model.backbone, pretrained=False, weights_path=None)
            model = build_model(dataclasses.replace(config.model, backbone=backbone))
            where = f"{path} with the model of {config_path}"
            load_state_exactly(model, loaded.model.state_dict(), where)
        elif other_overrides:
            config = _apply_overrides(loaded.config, other_overrides)
        return cls(model, config, loaded.category_ids, loaded.class_names, resolve_device(device))

    @torch.inference_mode()
    def predict(
        self, images: ImageInput | Sequence[ImageInput], *, score_threshold: float = 0.0
    ) -> list[dict]:
        """Detections for one image or a batch of images (any sizes), run as one padded batch.

        Args:
            images: image file paths, PIL images, or uint8 `[H, W, 3]` RGB arrays (one, or a sequence).
            score_threshold: keep detections scoring at least this (0: every query's best class, or the
                top `num_top` (query, class) pairs with sigmoid classification).
        Returns:
            per image, best first: `boxes` float `[K, 4]` absolute (x1, y1, x2, y2) pixels of that image,
            `scores` `[K]`, `labels` int64 `[K]` (class indices), `category_ids` int64 `[K]` (the
            dataset's ids), all CPU tensors, and `class_names` (K strings).
        Raises:
            ValueError: an unsupported image type or array; ToolError / CorruptImageError: a bad file.
        """
        if isinstance(images, (str, os.PathLike, Image.Image, np.ndarray)):
            images = [images]
        arrays = [to_rgb_array(image) for image in images]
        no_boxes, no_labels = np.zeros((0, 4), np.float32), np.zeros((0,), np.int64)
        tensors = [self.transform(image, no_boxes, no_labels)[0] for image in arrays]
        batch, padding_mask = pad_images(tensors)  # [B, 3, H, W], [B, H, W] True = padding
        outputs = self.model(batch.to(self.device), padding_mask.to(self.device))
        orig_sizes = torch.tensor([image.shape[:2] for image in arrays], device=self.device)  # [B, 2] (h, w)
        detections = self.postprocess(outputs, orig_sizes)
        ids = torch.tensor(self.category_ids, dtype=torch.int64)
        results = []
        for detection in detections:
            keep = detection["scores"] >= score_threshold
            order = detection["scores"][keep].argsort(descending=True)
            result = {key: value[keep][order].cpu() for key, value in detection.items()}
            result["category_ids"] = ids[result["labels"]]
            result["class_names"] = [self.class_names[label] for label in result["labels"].tolist()]
            results.append(result)
        return results

    def records(self, detection: dict[str, torch.Tensor], score_threshold: float) -> list[dict]:
        """JSON-ready detections above the threshold, best first: box (xyxy px), score, category id, class."""
        keep = detection["scores"] >= score_threshold
        order = detection["scores"][keep].argsort(descending=True)
        scores = detection["scores"][keep][order].tolist()
        labels = detection["labels"][keep][order].tolist()
        boxes = detection["boxes"][keep][order].tolist()
        return [
            {
                "box": [round(v, 2) for v in box],
                "score": round(score, 4),
                "category_id": self.category_ids[label],
                "class_name": self.class_names[label],
            }
            for box, score, label in zip(boxes, scores, labels, strict=True)
        ]


def _apply_overrides(cfg: Config, overrides: Sequence[str]) -> Config:
    return apply_overrides(cfg, overrides, "command-line override")


def class_color(index: int) -> tuple[int, int, int]:
    """A distinct, saturated colour per class index (golden-ratio hue steps)."""
    red, green, blue = colorsys.hsv_to_rgb((index * 0.618034) % 1.0, 0.85, 1.0)
    return int(red * 255), int(green * 255), int(blue * 255)


def draw_detections(image: np.ndarray, records: Sequence[dict], class_names: Sequence[str]) -> Image.Image:
    """An RGB copy of uint8 `[H, W, 3]` `image` with each record's box and "name score" label drawn."""
    canvas = Image.fromarray(image).convert("RGB")
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    width = max(1, round(min(canvas.size) / 200))
    for record in records:
        x1, y1, x2, y2 = record["box"]
        color = class_color(list(class_names).index(record["class_name"]))
        draw.rectangle((x1, y1, x2, y2), outline=color, width=width)
        text = f"{record['class_name']} {record['score']:.2f}"
        left, top, right, bottom = draw.textbbox((x1, y1), text, font=font)
        label_top = max(0, y1 - (bottom - top) - 2)
        draw.rectangle((x1, label_top, x1 + (right - left) + 4, label_top + (bottom - top) + 2), fill=color)
        draw.text((x1 + 2, label_top), text, fill=(0, 0, 0), font=font)
    return canvas


def _output_name(path: Path, used: set[str]) -> str:
    name, index = f"{path.stem}.jpg", 1
    while name in used:
        name, index = f"{path.stem}_{index}.jpg", index + 1
    used.add(name)
    return name


@dataclass
class InferenceResult:
    """What `run_inference` did: the json written, the images with detections, the images that failed."""

    json_path: Path
    images: list[dict]  # as in the json's "images"
    failed: list[dict]  # {"file", "error"}, as in the json's "failed"


class _DetectionsWriter:
    """Keeps the results and rewrites `detections.json` atomically, at most every `interval_s` seconds
    (and on `flush(force=True)`), so that a run killed midway keeps what it had done."""

    def __init__(self, path: Path, header: dict, interval_s: float = 30.0) -> None:
        self.path = path
        self.header = header
        self.interval_s = interval_s
        self.images: list[dict] = []
        self.failed: list[dict] = []
        self._last_write = time.monotonic()

    def flush(self, *, force: bool = False, complete: bool = False) -> None:
        if not force and time.monotonic() - self._last_write < self.interval_s:
            return
        payload = {**self.header, "complete": complete, "images": self.images, "failed": self.failed}
        tmp = self.path.with_name(f"{self.path.name}.tmp-{os.getpid()}")
        try:
            tmp.write_text(json.dumps(payload, indent=2))
            os.replace(tmp, self.path)
        finally:
            tmp.unlink(missing_ok=True)
        self._last_write = time.monotonic()


def _failure(path: Path, err: BaseException) -> dict:
    message = str(err).strip().splitlines()[0] if str(err).strip() else ""
    if str(path) not in message:
        message = f"{path}: {type(err).__name__}: {message}"
    return {"file": str(path), "error": message}


def _predict_each(predictor: Predictor, group: list[tuple[Path, np.ndarray]]):
    """(path, image, detection or None, failure or None) per image: the group in one batch, or, if the
    batch fails, each image alone so that one bad image does not take the others with it."""
    try:
        detections = predictor.predict([image for _, image in group])
        return [(path, image, det, None) for (path, image), det in zip(group, detections, strict=True)]
    except Exception as err:
        if len(group) == 1:
            path, image = group[0]
            return [(path, image, None, _failure(path, err))]
    return [row for item in group for row in _predict_each(predictor, [item])]


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
) -> InferenceResult:
    """Detect objects in images; write `<output_dir>/detections.json` and an annotated JPEG per image.

    `checkpoint` is the model file: a checkpoint (backend "pytorch"), or an exported `.onnx` file
    (backend "onnxruntime": CPU, no `config_path`, data overrides only); both write the same outputs.

    The json holds `{"checkpoint", "score_threshold", "complete", "images": [{"file", "width", "height",
    "annotated", "detections": [{"box": [x1, y1, x2, y2], "score", "category_id", "class_name"}]}],
    "failed": [{"file", "error"}]}`: every image that could be read has its detections; an image that
    cannot be decoded or processed (truncated file, broken link in a folder...) is listed in "failed"
    with its reason and the others go on. The json is rewritten every 30 s while running and once at
    the end, also when the run stops on an error or an interrupt ("complete" is then false).

    Batches hold images of one resized size only (see `same_size_groups`), so no image is padded and
    each image's detections do not depend on `batch_size` or on the other inputs.
    Raises:
        ToolError: a missing named image or checkpoint, a bad argument;
        CheckpointError / ConfigError: a checkpoint that does not fit the config.
    """
    if batch_size < 1:
        raise ToolError(f"--batch-size must be >= 1, got {batch_size}")
    if not 0.0 <= score_threshold <= 1.0:
        raise ToolError(f"--score-threshold must be in [0, 1], got {score_threshold}")
    if backend not in ("pytorch", "onnxruntime"):
        raise ToolError(f"--backend must be pytorch or onnxruntime, got {backend!r}")
    if backend == "onnxruntime" and (config_path is not None or device not in ("cpu", "auto")):
        raise ToolError("--backend onnxruntime takes no --config (the model is fixed) and runs on the CPU")
    found = collect_images(inputs)
    if backend == "onnxruntime":
        predictor = Predictor.from_onnx(checkpoint, overrides=overrides)
    else:
        predictor = Predictor.from_checkpoint(
            checkpoint, config_path=config_path, overrides=overrides, device=device
        )
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    header = {"checkpoint": str(checkpoint), "score_threshold": score_threshold}
    writer = _DetectionsWriter(output_dir / DETECTIONS_FILE, header)
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
                    writer.failed.append(_failure(path, err))
            for group in same_size_groups(decoded, predictor.config.data.augment):
                for path, image, detection, failure in _predict_each(predictor, group):
                    if failure is not None:
                        writer.failed.append(failure)
                        continue
                    records = predictor.records(detection, score_threshold)
                    name = _output_name(path, used)
                    draw_detections(image, records, predictor.class_names).save(output_dir / name, quality=92)
                    height, width = image.shape[:2]
                    writer.images.append({
                        "file": str(path), "width": width, "height": height, "annotated": name,
                        "detections": records,
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
        size = shorter_side_size(image.shape[0], image.shape[1], augment.eval_size, augment.eval_max_size)
        groups.setdefault(size, []).append((path, image))
    return list(groups.values())
