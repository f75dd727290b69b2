"""YOLO-format detection datasets (the Ultralytics layout), read as in-memory COCO sets.

Layout:

    <root>/data.yaml           path: <dataset folder>   (optional; default the yaml's folder;
                               relative: to the yaml's folder)
                               train: images/train      a folder, a .txt list of image paths (relative
                               val: images/val          ones: to the list's folder), or a list of those;
                                                        relative to `path`
                               names: [cat, dog]        or {0: cat, 1: dog}; optional nc: 2
    <root>/images/train/a.jpg  <root>/labels/train/a.txt   one label file per image, found by
                               replacing the last `images` folder of the image path by `labels` and
                               the suffix by `.txt`

A label file holds one object per line, `class cx cy w h`: the class index (0-based, < number of
names) and the box as normalized centre and size, fractions of the upright image's width and height.
An image without a label file, or with an empty one, has no objects. A segment line (Ultralytics
segmentation labels: `class x1 y1 x2 y2 x3 y3 ...`, three or more normalized points) gives the box
that encloses its points, as Ultralytics does when it trains a detector on segment labels.

`yolo_split_to_coco` turns one split into a COCO detection dict: image ids 1.. in sorted path order,
`file_name` relative to the dataset folder, `width`/`height` the upright (EXIF-rotated) size read
from the file header, category id = YOLO class index, `bbox` absolute `[x, y, w, h]` pixels. That
dict feeds `CocoDetectionDataset` (so boxes are checked, clipped and dropped exactly as for COCO
files) and pycocotools' evaluator; `tools/convert_dataset.py` writes it as a json file.

Errors are `DatasetError`s naming the file, line and value at fault, like those of COCO files.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from detr_lab.data.coco import CocoDetectionDataset, CocoRepairs, validate_coco_detection
from detr_lab.data.errors import AnnotationWarning, DatasetError, MissingImageError
from detr_lab.data.images import IMAGE_SUFFIXES, upright_size
from detr_lab.files import atomic_write_text

SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class YoloDataDescription:
    """A parsed `data.yaml`: the dataset folder, each split's image sources, the class names."""

    yaml_path: Path
    root: Path
    splits: dict[str, list[Path]]  # split -> folders and/or .txt lists (absolute)
    names: list[str]  # class index -> name


@dataclass(frozen=True)
class YoloSplit:
    """One split converted: `coco` is a validated COCO detection dict, file names relative to `root`."""

    root: Path
    coco: dict
    orphan_labels: list[Path]  # label files of the split's label folders without an image
    # annotation id -> (label file, 1-based line) it was read from
    sources: dict[int, tuple[Path, int]] = field(default_factory=dict)
    repairs: CocoRepairs = field(default_factory=CocoRepairs)

    def where(self, annotation_id: int) -> str:
        """"<label file>:<line>" of an annotation of this split."""
        return _where(self.sources, annotation_id)


# ------------------------------------------------------------------------------------- data.yaml
def read_data_yaml(path: str | os.PathLike) -> YoloDataDescription:
    """Parse and check a YOLO `data.yaml`.

    Raises:
        DatasetError: missing or unparsable file; `names` missing, not a list or a dict with keys
            0..n-1, or disagreeing with `nc`; a split entry that is not a string or list of strings.
    """
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"YOLO dataset description not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise DatasetError(f"{path}: not valid YAML: {' '.join(str(err).split())}") from err
    if not isinstance(data, dict):
        raise DatasetError(
            f"{path}: expected a mapping with 'train', 'val' and 'names', got {type(data).__name__}"
        )
    base = path.parent
    root = base
    if data.get("path") not in (None, ""):
        if not isinstance(data["path"], str):
            raise DatasetError(f"{path}: 'path' must be a string, got {data['path']!r}")
        root = Path(data["path"]) if Path(data["path"]).is_absolute() else base / data["path"]

    names = _parse_names(data, path)
    splits: dict[str, list[Path]] = {}
    for split in SPLITS:
        entry = data.get(split)
        if entry is None:
            continue
        items = entry if isinstance(entry, list) else [entry]
        if not items or not all(isinstance(item, str) and item for item in items):
            raise DatasetError(f"{path}: '{split}' must be a path or a list of paths, got {entry!r}")
        splits[split] = [_split_source(root, item) for item in items]
    return YoloDataDescription(yaml_path=path, root=root, splits=splits, names=names)


def _split_source(root: Path, item: str) -> Path:
    """A split entry's path: absolute as is, else relative to `root`. A relative entry starting with
    `../` that does not exist is also tried without it, as Ultralytics does: Roboflow's YOLOv8 exports
    write `train: ../train/images` in a data.yaml that sits beside `train/`."""
    if Path(item).is_absolute():
        return Path(item)
    path = root / item
    if not path.exists() and item.startswith("../"):
        inside = root / item[3:]
        if inside.exists():
            return inside
    return path


