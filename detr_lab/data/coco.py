"""COCO-format detection datasets.

`CocoDetectionDataset` reads any COCO-format detection set: an image folder plus an instances json
with `images`, `annotations` and `categories`. The json is validated up front (every error names the
file and the key, annotation id or value at fault), and the per-image boxes are kept as compact
arrays, not as the json's dicts, so DataLoader workers share little Python state.

Class indices. Category ids in COCO files are arbitrary integers (COCO's 80 classes use 1..90 with
gaps). The dataset maps them to contiguous class indices through `category_ids` (class index ->
category id): by default the sorted ids of the json's `categories`, or an explicit list (the one a
checkpoint was trained with; `list(range(91))` for the official COCO checkpoints, whose class index
equals the category id).

Annotations in the targets:
- `iscrowd` objects are left out (they stay in `coco` for the evaluator, which ignores them);
- boxes with zero or negative width or height are dropped, boxes reaching outside their image are
  clipped to it (or dropped when nothing is left), boxes whose width or height vanishes in float32
  (the storage precision) are dropped, with one `AnnotationWarning` per file giving counts; where the
  json gives no `width`/`height`, the image file's header gives the size used for clipping;
- images without annotations are kept, with empty targets.

Orientation: images are decoded upright (EXIF orientation applied, see `detr_lab.data.images`), and
box coordinates are taken to refer to that displayed image; `orig_size` is its size. Where the json's
`width`/`height` disagree with the decoded size (for instance the stored size of an EXIF-rotated
file), an `AnnotationWarning` names the file and the boxes are clipped to the decoded image.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import os
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pycocotools.coco import COCO
from torch import Tensor
from torch.utils.data import Dataset

from detr_lab.data.errors import AnnotationWarning, CorruptImageError, DatasetError, MissingImageError
from detr_lab.data.images import load_rgb_image, upright_size
from detr_lab.data.transforms import DetectionTransform

logger = logging.getLogger(__name__)

# Transform contract: (image uint8 [H, W, 3], boxes float32 [N, 4] absolute xyxy pixels,
# labels int64 [N]) -> (image float [3, H', W'], boxes float [N', 4] normalized cxcywh, labels int64 [N']).
SampleTransform = Callable[[np.ndarray, np.ndarray, np.ndarray], tuple[Tensor, Tensor, Tensor]]

UNNAMED_CATEGORY = "N/A"  # class name for a category id of the mapping that the json does not list


@dataclass(frozen=True)
class RawSample:
    """One image and its targets before augmentation.

    image: uint8 `[H, W, 3]` RGB, upright. boxes: float32 `[N, 4]` absolute xyxy pixels inside the
    image. labels: int64 `[N]` class indices.
    """

    image: np.ndarray
    boxes: np.ndarray
    labels: np.ndarray
    image_id: int
    path: Path


# ------------------------------------------------------------------------------------ json checks
def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _header_size(path: Path) -> tuple[int, int] | None:
    """(height, width) of the upright image from its file header; None when the header cannot be read
    (decoding the file later raises the real error, naming the image id)."""
    try:
        width, height = upright_size(path)
    except DatasetError:
        return None
    return height, width


def read_coco_json(path: str | os.PathLike) -> dict:
    """Read and validate a COCO detection json; fill the optional `iscrowd` (0) and `area` (w * h).

    Raises:
        DatasetError: the file is missing or not JSON, or not COCO detection format: a missing
            top-level key, an image without `id`/`file_name`, an annotation without `id`, `image_id`,
            `category_id` or a 4-number `bbox`, duplicate ids, or an annotation whose `image_id` or
            `category_id` is not listed. The message names the file and the key or annotation id.
    """
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"annotation file not found: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DatasetError(f"{path}: not valid JSON: {err}") from err
    validate_coco_detection(data, path)
    return data


@dataclass
class CocoRepairs:
    """What `validate_coco_detection` repaired in a COCO dict, by kind.

    counts: kind -> number of values repaired (kinds in `REPAIR_TEXT`); duplicates: (removed, kept)
    annotation ids of exact duplicate objects (same image, category, bbox and iscrowd), the later
    entry removed.
    """

    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(REPAIR_TEXT, 0))
    duplicates: list[tuple[int, int]] = field(default_factory=list)

    def __bool__(self) -> bool:
        return any(self.counts.values())

    def text(self) -> str:
        """One phrase per repaired kind, e.g. "2 null 'area' values set to the bbox's w * h"."""
        return "; ".join(f"{count} {REPAIR_TEXT[kind]}" for kind, count in self.counts.items() if count)


REPAIR_TEXT = {
    "duplicate_objects": "exact duplicate objects (same image, category, bbox and iscrowd) removed",
    "null_iscrowd": "null 'iscrowd' values set to 0",
    "bool_iscrowd": "true/false 'iscrowd' values set to 1/0",
    "null_area": "null 'area' values set to the bbox's w * h",
    "null_segmentation": "null 'segmentation' values removed",
    "float_size": "integral float image 'width'/'height' values made integers",
}


def _check_segmentation(value: Any, where: str) -> None:
    """COCO's two segmentation forms: polygons (a list of lists of numbers) or RLE {counts, size}."""
    if isinstance(value, list):
        for polygon in value:
            if not (isinstance(polygon, list) and all(_is_number(v) for v in polygon)):
                raise DatasetError(f"{where}: 'segmentation' must be a list of polygons (lists of finite "
                                   f"numbers) or an RLE {{counts, size}}, got {_short(value)}")
        return
    if isinstance(value, dict):
        size, counts = value.get("size"), value.get("counts")
        size_ok = isinstance(size, list) and len(size) == 2 and all(_is_int(v) and v >= 0 for v in size)
        counts_ok = isinstance(counts, str) or (isinstance(counts, list) and all(_is_int(v) for v in counts))
        if size_ok and counts_ok:
            return
    raise DatasetError(f"{where}: 'segmentation' must be a list of polygons (lists of finite numbers) or an "
                       f"RLE {{counts: str or list of integers, size: [h, w]}}, got {_short(value)}")


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def validate_coco_detection(data: Any, path: str | os.PathLike, *, warn: bool = True) -> CocoRepairs:
    """Check that `data` (the parsed json of `path`) is a COCO detection set; fill and repair fields.

    Every field detr_lab or COCOeval reads is checked: images' `id`, `file_name`, `width`/`height`
    (positive integers where present), categories' `id`, annotations' `id`, `image_id`,
    `category_id` (integers naming a listed image / category), `bbox` (4 finite numbers), `iscrowd`
    (0 or 1), `area` (a finite number >= 0) and `segmentation` where present (polygons or RLE).

    Mutates `data`: absent `iscrowd` becomes 0 and absent `area` w * h (pycocotools' evaluator needs
    both); the repairs COCO's conventions allow are made and counted (`CocoRepairs`): null
    `iscrowd` -> 0, true/false `iscrowd` -> 1/0, null `area` -> w * h, null `segmentation` removed,
    integral float `width`/`height` (640.0) -> int, and exact duplicate objects (same `image_id`,
    `category_id`, `bbox` and `iscrowd`) removed, keeping the first. With `warn`, one
    `AnnotationWarning` names the file and the counts.

    Raises:
        DatasetError: a value that cannot be repaired; the message names the file, the image,
            annotation or category id and the value.
    """
    if not isinstance(data, dict):
        raise DatasetError(f"{path}: not a COCO detection file: the top level is a {type(data).__name__}, "
                           "expected an object with 'images', 'annotations' and 'categories'")
    for key in ("images", "annotations", "categories"):
        if key not in data:
            raise DatasetError(f"{path}: not a COCO detection file: missing top-level key '{key}'")
        if not isinstance(data[key], list):
            raise DatasetError(f"{path}: '{key}' must be a list, got {type(data[key]).__name__}")

    repairs = CocoRepairs()
    image_ids: set[int] = set()
    for i, image in enumerate(data["images"]):
        where = f"{path}: images[{i}]"
        if not isinstance(image, dict):
            raise DatasetError(f"{where} is not an object")
        for key in ("id", "file_name"):
            if key not in image:
                raise DatasetError(f"{where} has no '{key}'")
        if not _is_int(image["id"]):
            raise DatasetError(f"{where}: 'id' must be an integer, got {image['id']!r}")
        if not isinstance(image["file_name"], str) or not image["file_name"]:
            raise DatasetError(f"{where} (image id {image['id']}): 'file_name' must be a non-empty string, "
                               f"got {_short(image['file_name'])}")
        for key in ("width", "height"):
            value = image.get(key)
            if isinstance(value, float) and value.is_integer() and value > 0:
                image[key] = int(value)
                repairs.counts["float_size"] += 1
            elif key in image and not (_is_int(value) and value > 0):
                raise DatasetError(f"{where} (image id {image['id']}): '{key}' must be a positive integer, "
                                   f"got {value!r}")
        if image["id"] in image_ids:
            raise DatasetError(f"{path}: image id {image['id']} appears twice in 'images'")
        image_ids.add(image["id"])

    category_ids: set[int] = set()
    for i, category in enumerate(data["categories"]):
        if not isinstance(category, dict) or "id" not in category:
            raise DatasetError(f"{path}: categories[{i}] has no 'id'")
        if not _is_int(category["id"]):
            raise DatasetError(f"{path}: categories[{i}]: 'id' must be an integer, got {category['id']!r}")
        if category["id"] in category_ids:
            raise DatasetError(f"{path}: category id {category['id']} appears twice in 'categories'")
        category_ids.add(category["id"])

    annotation_ids: set[int] = set()
    first_of: dict[tuple, int] = {}
    kept = []
    for i, ann in enumerate(data["annotations"]):
        if not isinstance(ann, dict):
            raise DatasetError(f"{path}: annotations[{i}] is not an object")
        if "id" not in ann:
            raise DatasetError(f"{path}: annotations[{i}] has no 'id'")
        ann_id = ann["id"]
        where = f"{path}: annotation id {ann_id!r} (annotations[{i}])"
        if not _is_int(ann_id):
            raise DatasetError(f"{where}: 'id' must be an integer")
        if ann_id in annotation_ids:
            raise DatasetError(f"{path}: annotation id {ann_id} appears twice in 'annotations'")
        annotation_ids.add(ann_id)
        for key in ("image_id", "category_id", "bbox"):
            if key not in ann:
                raise DatasetError(f"{where} has no '{key}'")
        for key in ("image_id", "category_id"):
            if not _is_int(ann[key]):
                raise DatasetError(f"{where}: '{key}' must be an integer, got {ann[key]!r}")
        bbox = ann["bbox"]
        if not (isinstance(bbox, list) and len(bbox) == 4 and all(_is_number(v) for v in bbox)):
            raise DatasetError(f"{where}: 'bbox' must be 4 finite numbers [x, y, w, h], got {_short(bbox)}")
        if ann["image_id"] not in image_ids:
            raise DatasetError(f"{where} refers to image_id {ann['image_id']!r}, which is not in 'images'")
        if ann["category_id"] not in category_ids:
            raise DatasetError(
                f"{where} has category_id {ann['category_id']!r}, which is not in 'categories'"
            )
        _check_crowd_and_area(ann, where, repairs)
        key = (ann["image_id"], ann["category_id"], tuple(float(v) for v in bbox), ann["iscrowd"])
        if key in first_of:
            repairs.duplicates.append((ann_id, first_of[key]))
            continue
        first_of[key] = ann_id
        kept.append(ann)
    if repairs.duplicates:
        data["annotations"] = kept
        repairs.counts["duplicate_objects"] = len(repairs.duplicates)
    if warn and repairs:
        warnings.warn(f"{path}: {repairs.text()}", AnnotationWarning, stacklevel=2)
    return repairs


