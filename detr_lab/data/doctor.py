"""The dataset doctor: checks a run's train and val splits against its config before training.

    report = diagnose(load_config("configs/my_set.yaml"))
    print(report.text()); sys.exit(1 if report.errors else 0)      # what tools/doctor.py does

Findings have a severity:
- "error": training would fail or be silently wrong: an unreadable or invalid annotation file or
  label line, duplicate image/annotation/category ids (the other checks then keep the first entry
  of each), `model.num_classes` other than the number of categories, training categories missing
  from the class mapping, more objects in an image than `model.num_queries` (the matcher can assign
  at most one object per query: the rest are never learned), missing or unreadable image files
  (the full doctor decodes every file; `brief` reads headers), image files whose upright size
  differs from the annotation file's `width`/`height` (boxes then refer to other pixels; EXIF
  rotation named), a split with no image or no usable object, no categories at all, and YOLO label
  lines with coordinates above 1 (pixels instead of fractions). Findings on YOLO sets name the label
  file and line (`a.txt:3`), on COCO sets the annotation id.
- "warning": the loader repairs or ignores something (zero-size boxes dropped, boxes reaching outside
  their image clipped or dropped, exact duplicate objects removed, null `area`/`iscrowd` filled, see
  `detr_lab.data.coco.validate_coco_detection`, YOLO label files without an image), a category
  without training objects, strong class imbalance, a large share of padding.
- "info": counts and statistics: categories, images with no objects, objects per image against
  `num_queries`, image sizes and the padding they cause at `data.batch_size`, class counts, and for
  small datasets suggested settings.

Padding waste: the share of each padded batch tensor that is padding, over the whole split, with the
image sizes after the configured resize (training: a shorter side drawn from `augment.train_scales`,
random crops ignored; validation: `augment.eval_size`) and batches drawn as the loaders draw them
(shuffled for training, in order for validation), seeded. With `augment.policy: rtdetr` every image is
resized to `augment.square_size` squared, so there is no padding.

`brief=True` (the check at the start of training) opens the headers of a seeded sample of
`BRIEF_FILE_SAMPLE` images per split instead of all of them; every other check reads the
annotations only and is always complete.
"""

from __future__ import annotations

import copy
import json
import os
import warnings
from collections import Counter
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np
from lightning.pytorch.utilities import rank_zero_info

from detr_lab.config import Config
from detr_lab.data.coco import CocoRepairs, validate_coco_detection
from detr_lab.data.datamodule import coco_split_paths, resolve_format
from detr_lab.data.errors import DatasetError
from detr_lab.data.images import load_rgb_image
from detr_lab.data.synthetic import ensure_synthetic_dataset
from detr_lab.data.transforms import shorter_side_size
from detr_lab.data.yolo import upright_size, yolo_split_to_coco
from detr_lab.files import atomic_write_text

SEVERITIES = ("error", "warning", "info")
BRIEF_FILE_SAMPLE = 32  # images per split whose files are opened at the start of training
SMALL_DATASET = 2000  # training images below which the doctor suggests small-data settings
RESNET_FROZEN_STAGES = 1  # a ResNet's `model.backbone.frozen_stages: null` (as in detr_lab.models.build)
IMBALANCE_RATIO = 10.0  # most / least frequent class (with objects) above which it warns
PADDING_WARNING = 0.5  # padding share of the batch tensors above which it warns
PADDING_BATCH_DRAWS = 20  # shuffled epochs simulated for the training split's padding
NORMALIZED_TOLERANCE = 0.01  # YOLO coordinates above 1 + this are taken for pixels


@dataclass(frozen=True)
class Finding:
    severity: str  # "error" | "warning" | "info"
    split: str | None  # "train", "val" or None for the whole dataset
    message: str

    def line(self) -> str:
        where = f"[{self.split}] " if self.split else ""
        return f"{self.severity.upper() if self.severity != 'info' else 'info':7s} {where}{self.message}"