def _parse_names(data: dict, path: Path) -> list[str]:
    if "names" not in data:
        raise DatasetError(f"{path}: missing key 'names' (the class names, a list or {{index: name}})")
    raw = data["names"]
    if isinstance(raw, list):
        names = [str(name) for name in raw]
    elif isinstance(raw, dict):
        keys = list(raw)
        if not all(isinstance(k, int) and not isinstance(k, bool) for k in keys) or sorted(keys) != list(
            range(len(keys))
        ):
            raise DatasetError(
                f"{path}: 'names' keys must be the class indices 0..{len(keys) - 1}, got {keys}"
            )
        names = [str(raw[k]) for k in range(len(keys))]
    else:
        raise DatasetError(f"{path}: 'names' must be a list or a mapping, got {type(raw).__name__}")
    if not names:
        raise DatasetError(f"{path}: 'names' is empty")
    nc = data.get("nc")
    if nc is not None and nc != len(names):
        raise DatasetError(f"{path}: 'nc' is {nc!r} but 'names' has {len(names)} entries")
    return names


# ----------------------------------------------------------------------------------- image files
def label_path(image_path: Path) -> Path:
    """The label file of an image: the last `images` folder of its path replaced by `labels`, `.txt`."""
    parts = list(image_path.parts)
    for i in range(len(parts) - 2, -1, -1):
        if parts[i] == "images":
            parts[i] = "labels"
            break
    return Path(*parts).with_suffix(".txt")


