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
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from detr_lab.checkpoints import apply_overrides, load_checkpoint, load_state_exactly
from detr_lab.config import Config, load_config
from detr_lab.data.collate import pad_images
from detr_lab.data.images import load_rgb_image, pil_to_rgb_array
from detr_lab.data.transforms import build_eval_transform
from detr_lab.engine.cli import ToolError, split_model_overrides
from detr_lab.engine.devices import resolve_device
from detr_lab.export.runtime import OnnxDetector
from detr_lab.models.build import build_model, build_postprocess
from detr_lab.models.optimize import optimize_for_inference

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif")
DETECTIONS_FILE = "detections.json"


def collect_images(inputs: Sequence[str | os.PathLike]) -> list[Path]:
    """Image files named on the command line; a folder contributes its image files (sorted, not recursive).

    Raises:
        ToolError: a path that does not exist, or a folder without image files.
    """
    paths: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise ToolError(f"no image files ({', '.join(IMAGE_SUFFIXES)}) in folder {path}")
            paths.extend(found)
        elif path.is_file():
            paths.append(path)
        else:
            raise ToolError(f"image not found: {path}")
    if not paths:
        raise ToolError("no input images given")
    return paths


def check_readable(paths: Sequence[Path]) -> None:
    """Fail early, before loading a model, on a file PIL cannot identify as an image.

    (A file with an intact header but corrupt pixel data is caught later, when it is decoded.)
    Raises:
        ToolError: naming the first unreadable file.
    """
    for path in paths:
        try:
            with Image.open(path) as image:
                image.verify()
        except Exception as err:
            raise ToolError(f"cannot read image {path}: {type(err).__name__}: {err}") from None


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
) -> Path:
    """Detect objects in images; write `<output_dir>/detections.json` and an annotated JPEG per image.

    `checkpoint` is the model file: a checkpoint (backend "pytorch"), or an exported `.onnx` file
    (backend "onnxruntime": CPU, no `config_path`, data overrides only); both write the same outputs.

    The json holds `{"checkpoint", "score_threshold", "images": [{"file", "width", "height",
    "annotated", "detections": [{"box": [x1, y1, x2, y2], "score", "category_id", "class_name"}]}]}`.
    Returns the json's path.
    Raises:
        ToolError: a missing image or checkpoint; CorruptImageError: an unreadable image;
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
    paths = collect_images(inputs)
    check_readable(paths)
    if backend == "onnxruntime":
        predictor = Predictor.from_onnx(checkpoint, overrides=overrides)
    else:
        predictor = Predictor.from_checkpoint(
            checkpoint, config_path=config_path, overrides=overrides, device=device
        )
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    used: set[str] = set()
    entries = []
    for start in range(0, len(paths), batch_size):
        chunk = paths[start : start + batch_size]
        images = [load_rgb_image(path) for path in chunk]
        for path, image, detection in zip(chunk, images, predictor.predict(images), strict=True):
            records = predictor.records(detection, score_threshold)
            name = _output_name(path, used)
            draw_detections(image, records, predictor.class_names).save(output_dir / name, quality=92)
            height, width = image.shape[:2]
            entries.append({
                "file": str(path), "width": width, "height": height, "annotated": name, "detections": records,
            })
    result = {"checkpoint": str(checkpoint), "score_threshold": score_threshold, "images": entries}
    json_path = output_dir / DETECTIONS_FILE
    json_path.write_text(json.dumps(result, indent=2))
    return json_path