@dataclass
class DoctorReport:
    """The findings of `diagnose`, in the order they were made."""

    source: str
    findings: list[Finding] = field(default_factory=list)

    def add(self, severity: str, split: str | None, message: str) -> None:
        assert severity in SEVERITIES, severity
        self.findings.append(Finding(severity, split, message))

    def of(self, severity: str) -> list[Finding]:
        return [f for f in self.findings if f.severity == severity]

    @property
    def errors(self) -> list[Finding]:
        """Findings that would make training fail or silently wrong (a tool exits non-zero)."""
        return self.of("error")

    @property
    def warnings(self) -> list[Finding]:
        return self.of("warning")

    def to_dict(self) -> dict:
        """JSON-ready: `source`, `errors` and `warnings` (counts), `findings` (severity, split, message)."""
        return {
            "source": self.source,
            "errors": len(self.errors),
            "warnings": len(self.warnings),
            "findings": [
                {"severity": f.severity, "split": f.split, "message": f.message} for f in self.findings
            ],
        }

    def write_json(self, path: str | os.PathLike) -> Path:
        """Write `to_dict()` as JSON at `path` (atomically) and return the path."""
        return atomic_write_text(path, json.dumps(self.to_dict(), indent=1))

    def text(self, *, lowest: str = "info") -> str:
        """The report: a heading, one line per finding down to severity `lowest` (errors first), a
        count line."""
        shown = SEVERITIES[: SEVERITIES.index(lowest) + 1]
        ordered = sorted((f for f in self.findings if f.severity in shown),
                         key=lambda f: SEVERITIES.index(f.severity))
        lines = [f"dataset doctor: {self.source}", *(f.line() for f in ordered)]
        n_err, n_warn = len(self.errors), len(self.warnings)
        verdict = "training would fail or be silently wrong" if n_err else "no blocking problem"
        lines.append(f"{n_err} error(s), {n_warn} warning(s): {verdict}")
        return "\n".join(lines)


@dataclass
class _Split:
    """One split's annotations, as the datasets read them."""

    name: str
    images_dir: Path
    annotation_file: Path
    data: dict
    # annotation id -> where a finding should point (YOLO: "<label file>:<line>"); None: the id itself
    sources: dict[int, str] | None = None

    def describe(self, annotation_ids: list[int]) -> str:
        """Up to five annotations named for the user: "annotation ids 3, 4" or "label lines a.txt:2"."""
        shown = annotation_ids[:5]
        more = " ..." if len(annotation_ids) > 5 else ""
        if self.sources is None:
            return f"annotation ids {', '.join(map(str, shown))}{more}"
        return f"label lines {', '.join(self.sources[i] for i in shown)}{more}"


# ------------------------------------------------------------------------------------- reading
def _duplicates(values: list) -> list:
    return sorted(value for value, count in Counter(values).items() if count > 1)


def _read_coco_split(report: DoctorReport, name: str, images_dir: Path, path: Path) -> _Split | None:
    if not path.is_file():
        report.add("error", name, f"annotation file not found: {path}")
        return None
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        report.add("error", name, f"{path}: not valid JSON: {err}")
        return None
    duplicated = False
    if isinstance(data, dict):
        for key, label in (("images", "image"), ("annotations", "annotation"), ("categories", "category")):
            items = data.get(key)
            if not isinstance(items, list):
                continue
            ids = [item.get("id") for item in items if isinstance(item, dict) and "id" in item]
            repeated = _duplicates([i for i in ids if isinstance(i, int)])
            if repeated:
                duplicated = True
                shown = ", ".join(map(str, repeated[:5])) + (" ..." if len(repeated) > 5 else "")
                report.add("error", name, f"{path}: {len(repeated)} {label} id(s) appear more than once "
                                          f"in '{key}': {shown}")
    if duplicated:
        data = _first_of_each_id(data)
        report.add("info", name, "the checks below keep the first entry of each duplicated id")
    try:
        repairs = validate_coco_detection(data, path, warn=False)
    except DatasetError as err:
        report.add("error", name, str(err))
        return None
    split = _Split(name, images_dir, path, data)
    _report_repairs(report, split, repairs)
    return split


