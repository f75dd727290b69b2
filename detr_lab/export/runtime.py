"""onnxruntime inference of an exported detector, with the PyTorch model's call contract.

    detector = OnnxDetector("model.onnx")
    outputs = detector(images, padding_mask)   # {"pred_logits": [B, Q, C], "pred_boxes": [B, Q, 4]}

so the PyTorch evaluation and inference code (post-processing, COCO evaluator) runs on it unchanged.
A fixed-size export (no `--dynamic`) accepts only its traced batch and image size: smaller batches
are zero-padded up to that size (the padding mask marks the added pixels, the way a batch of mixed
sizes is padded) and split into chunks of the traced batch size.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from detr_lab.export.dependencies import require
from detr_lab.export.metadata import ExportMetadata
from detr_lab.export.onnx_export import INPUT_NAMES, OUTPUT_NAMES
from detr_lab.export.ort_session import create_session


class OnnxInputError(ValueError):
    """A batch that a fixed-size ONNX model cannot take (larger than its traced size)."""


class ExportedRuntime:
    """What the exported-model runtimes share: the PyTorch model's call contract over a `run` of numpy
    arrays, and the padding of batches to a fixed-size export's traced size.

    Subclasses set `path` (the model file), `metadata` (`ExportMetadata`) and `backend` (its name), and
    implement `run`.
    """

    path: Path
    metadata: ExportMetadata
    backend = "exported"

    def run(self, images: np.ndarray, padding_mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """One runtime call: float32 `[B, 3, H, W]`, bool `[B, H, W]` -> (logits, boxes) arrays."""
        raise NotImplementedError

    # the nn.Module calls the evaluation code makes on a model
    def eval(self) -> ExportedRuntime:
        return self

    def to(self, device: torch.device | str) -> ExportedRuntime:
        if torch.device(device).type != "cpu":
            raise ValueError(f"the {self.backend} backend takes CPU tensors; device '{device}' was requested")
        return self

    def __call__(self, images: Tensor, padding_mask: Tensor) -> dict[str, Tensor]:
        """Detect objects in a padded batch.

        Args:
            images: float `[B, 3, H, W]`, normalized, zero-padded bottom/right (CPU).
            padding_mask: bool `[B, H, W]`, True = padding.
        Returns:
            `pred_logits` `[B, Q, C]` and `pred_boxes` `[B, Q, 4]` (normalized cxcywh relative to each
            image's unpadded extent), float32 CPU tensors; no `aux_outputs`.
        Raises:
            OnnxInputError: images larger than a fixed-size export's traced size.
        """
        images_np = images.detach().cpu().float().numpy()
        mask_np = padding_mask.detach().cpu().numpy().astype(bool)
        traced = self.metadata.traced_size
        if traced is None:
            logits, boxes = self.run(images_np, mask_np)
        else:
            logits, boxes = self._run_fixed(images_np, mask_np, traced)
        return {"pred_logits": torch.from_numpy(logits), "pred_boxes": torch.from_numpy(boxes)}

    def _run_fixed(
        self, images: np.ndarray, padding_mask: np.ndarray, traced: tuple[int, int, int]
    ) -> tuple[np.ndarray, np.ndarray]:
        traced_batch, height, width = traced
        batch, _, in_height, in_width = images.shape
        if in_height > height or in_width > width:
            raise OnnxInputError(
                f"{self.path} was exported for {height}x{width} images, got a {in_height}x{in_width} "
                "batch; export again with --dynamic or a larger --height/--width"
            )
        padded = np.zeros((batch, 3, height, width), np.float32)
        padded[:, :, :in_height, :in_width] = images
        mask = np.ones((batch, height, width), bool)
        mask[:, :in_height, :in_width] = padding_mask
        logits, boxes = [], []
        for start in range(0, batch, traced_batch):
            chunk = slice(start, min(start + traced_batch, batch))
            count = chunk.stop - chunk.start
            chunk_images, chunk_mask = padded[chunk], mask[chunk]
            if count < traced_batch:  # fill with blank, unpadded images; their outputs are dropped
                extra = traced_batch - count
                chunk_images = np.concatenate((chunk_images, np.zeros((extra, 3, height, width), np.float32)))
                chunk_mask = np.concatenate((chunk_mask, np.zeros((extra, height, width), bool)))
            chunk_logits, chunk_boxes = self.run(chunk_images, chunk_mask)
            logits.append(chunk_logits[:count])
            boxes.append(chunk_boxes[:count])
        return np.concatenate(logits), np.concatenate(boxes)


class OnnxDetector(ExportedRuntime):
    """An exported detector run by onnxruntime on the CPU (or the given execution providers).

    Args:
        path: an `.onnx` file written by `detr_lab.export.export_onnx` (it carries the metadata).
        providers: onnxruntime execution providers (default `["CPUExecutionProvider"]`).
        threads: intra-op threads (default: onnxruntime's choice, one per core).
    Raises:
        FileNotFoundError: no such file. MetadataError: not a detr_lab export.
        MissingExtraError: onnxruntime is not installed.
    """

    backend = "onnxruntime"

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        providers: list[str] | None = None,
        threads: int | None = None,
    ) -> None:
        require("onnxruntime")
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"ONNX model not found: {self.path}")
        try:
            self.session = create_session(self.path, threads=threads, providers=providers)
        except Exception as err:
            raise ValueError(f"{self.path}: onnxruntime cannot load it: {str(err).splitlines()[0]}") from None
        properties = self.session.get_modelmeta().custom_metadata_map
        self.metadata = ExportMetadata.from_properties(dict(properties), str(self.path))
        names = [item.name for item in self.session.get_inputs()]
        if names != list(INPUT_NAMES):
            raise ValueError(f"{self.path}: inputs {names}, expected {list(INPUT_NAMES)}")

    def run(self, images: np.ndarray, padding_mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """One session call: float32 `[B, 3, H, W]`, bool `[B, H, W]` -> (logits, boxes) arrays."""
        feed = {"images": images, "padding_mask": padding_mask}
        logits, boxes = self.session.run(list(OUTPUT_NAMES), feed)
        return logits, boxes