def _split_images(description: YoloDataDescription, split: str) -> list[Path]:
    where = description.yaml_path
    if split not in description.splits:
        raise DatasetError(f"{where}: no '{split}' split (keys '{', '.join(SPLITS)}' name the image sources)")
    images: list[Path] = []
    for source in description.splits[split]:
        if source.is_dir():
            images.extend(p for p in source.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        elif source.is_file() and source.suffix == ".txt":
            for number, line in enumerate(source.read_text(encoding="utf-8").splitlines(), start=1):
                line = line.strip()
                if not line:
                    continue
                image = Path(line) if Path(line).is_absolute() else source.parent / line
                if not image.is_file():
                    raise MissingImageError(f"{source}, line {number}: image file not found: {image}")
                images.append(image)
        else:
            raise DatasetError(f"{where}: '{split}' source not found (a folder or a .txt list): {source}")
    if not images:
        raise DatasetError(f"{where}: no image files ({', '.join(IMAGE_SUFFIXES)}) in the '{split}' split")
    return sorted(set(images))


# ----------------------------------------------------------------------------------- label files
LabelObject = tuple[int, float, float, float, float]  # (class, cx, cy, w, h), normalized


def parse_label_file(path: Path, num_classes: int) -> list[LabelObject]:
    """The objects of one label file: (class, cx, cy, w, h), normalized (see `parse_label_lines`)."""
    return [obj for _, obj in parse_label_lines(path, num_classes)]


def parse_label_lines(path: Path, num_classes: int) -> list[tuple[int, LabelObject]]:
    """The objects of one label file with their 1-based line numbers: (line, (class, cx, cy, w, h)).

    A line is `class cx cy w h`, or a segment `class x1 y1 ... xn yn` (n >= 3) whose enclosing box
    is taken.

    Raises:
        DatasetError: "<file>, line <n>: ..." for a line with another number of values, a class that
            is not an integer in [0, num_classes), or a coordinate that is not a finite number.
    """
    objects = []
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise DatasetError(f"{path}: not a text label file: {err}") from err
    for number, line in enumerate(text.splitlines(), start=1):
        values = line.split()
        if not values:
            continue
        where = f"{path}, line {number}"
        segment = len(values) >= 7 and len(values) % 2 == 1
        if len(values) != 5 and not segment:
            raise DatasetError(
                f"{where}: expected 5 values 'class cx cy w h' or a segment 'class x1 y1 x2 y2 x3 y3 ...', "
                f"got {len(values)}: {line.strip()!r}"
            )
        try:
            label = int(values[0])
        except ValueError:
            raise DatasetError(f"{where}: class {values[0]!r} is not an integer") from None
        if not 0 <= label < num_classes:
            raise DatasetError(f"{where}: class {label} is outside [0, {num_classes}) (the data.yaml names)")
        names = [f"{axis}{i}" for i in range(1, len(values) // 2 + 1) for axis in "xy"] if segment \
            else ["cx", "cy", "w", "h"]
        numbers = []
        for name, value in zip(names, values[1:], strict=True):
            try:
                number_value = float(value)
            except ValueError:
                number_value = math.nan
            if not math.isfinite(number_value):
                raise DatasetError(f"{where}: {name} {value!r} is not a finite number")
            numbers.append(number_value)
        if segment:
            xs, ys = numbers[0::2], numbers[1::2]
            x1, y1, x2, y2 = min(xs), min(ys), max(xs), max(ys)
            numbers = [(x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1]
        objects.append((number, (label, *numbers)))
    return objects


# ------------------------------------------------------------------------------------ conversion
def yolo_split_to_coco(data_yaml: str | os.PathLike, split: str) -> YoloSplit:
    """Convert one split ("train" or "val") of a YOLO dataset to a validated COCO detection dict.

    Boxes: `[x, y, w, h]` = `[(cx - w/2) W, (cy - h/2) H, w W, h H]` in pixels of the upright image
    of size W x H. Label files in the split's `labels` folders with no image are listed in
    `orphan_labels` and reported by an `AnnotationWarning`.

    Raises:
        DatasetError: see `read_data_yaml` and `parse_label_file`; `MissingImageError` for an image
            a .txt list names that does not exist; `CorruptImageError` for an unreadable image.
    """
    description = read_data_yaml(data_yaml)
    image_paths = _split_images(description, split)
    images, annotations = [], []
    sources: dict[int, tuple[Path, int]] = {}
    for image_id, image_path in enumerate(image_paths, start=1):
        width, height = upright_size(image_path)
        try:
            file_name = image_path.relative_to(description.root).as_posix()
        except ValueError:
            file_name = str(image_path)  # outside the dataset folder: absolute (Path join keeps it)
        images.append({"id": image_id, "file_name": file_name, "width": width, "height": height})
        labels = label_path(image_path)
        if not labels.is_file():
            continue
        for line, (label, cx, cy, w, h) in parse_label_lines(labels, len(description.names)):
            box = [(cx - w / 2) * width, (cy - h / 2) * height, w * width, h * height]
            annotation_id = len(annotations) + 1
            sources[annotation_id] = (labels, line)
            annotations.append({
                "id": annotation_id, "image_id": image_id, "category_id": label,
                "bbox": box, "area": box[2] * box[3], "iscrowd": 0,
            })
    categories = [{"id": index, "name": name} for index, name in enumerate(description.names)]
    coco = {"images": images, "annotations": annotations, "categories": categories}
    repairs = validate_coco_detection(coco, description.yaml_path, warn=False)
    if repairs.duplicates:
        removed, kept = repairs.duplicates[0]
        first = f"{_where(sources, removed)} repeats {_where(sources, kept)}"
        warnings.warn(f"{description.yaml_path} ({split}): {len(repairs.duplicates)} exact duplicate label "
                      f"line(s) removed (first: {first})", AnnotationWarning, stacklevel=2)
    orphans = _orphan_labels(image_paths)
    if orphans:
        shown = ", ".join(str(p) for p in orphans[:3]) + (" ..." if len(orphans) > 3 else "")
        warnings.warn(f"{description.yaml_path} ({split}): {len(orphans)} label file(s) without an image "
                      f"are not used: {shown}", AnnotationWarning, stacklevel=2)
    return YoloSplit(root=description.root, coco=coco, orphan_labels=orphans, sources=sources,
                     repairs=repairs)


def _where(sources: dict[int, tuple[Path, int]], annotation_id: int) -> str:
    path, line = sources[annotation_id]
    return f"{path}:{line}"


def _orphan_labels(image_paths: list[Path]) -> list[Path]:
    expected = {label_path(p) for p in image_paths}
    folders = {p.parent for p in expected if p.parent.is_dir()}
    return sorted(p for folder in folders for p in folder.glob("*.txt") if p not in expected)


def write_coco_json(data_yaml: str | os.PathLike, split: str, output: str | os.PathLike) -> Path:
    """Write one split of a YOLO dataset as a COCO instances json (atomically); return its path.

    `file_name`s are relative to the dataset folder (`path` of the data.yaml), so that folder is the
    image folder of the written json.
    """
    converted = yolo_split_to_coco(data_yaml, split)
    return atomic_write_text(output, json.dumps(converted.coco))


# --------------------------------------------------------------------------------------- dataset
class YoloDetectionDataset(CocoDetectionDataset):
    """One split of a YOLO dataset: `CocoDetectionDataset` over `yolo_split_to_coco`'s dict.

    Items, targets, box repairs and the `coco` ground truth (built in memory) are as for COCO files;
    category id = YOLO class index. Error messages name `data_yaml` where COCO's name the json.

    Args:
        data_yaml: the dataset's `data.yaml`.
        split: "train" or "val".
        category_id_map: YOLO class index -> the category id to give it (e.g. a checkpoint's, matched
            by name: `detr_lab.data.datamodule.match_by_name`); None: the class index.
        **kwargs: as `CocoDetectionDataset` (transforms, category_ids, skip_corrupt_images, ...).
    """

    def __init__(self, data_yaml: str | os.PathLike, split: str, *,
                 category_id_map: dict[int, int] | None = None, **kwargs: Any) -> None:
        self.split = split
        self.yolo = yolo_split_to_coco(data_yaml, split)
        if category_id_map is not None:
            for category in self.yolo.coco["categories"]:
                category["id"] = category_id_map[category["id"]]
            for annotation in self.yolo.coco["annotations"]:
                annotation["category_id"] = category_id_map[annotation["category_id"]]
        super().__init__(self.yolo.root, data_yaml, **kwargs)

    def read_annotations(self) -> dict:
        return json.loads(json.dumps(self.yolo.coco))  # a deep copy: COCO indexes and edits its dict


def read_yolo_categories(data_yaml: str | os.PathLike) -> tuple[list[int], list[str]]:
    """(category_ids, class_names) of a YOLO dataset: ids 0..n-1 (the class indices) and the names."""
    names = read_data_yaml(data_yaml).names
    return list(range(len(names))), names