def _report_repairs(report: DoctorReport, split: _Split, repairs: CocoRepairs) -> None:
    """A warning for the values the loader repairs, naming the first duplicate objects."""
    if not repairs:
        return
    message = f"{split.annotation_file}: the loader repairs {repairs.text()}"
    if repairs.duplicates:
        removed = [i for i, _ in repairs.duplicates]
        message += f" (duplicates: {split.describe(removed)})"
    report.add("warning", split.name, message)


def _first_of_each_id(data: dict) -> dict:
    """A copy of a COCO dict without the later entries of repeated image, annotation, category ids."""
    data = copy.deepcopy(data)
    for key in ("images", "annotations", "categories"):
        seen: set[int] = set()
        kept = []
        for item in data[key]:
            item_id = item.get("id") if isinstance(item, dict) else None
            if isinstance(item_id, int) and item_id in seen:
                continue
            if isinstance(item_id, int):
                seen.add(item_id)
            kept.append(item)
        data[key] = kept
    return data


def _read_yolo_split(report: DoctorReport, name: str, data_yaml: Path) -> _Split | None:
    try:
        with warnings.catch_warnings(record=True):
            warnings.simplefilter("always")
            converted = yolo_split_to_coco(data_yaml, name)
    except DatasetError as err:
        report.add("error", name, str(err))
        return None
    if converted.orphan_labels:
        shown = ", ".join(str(p) for p in converted.orphan_labels[:3])
        report.add("warning", name, f"{len(converted.orphan_labels)} label file(s) without an image are "
                                    f"ignored: {shown}{' ...' if len(converted.orphan_labels) > 3 else ''}")
    sources = {i: converted.where(i) for i in converted.sources}
    split = _Split(name, converted.root, data_yaml, converted.coco, sources)
    _report_repairs(report, split, converted.repairs)
    _check_normalized(report, split)
    return split


def _check_normalized(report: DoctorReport, split: _Split) -> None:
    """YOLO coordinates are fractions of the image size: label lines with values above 1 (pixels?)."""
    size_of = {img["id"]: (img["width"], img["height"]) for img in split.data["images"]}
    over = []
    for ann in split.data["annotations"]:
        width, height = size_of[ann["image_id"]]
        x, y, w, h = ann["bbox"]
        fractions = ((x + w / 2) / width, (y + h / 2) / height, w / width, h / height)
        if max(fractions) > 1 + NORMALIZED_TOLERANCE:
            over.append(ann["id"])
    if over:
        report.add("error", split.name, f"{len(over)} label lines have coordinates above 1 "
                                        f"({split.describe(over)}): YOLO boxes are 'class cx cy w h' as "
                                        "fractions of the image width and height, not pixels")


# ------------------------------------------------------------------------------------- checks
def _check_categories(report: DoctorReport, cfg: Config, splits: dict[str, _Split]) -> list[int]:
    """Category ids and num_classes; returns the class mapping (the val split's sorted ids)."""
    mapping_split = splits.get("val") or splits.get("train")
    assert mapping_split is not None
    names = {c["id"]: str(c.get("name", c["id"])) for c in mapping_split.data["categories"]}
    ids = sorted(names)
    if not ids:
        report.add("error", None, f"{mapping_split.annotation_file} lists no categories (its 'categories' "
                                  "is empty; the class mapping comes from it): list the objects' categories")
        return ids
    shown = ", ".join(f"{i}:{names[i]}" for i in ids[:12]) + (" ..." if len(ids) > 12 else "")
    report.add("info", None, f"{len(ids)} categories (id:name, class index = position): {shown}")
    num_classes = cfg.model.num_classes
    if num_classes != len(ids):  # the training module needs one class output per category
        report.add("error", None, f"'model.num_classes' is {num_classes} but the data has {len(ids)} "
                                  f"categories: set model.num_classes={len(ids)}")
    if "train" in splits and mapping_split is not splits["train"]:
        train_ids = {a["category_id"] for a in splits["train"].data["annotations"]}
        unknown = sorted(train_ids - set(ids))
        if unknown:
            report.add("error", "train", f"category ids {unknown} are used in "
                                         f"{splits['train'].annotation_file} but not listed in "
                                         f"{mapping_split.annotation_file} (the class mapping)")
    return ids


