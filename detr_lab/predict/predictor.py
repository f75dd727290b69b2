"""`Predictor`: a detector with its evaluation transform and post-processing, on two backends.

    predictor = Predictor.from_checkpoint("runs/demo/checkpoints/last.ckpt")   # PyTorch, no Lightning
    predictor = Predictor.from_onnx("model.onnx")                               # or onnxruntime (CPU)
    predictor = Predictor.from_openvino("model.xml")                            # or OpenVINO (CPU)
    predictor = Predictor.from_pretrained("dino-4scale-r50")  # zoo name, Hub-style folder or Hub repo id
    predictor.save_pretrained("my-detector")                   # config.json, model.safetensors, README.md
    for detections in predictor.predict(["a.jpg", pil_image, rgb_array], score_threshold=0.5):
        detections["boxes"], detections["scores"], detections["category_ids"], detections["class_names"]

Images go through the model config's evaluation transform (`build_eval_transform`: shorter side
`eval_size`, longer side <= `eval_max_size` for `data.augment.policy: detr`; `square_size` x
`square_size` for `rtdetr`; then mean / std) and batched as validation batches are: one forward pass
per group of images whose resized sizes are equal, so no image is padded and an image's detections do
not depend on the other images of the call (padding changes DETR's outputs, facebookresearch/detr
#217); then through `detr_lab.engine.detect.detect`. Boxes come back as
absolute (x1, y1, x2, y2) pixels of each original image (normalized x times its width, y times its
height, so a resize that does not keep the aspect ratio maps back exactly).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from detr_lab.checkpoints import (
    LoadedCheckpoint,
    apply_overrides,
    load_checkpoint,
    load_state_exactly,
    split_model_overrides,
)
from detr_lab.config import Config, load_config
from detr_lab.data.collate import pad_images
from detr_lab.data.images import ImageInput, to_rgb_array
from detr_lab.data.transforms import build_eval_transform
from detr_lab.engine.detect import DEFAULT_DEVICE, DEFAULT_SCORE_THRESHOLD, best_first, detect
from detr_lab.engine.devices import resolve_device
from detr_lab.errors import InputError, InputNotFoundError
from detr_lab.export.backends import open_runtime
from detr_lab.export.runtime import ExportedRuntime
from detr_lab.models.build import build_model, build_postprocess
from detr_lab.models.optimize import optimize_for_inference
from detr_lab.predict.slicing import check_slicing, merge_detections, slice_windows
from detr_lab.zoo import load_pretrained, save_pretrained

_NO_BOXES, _NO_LABELS = np.zeros((0, 4), np.float32), np.zeros((0,), np.int64)


@dataclass
class Predictor:
    """A model, its post-processing and its evaluation transform, ready for `predict`.

    `model` is an `nn.Module` detector (PyTorch backend) or an `OnnxDetector` (onnxruntime backend,
    CPU); build one with `from_checkpoint`, `from_pretrained` or `from_onnx`. With `optimize` (default)
    a PyTorch model is rewritten in place by `optimize_for_inference` (same outputs, faster; not to be
    trained or saved afterwards, and forward hooks see the rewritten modules; `save_pretrained` reads
    the weights again through `reload`, which `from_checkpoint` and `from_pretrained` set).
    Raises:
        ValueError: an onnxruntime model with a device other than the CPU.
    """

    model: torch.nn.Module | Callable[[torch.Tensor, torch.Tensor], dict]
    config: Config
    category_ids: list[int]
    class_names: list[str]
    device: torch.device
    optimize: bool = True
    reload: Callable[[], LoadedCheckpoint] | None = None  # the model as loaded, before `optimize`
    origin: dict[str, Any] = field(default_factory=dict)  # where it came from (folder, zoo entry, file)

    def __post_init__(self) -> None:
        if isinstance(self.model, torch.nn.Module):
            self.model = self.model.to(self.device).eval()
            if self.optimize:
                self.model = optimize_for_inference(self.model)
        elif self.device.type != "cpu":
            raise ValueError(f"the {self.backend} backend runs on the CPU, not on '{self.device}'")
        self.postprocess = build_postprocess(self.config.model)
        self.transform = build_eval_transform(self.config.data.augment)

    @property
    def backend(self) -> str:
        """"pytorch", "onnxruntime" or "openvino"."""
        if isinstance(self.model, ExportedRuntime):
            return self.model.backend
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
            InputNotFoundError: a missing file. InputError: a `model.*` override.
            MetadataError: not a detr_lab export. MissingExtraError: onnxruntime is not installed.
        """
        return cls.from_exported("onnxruntime", model_path, overrides=overrides, threads=threads)

    @classmethod
    def from_openvino(
        cls,
        model_path: str | os.PathLike,
        *,
        overrides: Sequence[str] = (),
        threads: int | None = None,
    ) -> Predictor:
        """An OpenVINO IR (`tools/export.py --format openvino`, FP32, FP16 or INT8) run by OpenVINO on
        the CPU; `from_onnx`'s arguments and errors (MissingExtraError: openvino is not installed)."""
        return cls.from_exported("openvino", model_path, overrides=overrides, threads=threads)

    @classmethod
    def from_exported(
        cls,
        backend: str,
        model_path: str | os.PathLike,
        *,
        overrides: Sequence[str] = (),
        threads: int | None = None,
    ) -> Predictor:
        """`from_onnx` (backend "onnxruntime") or `from_openvino` (backend "openvino")."""
        kind = {"onnxruntime": "ONNX", "openvino": "OpenVINO"}.get(backend, backend)
        path = Path(model_path)
        if not path.is_file():
            raise InputNotFoundError(f"{kind} model not found: {path}")
        model_overrides, other_overrides = split_model_overrides(overrides)
        if model_overrides:
            raise InputError(f"model overrides {model_overrides} cannot change an exported {kind} model")
        detector = open_runtime(backend, path, threads=threads)
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
        device: str = DEFAULT_DEVICE,
        optimize: bool = True,
    ) -> Predictor:
        """Load any checkpoint `load_checkpoint` reads.

        Args:
            config_path: optional YAML whose model must fit the checkpoint's weights (a mismatch is a
                `CheckpointError` naming the differing tensors); its `data.augment` sets the transform.
            overrides: dotted `key=value`; `model.*` ones go to the checkpoint's stored config (e.g.
                `model.encoder.attention=act`), the others to the data settings.
            device: "auto" (default: CUDA when available), "cpu", "cuda", "cuda:1".
            optimize: apply `optimize_for_inference` (False keeps the modules as built, for hooks).
        Raises:
            InputNotFoundError: a missing checkpoint. CheckpointError / ConfigError: a checkpoint that
            cannot be read or does not fit the config, a bad override.
        """
        path = Path(checkpoint)
        if not path.is_file():
            raise InputNotFoundError(f"checkpoint not found: {path}")
        model_overrides, other_overrides = split_model_overrides(overrides)
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

        def reload() -> LoadedCheckpoint:
            again = load_checkpoint(path, overrides=model_overrides)
            if config_path is None:
                return LoadedCheckpoint(again.model, config, again.category_ids, again.class_names)
            rebuilt = build_model(dataclasses.replace(config.model, backbone=backbone))
            load_state_exactly(rebuilt, again.model.state_dict(), where)
            return LoadedCheckpoint(rebuilt.eval(), config, again.category_ids, again.class_names)

        return cls(model, config, loaded.category_ids, loaded.class_names, resolve_device(device),
                   optimize=optimize, reload=reload, origin={"checkpoint": str(path)})

    @classmethod
    def from_pretrained(
        cls,
        reference: str | os.PathLike,
        *,
        overrides: Sequence[str] = (),
        device: str = "cpu",
        optimize: bool = True,
        cache_dir: str | os.PathLike | None = None,
        mirror: str | os.PathLike | None = None,
        revision: str | None = None,
    ) -> Predictor:
        """A zoo model, a Hub-style folder (`save_pretrained`) or a Hugging Face Hub repository.

        Args:
            reference: a folder with `config.json` and `model.safetensors`; else a zoo name
                (`detr_lab.zoo.ZOO`, e.g. "dino-4scale-r50": its official file is downloaded once into
                the cache, `$DETR_LAB_CACHE_DIR`, its hash checked and converted); else "owner/name", a
                Hub repository fetched with `huggingface_hub.snapshot_download`.
            overrides, device, optimize: as `from_checkpoint`.
            cache_dir: the cache root (default `$DETR_LAB_CACHE_DIR`, else `~/.cache/detr_lab`).
            mirror: a folder or base address holding zoo files under their names (default
                `$DETR_LAB_ZOO_MIRROR`), for files published on pages only and offline machines.
            revision: the Hub repository's branch, tag or commit.
        Raises:
            InputError: a reference that is none of these. DownloadError / HashMismatchError: a file
            that cannot be fetched or does not match its hash (it is not kept). CheckpointError /
            ConfigError: weights that do not convert or fit, a bad override.
        """
        loaded, origin = load_pretrained(reference, overrides, cache=cache_dir, mirror=mirror,
                                         revision=revision)

        def reload() -> LoadedCheckpoint:
            return load_pretrained(reference, overrides, cache=cache_dir, mirror=mirror, revision=revision,
                                   quiet=True)[0]

        return cls(loaded.model, loaded.config, loaded.category_ids, loaded.class_names,
                   resolve_device(device), optimize=optimize, reload=reload, origin=origin)

    def save_pretrained(
        self,
        folder: str | os.PathLike,
        *,
        evaluation: Mapping[str, Any] | None = None,
        report: str | os.PathLike | None = None,
        title: str | None = None,
    ) -> Path:
        """Write the model as a Hub-style folder (`detr_lab.zoo.save_pretrained`): `config.json`,
        `model.safetensors`, a model card `README.md` (with `evaluation`, a metric -> value mapping, and
        the files of an evaluation `report` file or folder, copied under `evaluation/`).

        The weights are those loaded, before `optimize_for_inference` rewrote the model (read again
        through `reload` where the model was optimized). `Predictor.from_pretrained(folder)` reads it.
        Raises:
            InputError: an onnxruntime predictor, or an optimized one without `reload`.
            FileWriteError: a file cannot be written.
        """
        if self.backend != "pytorch":
            raise InputError("save_pretrained needs a PyTorch model; an exported ONNX model cannot be saved "
                             "as a model folder")
        if self.optimize:
            if self.reload is None:
                raise InputError("this Predictor's model was rewritten by optimize_for_inference and it has "
                                 "no reload; build it with optimize=False to save it")
            loaded = self.reload()
        else:
            loaded = LoadedCheckpoint(self.model, self.config, self.category_ids, self.class_names)
        loaded = LoadedCheckpoint(loaded.model, self.config, self.category_ids, self.class_names)
        source = {key: value for key, value in self.origin.items()
                  if key in ("zoo", "checkpoint", "folder", "hub", "url", "page", "repository",
                             "sha256_prefix", "coco_ap", "filename", "config")}
        license_id = self.origin.get("license")
        return save_pretrained(folder, loaded, source=source, evaluation=evaluation, report=report,
                               title=title, license_id=license_id)

    def preprocess(self, image: ImageInput) -> torch.Tensor:
        """One image (path, PIL image or uint8 array, see `to_rgb_array`) through the evaluation
        transform: normalized float `[3, H, W]` on the predictor's device.

        Raises:
            ValueError: an unsupported image type or array; MissingImageError / CorruptImageError: a
            missing or unreadable file.
        """
        return self.transform(to_rgb_array(image), _NO_BOXES, _NO_LABELS)[0].to(self.device)

    def predict(
        self,
        images: ImageInput | Sequence[ImageInput],
        *,
        score_threshold: float = DEFAULT_SCORE_THRESHOLD,
        slice_size: int | None = None,
        overlap: float = 0.2,
        slice_merge: str = "nmm",
        slice_match_threshold: float = 0.5,
        slice_full_image: bool = False,
        slice_batch: int = 4,
    ) -> list[dict]:
        """Detections for one image or a batch of images (any sizes), or, with `slice_size`, each image
        in overlapping windows merged back (`detr_lab.predict.slicing`).

        The images (or windows) are run in groups of equal resized size (one forward pass per group,
        order kept in the results), so no image is padded: an image gets the same detections alone or
        with any other images (up to floating-point rounding of batched kernels, ~1e-6).

        Args:
            images: image file paths, PIL images, or uint8 `[H, W, 3]` RGB arrays (one, or a sequence).
            score_threshold: keep detections scoring at least this (default `DEFAULT_SCORE_THRESHOLD`,
                0.3, as tools/infer.py and tools/visualize.py; 0: every query's best class, or the top
                `num_top` (query, class) pairs with sigmoid classification); with slicing, applied to
                each window before merging.
            slice_size: window side in pixels of the original image (None: no slicing).
            overlap: fraction of a window side shared by neighbouring windows (0 to 0.9).
            slice_merge: "nmm" (default: a group of overlapping boxes becomes its enclosing box, so an
                object cut by a window border comes back whole) or "nms" (the group's best box), class
                by class (see `slicing.merge_detections`), with `slice_match_threshold` on the
                intersection over the smaller box.
            slice_full_image: add the whole image's detections before merging (for large objects; off by
                default: on the small-object test set of the README it lowers AP from 1.0 to about 0.2).
            slice_batch: windows per forward pass.
        Returns:
            per image, best first: `boxes` float `[K, 4]` absolute (x1, y1, x2, y2) pixels of that image,
            `scores` `[K]`, `labels` int64 `[K]` (class indices), `category_ids` int64 `[K]` (the
            dataset's ids), all CPU tensors, and `class_names` (K strings).
        Raises:
            ValueError: an unsupported image type or array; MissingImageError / CorruptImageError: a
            missing or unreadable file. InputError: bad slicing arguments. MissingExtraError: slicing
            without sahi.
        """
        if isinstance(images, (str, os.PathLike, Image.Image, np.ndarray)):
            images = [images]
        arrays = [to_rgb_array(image) for image in images]
        if slice_size is None:
            found = self._detect(arrays, score_threshold)
        else:
            check_slicing(slice_size, overlap, slice_merge)
            if slice_batch < 1:
                raise InputError(f"slice batch must be >= 1, got {slice_batch}")
            found = [
                self._detect_sliced(array, score_threshold, slice_size, overlap, slice_merge,
                                    slice_match_threshold, slice_full_image, slice_batch)
                for array in arrays
            ]
        ids = torch.tensor(self.category_ids, dtype=torch.int64)
        for result in found:
            result["category_ids"] = ids[result["labels"]]
            result["class_names"] = [self.class_names[label] for label in result["labels"].tolist()]
        return found

    def _detect(self, arrays: list[np.ndarray], score_threshold: float) -> list[dict]:
        """`boxes` / `scores` / `labels` (best first, CPU) of uint8 `[H, W, 3]` images, one forward pass
        per group of equal resized size (no padding), in the order given."""
        tensors = [self.preprocess(image) for image in arrays]  # normalized [3, H_i, W_i]
        detections: list[dict | None] = [None] * len(arrays)
        for group in same_size_indices([tuple(tensor.shape[1:]) for tensor in tensors]):
            # [G, 3, H, W] with no padding (mask all False); [G, 2] (h, w) of the originals
            batch, padding_mask = pad_images([tensors[i] for i in group])
            orig_sizes = torch.tensor([arrays[i].shape[:2] for i in group])
            found = detect(self.model, self.postprocess, batch, padding_mask, orig_sizes, self.device)
            for i, detection in zip(group, found, strict=True):
                detections[i] = detection
        return [{key: value.cpu() for key, value in best_first(detection, score_threshold).items()}
                for detection in detections]

    def _detect_sliced(self, array: np.ndarray, score_threshold: float, slice_size: int, overlap: float,
                       method: str, match_threshold: float, full_image: bool, slice_batch: int) -> dict:
        windows = slice_windows(array.shape[0], array.shape[1], slice_size, overlap)
        parts = []
        for start in range(0, len(windows), slice_batch):
            chunk = windows[start : start + slice_batch]
            tiles = [np.ascontiguousarray(array[y1:y2, x1:x2]) for x1, y1, x2, y2 in chunk]
            for (x1, y1, _, _), found in zip(chunk, self._detect(tiles, score_threshold), strict=True):
                shift = torch.tensor([x1, y1, x1, y1], dtype=found["boxes"].dtype)
                parts.append({**found, "boxes": found["boxes"] + shift})
        if full_image and len(windows) > 1:
            parts.extend(self._detect([array], score_threshold))
        merged = {key: torch.cat([part[key] for part in parts]) for key in ("boxes", "scores", "labels")}
        return merge_detections(merged["boxes"], merged["scores"], merged["labels"], method=method,
                                match_threshold=match_threshold)


def _apply_overrides(cfg: Config, overrides: Sequence[str]) -> Config:
    return apply_overrides(cfg, overrides, "command-line override")


def same_size_indices(sizes: Sequence[Hashable]) -> list[list[int]]:
    """Indices of `sizes` grouped by equal size (order kept within a group; groups in order of their
    first index), e.g. `[(2, 3), (4, 4), (2, 3)]` -> `[[0, 2], [1]]`."""
    groups: dict[Hashable, list[int]] = {}
    for index, size in enumerate(sizes):
        groups.setdefault(size, []).append(index)
    return list(groups.values())
