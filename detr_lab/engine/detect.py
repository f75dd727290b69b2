"""Images to detections: the one forward path of evaluation, the run summary and the Predictor.

    images, padding_mask = pad_images([image_a, image_b])        # detr_lab.data.collate
    detections = detect(model, postprocess, images, padding_mask, orig_sizes, device)
    shown = best_first(detections[0], score_threshold=0.5)

`evaluate.predict_dataset` (validation batches), `summary.RunSummary` (its example image) and
`detr_lab.predict.Predictor` (files, PIL images, arrays) all go through `detect`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

# The one default score threshold of what shows detections to a person: `Predictor.predict`,
# `tools/infer.py`, `tools/visualize.py predictions` and the run summary's example image. COCO
# evaluation keeps every detection (AP needs the low-scoring ones too).
DEFAULT_SCORE_THRESHOLD = 0.3
# The default device of the tools and of the Python prediction API: CUDA when available, else the CPU.
DEFAULT_DEVICE = "auto"


@torch.inference_mode()
def detect(
    model: Callable[[Tensor, Tensor], dict],
    postprocess: Callable[[dict, Tensor], list[dict[str, Tensor]]],
    images: Tensor,
    padding_mask: Tensor,
    orig_sizes: Tensor,
    device: torch.device,
) -> list[dict[str, Tensor]]:
    """Run a padded batch through `model` and `postprocess` on `device`.

    Args:
        model: a detector called as `model(images, padding_mask)`, already on `device` and in eval
            mode (an `nn.Module`, or an onnxruntime `OnnxDetector` on the CPU).
        postprocess: `detr_lab.models.postprocess.PostProcess` (or one with its call contract).
        images: float `[B, 3, H, W]`, normalized, zero-padded at the bottom / right.
        padding_mask: bool `[B, H, W]`, True = padding.
        orig_sizes: int `[B, 2]`, (height, width) of each original image: the boxes' frame.
    Returns:
        Per image: `scores` `[K]`, `labels` int64 `[K]` (class indices) and `boxes` `[K, 4]` absolute
        (x1, y1, x2, y2) pixels of the original image, on `device`, in the post-processing's order.
    """
    outputs = model(images.to(device), padding_mask.to(device))
    return postprocess(outputs, orig_sizes.to(device))


def best_first(detection: dict[str, Tensor], score_threshold: float = 0.0) -> dict[str, Tensor]:
    """The detections of one image scoring at least `score_threshold`, best first.

    Args:
        detection: `scores` `[K]` and other per-detection tensors with K rows (`labels`, `boxes`).
    Returns:
        The same keys, every tensor filtered and reordered alike (on its own device).
    """
    keep = detection["scores"] >= score_threshold
    order = detection["scores"][keep].argsort(descending=True)
    return {key: value[keep][order] for key, value in detection.items()}