def _box_problems(split: _Split) -> tuple[dict[str, list[int]], list[int], Counter]:
    """Per kind, the annotation ids of repaired boxes; per image, the objects the loader keeps; and
    per category id, the objects kept."""
    problems: dict[str, list[int]] = {"non_positive_size": [], "outside_image": [], "clipped": []}
    size_of = {img["id"]: (img.get("width", 0), img.get("height", 0)) for img in split.data["images"]}
    kept: Counter = Counter()
    kept_categories: Counter = Counter()
    for ann in split.data["annotations"]:
        if ann.get("iscrowd"):
            continue
        x, y, w, h = (float(v) for v in ann["bbox"])
        if not (w > 0 and h > 0):
            problems["non_positive_size"].append(ann["id"])
            continue
        width, height = size_of[ann["image_id"]]
        if width and height:
            x1, y1 = min(max(x, 0.0), width), min(max(y, 0.0), height)
            x2, y2 = min(max(x + w, 0.0), width), min(max(y + h, 0.0), height)
            if x2 <= x1 or y2 <= y1:
                problems["outside_image"].append(ann["id"])
                continue
            if (x1, y1, x2, y2) != (x, y, x + w, y + h):
                problems["clipped"].append(ann["id"])
        kept[ann["image_id"]] += 1
        kept_categories[ann["category_id"]] += 1
    return problems, [kept[img["id"]] for img in split.data["images"]], kept_categories


def _ids(values: list[int]) -> str:
    return ", ".join(map(str, values[:5])) + (" ..." if len(values) > 5 else "")


def _check_objects(report: DoctorReport, cfg: Config, split: _Split) -> tuple[list[int], Counter]:
    """Boxes, empty images, objects per image; returns the objects kept per image and per category."""
    name = split.name
    problems, per_image, per_category = _box_problems(split)
    if problems["non_positive_size"]:
        ids = problems["non_positive_size"]
        report.add("warning", name, f"{len(ids)} boxes of zero or negative width or height are dropped "
                                    f"({split.describe(ids)})")
    if problems["outside_image"]:
        report.add("warning", name, f"{len(problems['outside_image'])} boxes lie outside their image and are "
                                    f"dropped ({split.describe(problems['outside_image'])})")
    if problems["clipped"]:
        report.add("warning", name, f"{len(problems['clipped'])} boxes reach outside their image and are "
                                    f"clipped ({split.describe(problems['clipped'])})")
    crowd = sum(1 for a in split.data["annotations"] if a.get("iscrowd"))
    if crowd:
        report.add("info", name, f"{crowd} crowd annotations are left out of the targets "
                                 "(kept for evaluation)")
    counts = np.array(per_image, dtype=np.int64)
    num_images = len(counts)
    empty = int((counts == 0).sum())
    report.add("info", name, f"{num_images} images, {int(counts.sum())} objects; {empty} images "
                             f"({100.0 * empty / max(num_images, 1):.1f}%) have no objects")
    if num_images == 0:
        report.add("error", name, f"{split.annotation_file}: the {name} split has no images")
    elif counts.sum() == 0:
        use = "training has no targets" if name == "train" else "evaluation has nothing to score (AP -1)"
        report.add("error", name, f"{split.annotation_file}: no usable object in the {name} split (after "
                                  f"dropping crowd and degenerate boxes): {use}")
    if num_images:
        queries = cfg.model.num_queries
        report.add("info", name, f"objects per image: mean {counts.mean():.1f}, 95th percentile "
                                 f"{np.percentile(counts, 95):.0f}, max {counts.max()} "
                                 f"(model.num_queries {queries})")
        over = np.flatnonzero(counts > queries)
        if len(over):
            image_ids = [split.data["images"][i]["id"] for i in over]
            report.add("error", name, f"{len(over)} images have more objects than 'model.num_queries' "
                                      f"({queries}; max {counts.max()}, image ids {_ids(image_ids)}): the "
                                      "objects beyond one per query are never matched; "
                                      "raise model.num_queries")
    return per_image, per_category