def _check_crowd_and_area(ann: dict, where: str, repairs: CocoRepairs) -> None:
    """Fill, repair or refuse an annotation's `iscrowd`, `area` and `segmentation` (see
    `validate_coco_detection`)."""
    crowd = ann.get("iscrowd", 0)
    if crowd is None:
        crowd = 0
        repairs.counts["null_iscrowd"] += 1
    elif isinstance(crowd, bool):
        crowd = int(crowd)
        repairs.counts["bool_iscrowd"] += 1
    elif not (_is_int(crowd) and crowd in (0, 1)):
        raise DatasetError(f"{where}: 'iscrowd' must be 0 or 1, got {crowd!r}")
    ann["iscrowd"] = crowd
    bbox = ann["bbox"]
    if "area" not in ann:
        ann["area"] = float(bbox[2] * bbox[3])
    elif ann["area"] is None:
        ann["area"] = float(bbox[2] * bbox[3])
        repairs.counts["null_area"] += 1
    elif not (_is_number(ann["area"]) and ann["area"] >= 0):
        raise DatasetError(f"{where}: 'area' must be a finite number >= 0, got {ann['area']!r}")
    if "segmentation" in ann:
        if ann["segmentation"] is None:
            del ann["segmentation"]
            repairs.counts["null_segmentation"] += 1
        else:
            _check_segmentation(ann["segmentation"], where)


