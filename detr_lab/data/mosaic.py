"""DEIM's mosaic (Dense O2O, Huang et al. 2025): four training images on one canvas, then a random affine.

Followed: ShihuaHuang95/DEIM, engine/data/transforms/mosaic.py (`Mosaic` with `use_cache: False`, as
configs/base/deim.yml and rt_deim.yml set it) and engine/data/transforms/container.py
(`Compose.stop_epoch_forward`, the epoch policy). Written anew; no official code is copied.

The canvas (`mosaic_canvas`). The sample and three other images of the training set (indices drawn
uniformly, with replacement, from the whole set: the official `random.choices(range(len(dataset)),
k=3)`) are each resized so that the shorter side is `output_size` (torchvision's `Resize(int)` on a PIL
image: the longer side becomes int(output_size * long / short); PIL's bilinear filter). With H, W the
largest resized height and width, the canvas is `[2H, 2W, 3]` filled with `fill`, and the images sit at
the top-left corners of its quadrants: the sample at (0, 0), the others at (W, 0), (0, H), (W, H)
(x, y). Boxes are scaled with their image and shifted with it; labels stay with their boxes. Images
smaller than the quadrant leave `fill` to their right and below (the official canvas is always black,
its `fill_value` serving the affine only; with the official `fill_value` 0 the two agree).

The affine (`mosaic_affine`): torchvision's `RandomAffine(degrees, translate, scale, fill)` as the
official `Mosaic` runs it on the canvas, here albumentations' `A.Affine`: angle uniform in [-degrees,
degrees] about the canvas centre, scale uniform in `scale` (both sides alike), shift uniform in
+-translate times the canvas width and height, nearest-neighbour pixels, `fill` outside, the canvas size
kept. Each box's four corners are mapped and the box becomes their enclosing box, clipped to the canvas;
a box then narrower or shorter than the pipeline's minimum (1 pixel for the rtdetr policy: the official
`SanitizeBoundingBoxes(min_size=1)`; DETR's 0.01 pixel for detr) is dropped with its label. For equal
parameters A.Affine's boxes equal torchvision's to float precision with the angle's sign flipped (the
range is symmetric, so the draws have the same law; tests/data/test_mosaic.py checks it); torchvision
rounds the shift to whole pixels, A.Affine does not (under half a pixel). `A.Mosaic` (albumentations
2.x) is not used: it crops a `target_size` window around a random centre of a grid of fixed-size cells
(YOLO's layout), while DEIM keeps every image whole at the quadrant corners of a canvas sized by the
images, and has no affine.

`MosaicTransform` puts it in a training pipeline with DEIM's epoch policy. Boxes: absolute xyxy pixels
in (`[N, 4]` with the `[H, W, 3]` uint8 image) and, through the pipeline, normalized cxcywh out.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from typing import Any

import albumentations as A
import cv2
import numpy as np
from PIL import Image

# (image uint8 [H, W, 3], boxes float32 [N, 4] absolute xyxy pixels, labels int64 [N])
RawTriple = tuple[np.ndarray, np.ndarray, np.ndarray]
# index -> the decoded, untransformed image of that index with its boxes and labels
SampleSource = Callable[[int], RawTriple]

MOSAIC_PARTNERS = 3  # images added to the sample: a 2 x 2 mosaic
_MOSAIC_STREAM = 1  # SeedSequence spawn key of the mosaic draws, apart from the pipelines' draws


def resized_tile_size(height: int, width: int, size: int) -> tuple[int, int]:
    """(h, w) after torchvision's `Resize(size)` (an int: the shorter side): the longer side becomes
    int(size * long / short)."""
    if height < 1 or width < 1 or size < 1:
        raise ValueError(f"sizes must be positive, got (h, w) = ({height}, {width}), size {size}")
    if width <= height:
        return int(size * height / width), size
    return size, int(size * width / height)


def mosaic_canvas(samples: Sequence[RawTriple], output_size: int, fill: int = 0) -> RawTriple:
    """The mosaic of four `(image [H_i, W_i, 3] uint8, boxes [N_i, 4] absolute xyxy, labels [N_i])`.

    Returns `(canvas uint8 [2H, 2W, 3], boxes float32 [sum N_i, 4] absolute xyxy on the canvas, labels
    int64 [sum N_i])`, the samples' boxes in their order (see the module docstring for the layout).
    """
    if len(samples) != MOSAIC_PARTNERS + 1:
        raise ValueError(f"a mosaic needs {MOSAIC_PARTNERS + 1} samples, got {len(samples)}")
    tiles, tile_boxes, tile_labels = [], [], []
    for image, boxes, labels in samples:
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f"mosaic images must be uint8 [H, W, 3], got {image.dtype} {list(image.shape)}")
        height, width = image.shape[:2]
        new_height, new_width = resized_tile_size(height, width, output_size)
        if (new_height, new_width) != (height, width):
            image = np.asarray(Image.fromarray(image).resize((new_width, new_height), Image.BILINEAR))
        ratio = np.array([new_width / width, new_height / height] * 2, dtype=np.float32)
        tiles.append(image)
        tile_boxes.append(np.asarray(boxes, dtype=np.float32).reshape(-1, 4) * ratio)
        tile_labels.append(np.asarray(labels, dtype=np.int64).reshape(-1))
    cell_height = max(tile.shape[0] for tile in tiles)
    cell_width = max(tile.shape[1] for tile in tiles)
    canvas = np.full((2 * cell_height, 2 * cell_width, 3), fill, dtype=np.uint8)
    for k, (tile, boxes) in enumerate(zip(tiles, tile_boxes, strict=True)):
        left, top = (k % 2) * cell_width, (k // 2) * cell_height
        canvas[top : top + tile.shape[0], left : left + tile.shape[1]] = tile
        boxes += np.array([left, top, left, top], dtype=np.float32)
    return canvas, np.concatenate(tile_boxes), np.concatenate(tile_labels)


def mosaic_affine(
    degrees: float, translate: Sequence[float], scale: Sequence[float], fill: int = 0
) -> A.Affine:
    """The official mosaic's `RandomAffine(degrees, translate, scale, fill)` as an albumentations op
    (see the module docstring for what matches and what does not)."""
    return A.Affine(
        rotate=(-float(degrees), float(degrees)),
        translate_percent={"x": (-float(translate[0]), float(translate[0])),
                           "y": (-float(translate[1]), float(translate[1]))},
        scale=(float(scale[0]), float(scale[1])),
        keep_ratio=True,
        shear=0.0,
        interpolation=cv2.INTER_NEAREST,
        fill=fill,
        border_mode=cv2.BORDER_CONSTANT,
        rotate_method="largest_box",
        fit_output=False,
        p=1.0,
    )


def _stream_seed(seed: int) -> int:
    return int(np.random.SeedSequence(seed, spawn_key=(_MOSAIC_STREAM,)).generate_state(1)[0])


class MosaicTransform:
    """A training pipeline with DEIM's mosaic: `base` for ordinary samples, `mosaic` for mosaics.

    A sample whose epoch is in [`start_epoch`, `stop_epoch`) (stop None: no end) becomes a mosaic with
    probability `prob` (the official `random.random() <= mosaic_prob`, here `<`, so that 0 never and 1
    always draws one): three other images come from the sample source (`set_sample_source`, which
    `detr_lab.data.coco.CocoDetectionDataset` calls with its decoder, so COCO, YOLO and the synthetic
    set alike), `mosaic_canvas` joins the four, and `mosaic` (a `DetectionTransform` whose first op is
    `mosaic_affine`) finishes it. Any other sample goes through `base` untouched, so outside the window
    the output is exactly `base`'s. The caller folds the whole policy into the window: DEIM's mosaic is
    one of the ops its policy switches off before the first and from the last policy epoch on.

    Randomness: `set_random_seed(seed)` seeds `base` and `mosaic` with `seed` (as without mosaic) and
    the mosaic draws (whether, which partners) from a separate stream of the same seed. The dataset
    seeds every sample read with an `(epoch, index)` key from (sample seed, epoch, index), so a sample's
    mosaic, partners included, is the same in any worker and in a resumed run. Epoch None (a sample
    read by plain index): no mosaic.

    Call: `(image uint8 [H, W, 3], boxes [N, 4] absolute xyxy, labels [N]) -> (image float32
    [3, H', W'], boxes float32 [N', 4] normalized cxcywh, labels int64 [N'])`, as `DetectionTransform`.
    """

    def __init__(
        self,
        base: Any,
        mosaic: Any,
        *,
        prob: float,
        start_epoch: int = 0,
        stop_epoch: int | None = None,
        output_size: int = 320,
        fill: int = 0,
    ) -> None:
        if not 0.0 <= prob <= 1.0:
            raise ValueError(f"prob must be in [0, 1], got {prob}")
        if start_epoch < 0 or output_size < 1:
            raise ValueError(f"need start_epoch >= 0 and output_size >= 1, got {start_epoch}, {output_size}")
        self.base, self.mosaic = base, mosaic
        self.prob, self.start_epoch, self.stop_epoch = float(prob), int(start_epoch), stop_epoch
        self.output_size, self.fill = int(output_size), int(fill)
        self.epoch: int | None = None
        self._load: SampleSource | None = None
        self._num_samples = 0
        self._rng = random.Random()

    def set_sample_source(self, load: SampleSource, num_samples: int) -> None:
        """Where partners come from: `load(index)` for index in [0, num_samples)."""
        if num_samples < 1:
            raise ValueError(f"a mosaic needs a non-empty dataset, got {num_samples} samples")
        self._load, self._num_samples = load, int(num_samples)

    def set_epoch(self, epoch: int | None) -> None:
        """The training epoch of the next samples (0-based; None: unknown), passed on to `base`."""
        self.epoch = epoch
        set_base_epoch = getattr(self.base, "set_epoch", None)
        if set_base_epoch is not None:
            set_base_epoch(epoch)

    @property
    def in_window(self) -> bool:
        """True when the next sample may become a mosaic (its epoch in [start_epoch, stop_epoch))."""
        if self.epoch is None or self.epoch < self.start_epoch:
            return False
        return self.stop_epoch is None or self.epoch < self.stop_epoch

    def set_random_seed(self, seed: int | None) -> None:
        self.base.set_random_seed(seed)
        self.mosaic.set_random_seed(seed)
        self._rng.seed(None if seed is None else _stream_seed(seed))

    def __call__(self, image: np.ndarray, boxes: np.ndarray, labels: np.ndarray) -> Any:
        if not self.in_window or not self._rng.random() < self.prob:
            return self.base(image, boxes, labels)
        if self._load is None:
            raise RuntimeError("MosaicTransform: no sample source; the dataset calls set_sample_source")
        partners = [self._load(self._rng.randrange(self._num_samples)) for _ in range(MOSAIC_PARTNERS)]
        canvas, all_boxes, all_labels = mosaic_canvas(
            [(image, boxes, labels), *partners], self.output_size, self.fill
        )
        return self.mosaic(canvas, all_boxes, all_labels)