def _resized_sizes(sizes: np.ndarray, scales: np.ndarray, max_size: int) -> np.ndarray:
    """`[N, 2]` (h, w) -> `[N, 2]` (h, w) after the shorter-side resize to `scales[i]`."""
    return np.array([shorter_side_size(int(h), int(w), int(s), max_size) for (h, w), s in zip(sizes, scales,
                                                                                            strict=True)],
                    dtype=np.int64).reshape(-1, 2)


def padding_waste(sizes: np.ndarray, batch_size: int, order: np.ndarray) -> float:
    """Share of the padded batch tensors that is padding.

    Args:
        sizes: int `[N, 2]` (h, w) of the images as batched.
        batch_size: images per batch (the last batch may be smaller).
        order: int `[M]` image indices in loader order (M may repeat the N images over epochs).
    Returns:
        padding pixels / batch-tensor pixels, in [0, 1).
    """
    ordered = sizes[np.asarray(order)].astype(np.int64)  # (M, 2)
    full = len(ordered) // batch_size * batch_size
    batches = [ordered[:full].reshape(-1, batch_size, 2)]  # (M // B, B, 2)
    if full < len(ordered):
        batches.append(ordered[full:][None])  # the last, smaller batch
    padded = sum(int((b.shape[1] * b[:, :, 0].max(1) * b[:, :, 1].max(1)).sum()) for b in batches)
    real = int((ordered[:, 0] * ordered[:, 1]).sum())
    return 1.0 - real / padded if padded else 0.0


def _check_sizes(report: DoctorReport, cfg: Config, split: _Split) -> None:
    images = split.data["images"]
    known = [(img["height"], img["width"]) for img in images if img.get("width") and img.get("height")]
    if len(known) < len(images):
        report.add("warning", split.name, f"{len(images) - len(known)} images have no 'width'/'height' in "
                                          f"{split.annotation_file}: their boxes cannot be checked here")
    if not known:
        return
    sizes = np.array(known, dtype=np.int64)
    aspect = sizes[:, 1] / sizes[:, 0]
    widths, heights = sizes[:, 1], sizes[:, 0]
    width_text = f"{widths.min()}..{widths.max()} (median {np.median(widths):g})"
    height_text = f"{heights.min()}..{heights.max()} (median {np.median(heights):g})"
    report.add("info", split.name, f"image widths {width_text}, heights {height_text}; "
                                   f"aspect w/h {aspect.min():.2f}..{aspect.max():.2f}")
    augment, batch_size = cfg.data.augment, cfg.data.batch_size
    rng = np.random.default_rng(0)
    if augment.policy == "rtdetr":
        side = augment.square_size
        report.add("info", split.name, f"no padding: every image is resized to {side} x {side} "
                                       "(data.augment.policy rtdetr)")
        return
    if split.name == "train":
        order = np.concatenate([rng.permutation(len(sizes)) for _ in range(PADDING_BATCH_DRAWS)])
        scales = rng.choice(np.array(augment.train_scales), size=len(sizes))
        resized = _resized_sizes(sizes, scales, augment.max_size)
        how = f"shuffled, shorter side from {list(augment.train_scales)}"
    else:
        order = np.arange(len(sizes))
        resized = _resized_sizes(sizes, np.full(len(sizes), augment.eval_size), augment.eval_max_size)
        how = f"in order, shorter side {augment.eval_size}"
    waste = padding_waste(resized, batch_size, order)
    message = (f"padding is {100 * waste:.1f}% of the batch tensors at data.batch_size {batch_size} ({how})")
    if waste > PADDING_WARNING:
        report.add("warning", split.name, message + ": mixed aspect ratios; a smaller batch or more uniform "
                                                    "image shapes waste less compute")
    else:
        report.add("info", split.name, message)