def coco_from_dict(data: dict) -> COCO:
    """A pycocotools `COCO` index over an already validated dataset dict (without its stdout chatter)."""
    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def resolve_category_ids(
    data: dict, path: str | os.PathLike, category_ids: Sequence[int] | None = None
) -> tuple[list[int], list[str]]:
    """The class mapping of a validated COCO dict: (category_ids, class_names), index = class index.

    With `category_ids` None: the sorted ids of `categories`. An explicit list must hold unique
    integers; ids it has that the json lacks are named `UNNAMED_CATEGORY`.
    """
    names = {c["id"]: str(c.get("name", c["id"])) for c in data["categories"]}
    if category_ids is None:
        ids = sorted(names)
    else:
        ids = list(category_ids)
        for value in ids:
            if not _is_int(value):
                raise DatasetError(f"category_ids: {value!r} is not an integer")
        seen: set[int] = set()
        for value in ids:
            if value in seen:
                raise DatasetError(f"category_ids: category id {value} appears twice")
            seen.add(value)
    if not ids:
        raise DatasetError(f"{path}: no categories (empty 'categories' and no explicit category_ids)")
    return ids, [names.get(i, UNNAMED_CATEGORY) for i in ids]


def read_categories(
    annotation_file: str | os.PathLike, category_ids: Sequence[int] | None = None
) -> tuple[list[int], list[str]]:
    """(category_ids, class_names) of an annotation file, as `CocoDetectionDataset` would resolve them."""
    return resolve_category_ids(read_coco_json(annotation_file), annotation_file, category_ids)