def _check_files(report: DoctorReport, split: _Split, sample: int | None) -> None:
    """Missing or unreadable image files, and upright sizes that differ from the json's. With a
    `sample` the headers of that many files are read, else every file is decoded in full (a truncated
    file has a readable header)."""
    images = split.data["images"]
    indices = np.arange(len(images))
    if sample is not None and len(images) > sample:
        indices = np.sort(np.random.default_rng(0).choice(len(images), size=sample, replace=False))
    missing, unreadable, mismatched = [], [], []
    for i in indices:
        image = images[int(i)]
        path = split.images_dir / image["file_name"]
        if not path.is_file():
            missing.append(f"{path} (image id {image['id']})")
            continue
        try:
            if sample is None:
                height, width = load_rgb_image(path, image["id"]).shape[:2]
            else:
                width, height = upright_size(path)
        except DatasetError as err:
            unreadable.append(str(err))
            continue
        expected = (image.get("width"), image.get("height"))
        if None in expected or expected == (width, height):
            continue
        why = (" (EXIF orientation rotates the stored pixels: the annotations may refer to the unrotated "
               "image)" if expected == (height, width) else "")
        mismatched.append(f"{path} (image id {image['id']}): file {width}x{height}, annotations "
                          f"{expected[0]}x{expected[1]}{why}")
    checked = f"of {len(indices)} checked" + (" (a sample)" if len(indices) < len(images) else "")
    for label, items in (("image files missing", missing), ("image files unreadable", unreadable),
                         ("images whose upright size differs from the annotation file's width x height",
                          mismatched)):
        if items:
            shown = "; ".join(items[:3]) + ("; ..." if len(items) > 3 else "")
            report.add("error", split.name, f"{len(items)} {checked}: {label}: {shown}")


def _check_balance(report: DoctorReport, split: _Split, class_ids: list[int], counts: Counter) -> None:
    """Categories without objects and the most / least frequent class (objects the loader keeps)."""
    names = {c["id"]: str(c.get("name", c["id"])) for c in split.data["categories"]}
    per_class = {i: counts.get(i, 0) for i in class_ids}
    absent = [i for i, n in per_class.items() if n == 0]
    if absent and split.name == "train":
        report.add("warning", split.name, f"{len(absent)} categories have no training objects (ids "
                                          f"{_ids(absent)}): the model cannot learn them")
    present = sorted(((n, i) for i, n in per_class.items() if n > 0), reverse=True)
    if len(present) >= 2:
        (most, most_id), (least, least_id) = present[0], present[-1]
        ratio = most / least
        message = (f"class counts: most {names.get(most_id, most_id)} ({most}), least "
                   f"{names.get(least_id, least_id)} ({least}), ratio {ratio:.1f}")
        if ratio > IMBALANCE_RATIO and split.name == "train":
            report.add("warning", split.name, message + ": strongly imbalanced; rare classes may be missed "
                                                        "(more data or resampling of the rare classes)")
        else:
            report.add("info", split.name, message)


def denoising_option(cfg: Config) -> str | None:
    """Dotted name of a denoising switch of the model config, if the schema has one."""
    for f in fields(cfg.model):
        if "denois" in f.name or f.name in ("dn", "dn_number", "num_denoising"):
            return f"model.{f.name}"
    return None


def _backbone_hint(cfg: Config) -> str | None:
    """How to start from pretrained weights and keep them, for the configured backbone type; None when
    that is done already. The ResNet-only options (`frozen_stages`, `norm`) may be None (their default),
    and other types have neither: freezing them is `optim.lr_backbone=0`."""
    backbone = cfg.model.backbone
    pretrained = backbone.pretrained or bool(backbone.weights_path)
    if backbone.type == "resnet":
        frozen = RESNET_FROZEN_STAGES if backbone.frozen_stages is None else backbone.frozen_stages
        if not pretrained:
            return ("a pretrained backbone, frozen (model.backbone.pretrained=true or weights_path, "
                    "model.backbone.frozen_stages=4, model.backbone.norm=frozen_bn)")
        if frozen < 4 and cfg.optim.lr_backbone > 0:
            return "freezing more of the pretrained backbone (model.backbone.frozen_stages=4)"
        return None
    if not pretrained:
        return ("a pretrained backbone, frozen (model.backbone.pretrained=true or weights_path, "
                "optim.lr_backbone=0)")
    if cfg.optim.lr_backbone > 0:
        return "freezing the pretrained backbone (optim.lr_backbone=0)"
    return None


def _suggest_small_data(report: DoctorReport, cfg: Config, num_train: int, max_objects: int) -> None:
    if num_train >= SMALL_DATASET:
        return
    hints = []
    queries = cfg.model.num_queries
    if max_objects and queries > 3 * max_objects:
        target = max(10, 2 * max_objects)
        hints.append(f"fewer queries (model.num_queries={target}; at most {max_objects} objects per image)")
    backbone_hint = _backbone_hint(cfg)
    if backbone_hint:
        hints.append(backbone_hint)
    option = denoising_option(cfg)
    hints.append(f"denoising training ({option})" if option else
                 "query denoising training (noised ground-truth boxes as extra decoder queries, as in "
                 "DN-DETR and DINO), which speeds up convergence on little data")
    report.add("info", None, f"small dataset ({num_train} training images); consider: " + "; ".join(hints))


# ------------------------------------------------------------------------------------- entry
def diagnose(cfg: Config, *, brief: bool = False) -> DoctorReport:
    """Check the train and val splits of `cfg.data` against `cfg.model` and `cfg.data`; see the module doc.

    Args:
        cfg: the run's config (reads `data` and `model.num_classes`, `num_queries`, `backbone`); the
            synthetic dataset is generated first if it does not exist yet.
        brief: open only a seeded sample of `BRIEF_FILE_SAMPLE` image files per split.
    Returns:
        A `DoctorReport`; its `errors` are the findings that would make training fail or silently
        wrong. Problems of the data are findings, never exceptions.
    """
    data_cfg = cfg.data
    if data_cfg.dataset == "synthetic":
        ensure_synthetic_dataset(data_cfg)  # generated on first use, as training does
    fmt = resolve_format(data_cfg)
    yaml_path = Path(data_cfg.root) / data_cfg.yolo_data
    report = DoctorReport(source=f"{fmt} dataset at {yaml_path if fmt == 'yolo' else data_cfg.root}")
    splits: dict[str, _Split] = {}
    for name in ("train", "val"):
        if fmt == "yolo":
            split = _read_yolo_split(report, name, yaml_path)
        else:
            images_dir, annotations = coco_split_paths(data_cfg, name)
            split = _read_coco_split(report, name, images_dir, annotations)
        if split is not None:
            splits[name] = split
    if not splits:
        return report

    class_ids = _check_categories(report, cfg, splits)
    max_objects = 0
    for split in splits.values():
        per_image, per_category = _check_objects(report, cfg, split)
        max_objects = max([max_objects, *per_image])
        _check_sizes(report, cfg, split)
        if fmt != "yolo" or not brief:  # YOLO headers were read by the conversion
            _check_files(report, split, BRIEF_FILE_SAMPLE if brief else None)
        _check_balance(report, split, class_ids, per_category)
    if "train" in splits:
        _suggest_small_data(report, cfg, len(splits["train"].data["images"]), max_objects)
    return report


def check_at_training_start(cfg: Config) -> DoctorReport | None:
    """The brief check `train` runs when `data.doctor` is on (not for the generated synthetic set).

    Logs the errors and warnings (the statistics are left to `tools/doctor.py`). Raises:
        DatasetError: the report has errors; the message gives the first and how to see all.
    """
    if not cfg.data.doctor or cfg.data.dataset == "synthetic":
        return None
    report = diagnose(cfg, brief=True)
    rank_zero_info(report.text(lowest="warning") + " (statistics: tools/doctor.py)")
    if report.errors:
        first = report.errors[0]
        raise DatasetError(
            f"dataset doctor: {len(report.errors)} problem(s) would make training fail or silently wrong; "
            f"first: [{first.split or 'dataset'}] {first.message} (full report: "
            "tools/doctor.py --config ...; data.doctor=false skips this check)"
        )
    return report