# ------------------------------------------------------------------------------------------ dataset
class CocoDetectionDataset(Dataset):
    """A COCO-format detection set: `dataset[i]` -> (image, target).

    image: float `[3, H, W]` as the transform returns it (ImageNet-normalized).
    target: `boxes` float `[N, 4]` normalized cxcywh in [0, 1] of the transformed image, `labels`
    int64 `[N]` class indices, `image_id` int64 scalar, `orig_size` int64 `[2]` (h, w) of the upright
    decoded file, `size` int64 `[2]` (h, w) after the transform.

    Args:
        images_dir: folder the json's `file_name`s are relative to.
        annotation_file: COCO instances json.
        transforms: `(image uint8 [H, W, 3], boxes [N, 4] absolute xyxy, labels [N]) ->
            (image [3, H', W'], boxes [N', 4] normalized cxcywh, labels [N'])`, e.g. from
            `detr_lab.data.transforms.build_train_transform`; None: ImageNet normalization only.
            An object with `set_random_seed(seed)` is reseeded for every sample read with an
            `(epoch, index)` key (see `sample_seed`), else once in each process that reads the dataset
            (from `torch.initial_seed()`), so DataLoader workers draw different augmentations.
        sample_seed: with it, `dataset[(epoch, index)]` draws its augmentation from a generator
            seeded by (sample_seed, epoch, index) alone, whatever process, worker or resume reads it
            (`detr_lab.data.samplers.EpochSampler` yields such keys); `dataset[index]` is unchanged.
            A transform with `set_epoch(epoch)` (epoch-dependent, e.g. RT-DETR's `StopEpochTransform`)
            is told the key's epoch before each sample (None for `dataset[index]`), and the target
            of such a sample also holds `epoch` (int64 scalar), for an epoch-dependent collate
            (`detr_lab.data.collate.SquareMultiScaleCollate`; every collate removes it). A transform
            with `set_sample_source(load, size)` (DEIM's mosaic, `detr_lab.data.mosaic`) is given
            `raw_sample` and `len(self)`, to read other images of the set; the partners it draws come
            from its per-sample seed, so they too depend on (sample_seed, epoch, index) only.
        category_ids: class index -> category id; None: the sorted ids of the json's categories.
        skip_corrupt_images: an image that cannot be decoded is skipped (the next index is read
            instead) and counted in `num_skipped_images`, with a logged warning; otherwise it raises
            `CorruptImageError`. Missing files always raise.
        check_files: check at construction that every image file exists (one directory listing).

    Raises:
        DatasetError: invalid json or class mapping (see `read_coco_json`); `MissingImageError` for
            image files missing at construction (with check_files) or when read.
    """

    def __init__(
        self,
        images_dir: str | os.PathLike,
        annotation_file: str | os.PathLike,
        *,
        transforms: SampleTransform | None = None,
        category_ids: Sequence[int] | None = None,
        skip_corrupt_images: bool = False,
        check_files: bool = True,
        sample_seed: int | None = None,
    ) -> None:
        self.images_dir = Path(images_dir)
        self.annotation_file = Path(annotation_file)
        if not self.images_dir.is_dir():
            raise DatasetError(
                f"image folder not found: {self.images_dir} (images of {self.annotation_file})"
            )
        data = self.read_annotations()
        self.category_ids, self.class_names = resolve_category_ids(data, self.annotation_file, category_ids)
        if transforms is None:
            transforms = DetectionTransform([])
        self.transforms = transforms
        self.skip_corrupt_images = skip_corrupt_images
        self.sample_seed = sample_seed
        self.num_skipped_images = 0
        self._seeded_pid: int | None = None
        self._index_targets(data)
        if check_files:
            self._check_files_exist()
        connect = getattr(self.transforms, "set_sample_source", None)
        if connect is not None:  # a transform that joins several images (DEIM's mosaic) reads them here
            connect(self.raw_sample, len(self))

    # -------------------------------------------------------------------------------- construction
    def _index_targets(self, data: dict) -> None:
        """Keep per-image boxes as flat arrays + offsets; count and report repaired boxes."""
        class_of = {category_id: index for index, category_id in enumerate(self.category_ids)}
        images = sorted(data["images"], key=lambda image: image["id"])
        row_of = {image["id"]: row for row, image in enumerate(images)}
        self.image_ids = np.array([image["id"] for image in images], dtype=np.int64)
        self.file_names = [image["file_name"] for image in images]
        # 0 where the json does not give the size.
        self._json_sizes = np.array([(image.get("height", 0), image.get("width", 0)) for image in images],
                                    dtype=np.int64).reshape(-1, 2)

        # Sizes for clipping: the json's, else the file header's (so those boxes are counted too).
        clip_sizes = self._json_sizes.copy()
        for row, (height, width) in enumerate(clip_sizes):
            if not (height and width):
                header = _header_size(self.images_dir / self.file_names[row])
                if header is not None:
                    clip_sizes[row] = header

        per_image: list[list[tuple[float, float, float, float, int]]] = [[] for _ in images]
        self.num_crowd = 0
        counts = {"non_positive_size": 0, "outside_image": 0, "clipped": 0, "float32_resolution": 0}
        for ann in data["annotations"]:
            if ann["category_id"] not in class_of:
                raise DatasetError(
                    f"{self.annotation_file}: annotation id {ann['id']} has category_id "
                    f"{ann['category_id']}, which is not in the class mapping "
                    f"(category_ids {self.category_ids})"
                )
            if ann["iscrowd"]:
                self.num_crowd += 1
                continue
            x, y, w, h = (float(v) for v in ann["bbox"])
            if not (w > 0 and h > 0):
                counts["non_positive_size"] += 1
                continue
            box = (x, y, x + w, y + h)
            row = row_of[ann["image_id"]]
            height, width = clip_sizes[row]
            if width > 0 and height > 0:
                clipped = (min(max(box[0], 0.0), width), min(max(box[1], 0.0), height),
                           min(max(box[2], 0.0), width), min(max(box[3], 0.0), height))
                if clipped[2] <= clipped[0] or clipped[3] <= clipped[1]:
                    counts["outside_image"] += 1
                    continue
                if clipped != box:
                    counts["clipped"] += 1
                box = clipped
            stored = np.asarray(box, dtype=np.float32)  # boxes are kept as float32
            if not (stored[2] > stored[0] and stored[3] > stored[1]):
                counts["float32_resolution"] += 1  # e.g. x = 2**25, w = 1: x + w == x in float32
                continue
            per_image[row].append((*box, class_of[ann["category_id"]]))

        self.degenerate_box_counts = counts
        if any(counts.values()):
            warnings.warn(
                f"{self.annotation_file}: dropped {counts['non_positive_size']} boxes of zero or negative "
                f"size, {counts['outside_image']} boxes outside their image and "
                f"{counts['float32_resolution']} boxes thinner than float32 resolution at their position; "
                f"clipped {counts['clipped']} boxes reaching outside their image",
                AnnotationWarning,
                stacklevel=3,
            )
        lengths = np.array([len(rows) for rows in per_image], dtype=np.int64)
        self._offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        flat = [row for rows in per_image for row in rows]
        table = np.array(flat, dtype=np.float64).reshape(-1, 5)
        self._boxes = table[:, :4].astype(np.float32)  # [M, 4] absolute xyxy
        self._labels = table[:, 4].astype(np.int64)  # [M]

    def _check_files_exist(self) -> None:
        try:
            present = {entry.name for entry in os.scandir(self.images_dir)}
        except OSError as err:
            raise DatasetError(f"cannot list image folder {self.images_dir}: {err}") from err
        missing = []
        for image_id, name in zip(self.image_ids.tolist(), self.file_names, strict=True):
            nested = "/" in name or os.sep in name
            exists = (self.images_dir / name).is_file() if nested else name in present
            if not exists:
                missing.append(f"{self.images_dir / name} (image id {image_id})")
        if missing:
            shown = "; ".join(missing[:5]) + (f"; and {len(missing) - 5} more" if len(missing) > 5 else "")
            raise MissingImageError(
                f"{len(missing)} image file(s) named in {self.annotation_file} not found: {shown}"
            )

    # ------------------------------------------------------------------------------------ access
    @property
    def num_classes(self) -> int:
        return len(self.category_ids)

    @cached_property
    def coco(self) -> COCO:
        """The pycocotools index of the annotation file (read again on first use), for the evaluator."""
        return coco_from_dict(self.read_annotations())

    def read_annotations(self) -> dict:
        """The validated COCO dict behind the dataset (other formats override this; read on each call)."""
        return read_coco_json(self.annotation_file)

    def __len__(self) -> int:
        return len(self.file_names)

    def image_path(self, index: int) -> Path:
        return self.images_dir / self.file_names[index]

    def upright_sizes(self) -> list[tuple[int, int] | None]:
        """Per index the (h, w) of the decoded upright image, read from the file headers (cached);
        None for a file whose header cannot be read."""
        if getattr(self, "_upright_sizes", None) is None:
            self._upright_sizes = [_header_size(self.image_path(i)) for i in range(len(self))]
        return list(self._upright_sizes)

    def load_sample(self, index: int) -> RawSample:
        """Decode image `index` and its non-crowd targets, boxes clipped to the decoded image.

        Raises MissingImageError / CorruptImageError naming the file and image id.
        """
        path = self.image_path(index)
        image_id = int(self.image_ids[index])
        image = load_rgb_image(path, image_id)
        height, width = image.shape[:2]
        json_height, json_width = (int(v) for v in self._json_sizes[index])
        if json_width and (json_height, json_width) != (height, width):
            swapped = (json_height, json_width) == (width, height)
            hint = (" (sides swapped: the file's EXIF orientation rotates it, and the annotations may refer "
                    "to the stored, unrotated pixels)" if swapped else "")
            warnings.warn(
                f"{path} (image id {image_id}): decoded upright size (h, w) = ({height}, {width}) differs "
                f"from the annotation file's ({json_height}, {json_width}){hint}; boxes are clipped to the "
                "decoded image",
                AnnotationWarning,
                stacklevel=2,
            )
        start, end = self._offsets[index], self._offsets[index + 1]
        boxes = self._boxes[start:end].copy()
        labels = self._labels[start:end].copy()
        boxes[:, 0::2] = boxes[:, 0::2].clip(0, width)
        boxes[:, 1::2] = boxes[:, 1::2].clip(0, height)
        keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        return RawSample(image=image, boxes=boxes[keep], labels=labels[keep], image_id=image_id, path=path)

    def raw_sample(self, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """`(image uint8 [H, W, 3], boxes float32 [N, 4] absolute xyxy, labels int64 [N])` of `index`,
        decoded and untransformed (`load_sample`): the images a mosaic adds to a sample. With
        `skip_corrupt_images` a corrupt image is skipped for the next index, as `dataset[index]` does."""
        for attempt in range(len(self)):
            current = (index + attempt) % len(self)
            try:
                sample = self.load_sample(current)
            except CorruptImageError as err:
                if not self.skip_corrupt_images:
                    raise
                self.num_skipped_images += 1
                logger.warning("skipping a corrupt image (%d skipped so far in process %d): %s",
                               self.num_skipped_images, os.getpid(), err)
                continue
            return sample.image, sample.boxes, sample.labels
        raise DatasetError(f"every image of {self.annotation_file} failed to decode")

    def _prepare_this_process(self) -> None:
        """Once per process: reseed the transforms (OpenCV's threads are set before workers fork:
        `DetectionDataModule`)."""
        pid = os.getpid()
        if self._seeded_pid != pid:
            set_seed = getattr(self.transforms, "set_random_seed", None)
            if set_seed is not None:
                # Differs between DataLoader workers (base seed + worker id) and between epochs
                # unless workers persist; equals the global seed in the main process.
                set_seed(torch.initial_seed() % 2**32)
            self._seeded_pid = pid

    def _transformed(self, index: int, epoch: int | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        sample = self.load_sample(index)
        try:
            image, boxes, labels = self.transforms(sample.image, sample.boxes, sample.labels)
        except DatasetError:
            raise
        except Exception as err:
            raise DatasetError(
                f"transforming {sample.path} (image id {sample.image_id}) failed: {type(err).__name__}: {err}"
            ) from err
        target = {
            "boxes": boxes,
            "labels": labels,
            "image_id": torch.tensor(sample.image_id, dtype=torch.int64),
            "orig_size": torch.tensor(sample.image.shape[:2], dtype=torch.int64),
            "size": torch.tensor(image.shape[-2:], dtype=torch.int64),
        }
        if epoch is not None and hasattr(self.transforms, "set_epoch"):
            target["epoch"] = torch.tensor(epoch, dtype=torch.int64)
        return image, target

    def _seed_sample(self, epoch: int, index: int) -> None:
        set_seed = getattr(self.transforms, "set_random_seed", None)
        if set_seed is not None and self.sample_seed is not None:
            entropy = [self.sample_seed % 2**32, epoch, index]
            set_seed(int(np.random.SeedSequence(entropy).generate_state(1)[0]))

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[Tensor, dict[str, Tensor]]:
        """`dataset[index]`, or `dataset[(epoch, index)]` for augmentation drawn from (sample_seed,
        epoch, index) (see the class docstring)."""
        self._prepare_this_process()
        epoch, index = key if isinstance(key, tuple) else (None, key)
        set_epoch = getattr(self.transforms, "set_epoch", None)
        if set_epoch is not None:
            set_epoch(epoch)
        first_error: CorruptImageError | None = None
        for attempt in range(len(self)):
            current = (index + attempt) % len(self)
            if epoch is not None:
                self._seed_sample(epoch, current)
            try:
                return self._transformed(current, epoch)
            except CorruptImageError as err:
                if not self.skip_corrupt_images:
                    raise
                first_error = first_error or err
                self.num_skipped_images += 1
                logger.warning("skipping a corrupt image (%d skipped so far in process %d): %s",
                               self.num_skipped_images, os.getpid(), err)
        raise DatasetError(f"every image of {self.annotation_file} failed to decode; first: {first_error}")
