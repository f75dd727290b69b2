"""A built-in synthetic detection dataset, written to disk as a real COCO-format set.

Coloured shapes (circle, square, triangle, star, ring, cross) of distinct colours, from small to large,
1 to 6 per image with little overlap, over cluttered backgrounds (muted gradients, lines, blobs and
noise). Layout as COCO 2017 under `root`:

    root/train2017/*.jpg   root/val2017/*.jpg
    root/annotations/instances_train2017.json   root/annotations/instances_val2017.json
    root/synthetic.json    the generator's parameters (marks a complete dataset)

Category ids are deliberately non-contiguous (1, 2, 3, 5, 8, 13) so that the class-index mapping is
exercised. Boxes are the tight extents of the drawn pixels; `area` is the drawn pixel count.
Generation is deterministic given the parameters (each image is drawn from its own seed, so the val
split does not depend on the number of training images) and atomic: everything is written to a
temporary folder beside `root`, which is renamed to `root` at the end.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

from detr_lab.config import DataConfig
from detr_lab.data.errors import DatasetError
from detr_lab.files import atomic_write, atomic_write_text

GENERATOR_VERSION = 1
META_FILE = "synthetic.json"
SPLITS = ("train", "val")
MAX_OBJECTS = 6
SIZE_RANGE = (0.15, 0.6)  # object size as a fraction of the image's shorter side (log-uniform)
MAX_OVERLAP = 0.1  # largest intersection / smaller box area allowed between two objects
VAL_IMAGE_ID_OFFSET = 1_000_000  # val image ids follow 1_000_001.. so ids never collide across splits


@dataclass(frozen=True)
class ShapeCategory:
    id: int
    name: str
    color: tuple[int, int, int]  # saturated, far from the muted background colours


SHAPE_CATEGORIES = (
    ShapeCategory(1, "circle", (220, 40, 40)),
    ShapeCategory(2, "square", (40, 175, 60)),
    ShapeCategory(3, "triangle", (40, 90, 235)),
    ShapeCategory(5, "star", (245, 205, 25)),
    ShapeCategory(8, "ring", (205, 50, 215)),
    ShapeCategory(13, "cross", (20, 205, 210)),
)
SYNTHETIC_CATEGORY_IDS = [c.id for c in SHAPE_CATEGORIES]
SYNTHETIC_CLASS_NAMES = [c.name for c in SHAPE_CATEGORIES]


def split_paths(root: str | os.PathLike, split: str) -> tuple[Path, Path]:
    """(image folder, annotation file) of `split` ("train" or "val") under `root`."""
    root = Path(root)
    return root / f"{split}2017", root / "annotations" / f"instances_{split}2017.json"


# ------------------------------------------------------------------------------------------ drawing
def _polygon(points: np.ndarray, center: tuple[float, float], radius: float, angle: float) -> list[tuple]:
    """Unit-radius `[K, 2]` points rotated by `angle`, scaled by `radius`, moved to `center`."""
    cos, sin = math.cos(angle), math.sin(angle)
    rotated = points @ np.array([[cos, sin], [-sin, cos]])
    return [(center[0] + radius * x, center[1] + radius * y) for x, y in rotated]


def _star_points() -> np.ndarray:
    angles = np.arange(10) * math.pi / 5 - math.pi / 2
    radii = np.where(np.arange(10) % 2 == 0, 1.0, 0.45)
    return np.stack([radii * np.cos(angles), radii * np.sin(angles)], axis=1)


def _cross_points(arm: float) -> np.ndarray:
    a = arm / 2
    return np.array([(-a, -1), (a, -1), (a, -a), (1, -a), (1, a), (a, a), (a, 1), (-a, 1),
                     (-a, a), (-1, a), (-1, -a), (-a, -a)], dtype=np.float64)


def _draw_shape_mask(name: str, size: tuple[int, int], center: tuple[float, float], radius: float,
                     rng: np.random.Generator) -> Image.Image:
    """An "L" mask of the image size with the shape drawn in 255."""
    mask = Image.new("L", size, 0)
    draw = ImageDraw.Draw(mask)
    cx, cy = center
    angle = float(rng.uniform(0, 2 * math.pi))
    if name in ("circle", "ring"):
        aspect = float(rng.uniform(0.85, 1.15))
        rx, ry = radius * min(aspect, 1.0), radius * min(1.0 / aspect, 1.0)
        draw.ellipse([cx - rx, cy - ry, cx + rx, cy + ry], fill=255)
        if name == "ring":
            inner = float(rng.uniform(0.45, 0.6))
            draw.ellipse([cx - rx * inner, cy - ry * inner, cx + rx * inner, cy + ry * inner], fill=0)
    elif name == "square":
        aspect = float(rng.uniform(0.8, 1.25))
        half_w, half_h = 0.8 * min(aspect, 1.0), 0.8 * min(1.0 / aspect, 1.0)
        corners = np.array([(-half_w, -half_h), (half_w, -half_h), (half_w, half_h), (-half_w, half_h)])
        draw.polygon(_polygon(corners, center, radius, float(rng.uniform(-0.35, 0.35))), fill=255)
    elif name == "triangle":
        angles = angle + np.arange(3) * 2 * math.pi / 3
        draw.polygon(_polygon(np.stack([np.cos(angles), np.sin(angles)], 1), center, radius, 0.0), fill=255)
    elif name == "star":
        draw.polygon(_polygon(_star_points(), center, radius, angle), fill=255)
    elif name == "cross":
        draw.polygon(_polygon(_cross_points(0.4), center, radius, float(rng.uniform(-0.5, 0.5))), fill=255)
    else:
        raise ValueError(f"unknown shape {name!r}")
    return mask


def _muted_color(rng: np.random.Generator, spread: int = 25) -> tuple[int, int, int]:
    gray = int(rng.integers(60, 190))
    return tuple(int(np.clip(gray + rng.integers(-spread, spread + 1), 0, 255)) for _ in range(3))


def _background(width: int, height: int, rng: np.random.Generator) -> Image.Image:
    """Muted gradient with random lines and faint blobs."""
    start, end = np.array(_muted_color(rng)), np.array(_muted_color(rng))
    angle = rng.uniform(0, 2 * math.pi)
    ys, xs = np.mgrid[0:height, 0:width]
    t = (xs * math.cos(angle) + ys * math.sin(angle)).astype(np.float32)
    t = (t - t.min()) / max(float(t.max() - t.min()), 1.0)
    pixels = start[None, None, :] * (1 - t[..., None]) + end[None, None, :] * t[..., None]
    image = Image.fromarray(pixels.astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(0, 4))):
        r = float(rng.uniform(0.05, 0.2)) * min(width, height)
        x, y = float(rng.uniform(0, width)), float(rng.uniform(0, height))
        draw.ellipse([x - r, y - r * rng.uniform(0.5, 1.5), x + r, y + r], fill=_muted_color(rng, spread=15))
    for _ in range(int(rng.integers(4, 13))):
        points = [(float(rng.uniform(0, width)), float(rng.uniform(0, height))) for _ in range(2)]
        draw.line(points, fill=_muted_color(rng), width=int(rng.integers(1, 4)))
    return image


def _overlap(a: tuple[int, ...], b: tuple[int, ...]) -> float:
    """Intersection over the smaller area of two xyxy boxes."""
    iw = min(a[2], b[2]) - max(a[0], b[0])
    ih = min(a[3], b[3]) - max(a[1], b[1])
    if iw <= 0 or ih <= 0:
        return 0.0
    smaller = min((a[2] - a[0]) * (a[3] - a[1]), (b[2] - b[0]) * (b[3] - b[1]))
    return iw * ih / smaller


def draw_synthetic_image(image_size: int, rng: np.random.Generator) -> tuple[Image.Image, list[dict]]:
    """One image (longer side `image_size`) and its objects.

    Objects are dicts with `category_id`, `bbox` [x, y, w, h] (absolute pixels) and `area` (pixel count).
    """
    short = int(round(image_size * rng.uniform(0.6, 1.0)))
    width, height = (image_size, short) if rng.random() < 0.5 else (short, image_size)
    image = _background(width, height, rng)
    objects: list[dict] = []
    boxes: list[tuple[int, ...]] = []
    for _ in range(int(rng.integers(1, MAX_OBJECTS + 1))):
        category = SHAPE_CATEGORIES[int(rng.integers(len(SHAPE_CATEGORIES)))]
        for _attempt in range(30):
            fraction = math.exp(rng.uniform(math.log(SIZE_RANGE[0]), math.log(SIZE_RANGE[1])))
            side = min(width, height) * fraction
            radius = side / 2
            center = (float(rng.uniform(radius + 1, width - radius - 1)),
                      float(rng.uniform(radius + 1, height - radius - 1)))
            mask = _draw_shape_mask(category.name, (width, height), center, radius, rng)
            box = mask.getbbox()  # (x0, y0, x1, y1), x1/y1 exclusive: the pixel extent
            if box is not None and all(_overlap(box, other) <= MAX_OVERLAP for other in boxes):
                break
        else:
            continue  # no free spot for this object
        color = tuple(int(np.clip(c + rng.integers(-20, 21), 0, 255)) for c in category.color)
        image.paste(color, (0, 0, width, height), mask)
        boxes.append(box)
        objects.append({
            "category_id": category.id,
            "bbox": [float(box[0]), float(box[1]), float(box[2] - box[0]), float(box[3] - box[1])],
            "area": float(np.count_nonzero(np.asarray(mask))),
        })
    noisy = np.asarray(image, dtype=np.float32) + rng.normal(0.0, 6.0, (height, width, 3))
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8), "RGB"), objects


# ------------------------------------------------------------------------------------------ writing
def _write_split(root: Path, split: str, num_images: int, image_size: int, seed: int,
                 progress: bool | None = False) -> None:
    images_dir, annotation_file = split_paths(root, split)
    images_dir.mkdir(parents=True)
    annotation_file.parent.mkdir(parents=True, exist_ok=True)
    offset = VAL_IMAGE_ID_OFFSET if split == "val" else 0
    images, annotations = [], []
    disable = None if progress is None else not progress  # None: tqdm shows it on a terminal only
    for index in tqdm(range(num_images), desc=f"generating synthetic {split}", unit="img", disable=disable):
        rng = np.random.default_rng(np.random.SeedSequence([seed, SPLITS.index(split), index]))
        image, objects = draw_synthetic_image(image_size, rng)
        image_id = offset + index + 1
        file_name = f"{image_id:012d}.jpg"
        with atomic_write(images_dir / file_name) as file:
            image.save(file, format="JPEG", quality=92, subsampling=0)  # 4:4:4 keeps thin colour tips
        images.append({"id": image_id, "file_name": file_name, "width": image.width, "height": image.height})
        for obj in objects:
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "iscrowd": 0, **obj})
    data = {
        "info": {"description": "detr_lab synthetic shapes", "version": str(GENERATOR_VERSION)},
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": [{"id": c.id, "name": c.name, "supercategory": "shape"} for c in SHAPE_CATEGORIES],
    }
    atomic_write_text(annotation_file, json.dumps(data))


def _parameters(num_train: int, num_val: int, image_size: int, seed: int) -> dict:
    return {"generator_version": GENERATOR_VERSION, "num_train": int(num_train), "num_val": int(num_val),
            "image_size": int(image_size), "seed": int(seed)}


def _read_meta(root: Path) -> dict | None:
    meta = root / META_FILE
    if not meta.is_file():
        return None
    try:
        return json.loads(meta.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise DatasetError(f"{meta}: unreadable synthetic dataset description: {err}") from err


def _check_matches(root: Path, meta: dict, wanted: dict) -> None:
    different = {key: (meta.get(key), value) for key, value in wanted.items() if meta.get(key) != value}
    if different:
        details = ", ".join(f"{key}: on disk {have!r}, wanted {want!r}"
                            for key, (have, want) in different.items())
        raise DatasetError(
            f"{root} holds a synthetic dataset generated with other parameters ({details}); "
            "delete it or set another data.root"
        )


def generate_synthetic_dataset(
    root: str | os.PathLike, *, num_train: int = 400, num_val: int = 80, image_size: int = 256, seed: int = 0,
    progress: bool | None = False,
) -> Path:
    """Write the synthetic dataset to `root` (which must not exist, or be an empty folder); return `root`.

    `progress`: a bar of the images written per split on stderr (None: only when stderr is a terminal).

    Atomic: written into a temporary folder beside `root`, then renamed. If another process completes
    the same dataset first, its copy is kept.
    """
    root = Path(root)
    if num_train <= 0 or num_val <= 0 or image_size < 32:
        raise ValueError(
            f"need num_train > 0, num_val > 0, image_size >= 32; got {num_train}, {num_val}, {image_size}"
        )
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise DatasetError(f"cannot generate the synthetic dataset into {root}: it exists and is not empty")
    wanted = _parameters(num_train, num_val, image_size, seed)
    root.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=f".{root.name}.partial-", dir=root.parent))
    try:
        os.chmod(partial, 0o755)
        _write_split(partial, "train", num_train, image_size, seed, progress)
        _write_split(partial, "val", num_val, image_size, seed, progress)
        atomic_write_text(partial / META_FILE, json.dumps(wanted, indent=2))  # last: marks it complete
        try:
            os.rename(partial, root)  # replaces `root` only if it is an empty folder
        except OSError:
            meta = _read_meta(root)
            if meta is None:
                raise DatasetError(f"cannot move the generated synthetic dataset to {root}") from None
            _check_matches(root, meta, wanted)  # a concurrent generation won the race
    finally:
        if partial.exists():
            shutil.rmtree(partial, ignore_errors=True)
    return root


def ensure_synthetic_dataset(data_cfg: DataConfig) -> Path:
    """Generate the synthetic dataset under `data_cfg.root` on first use (with a progress bar on a
    terminal); reuse it afterwards.

    Raises:
        DatasetError: `root` holds a synthetic set made with other `data.synthetic` parameters, or
            other files.
    """
    root = Path(data_cfg.root)
    synth = data_cfg.synthetic
    wanted = _parameters(synth.num_train, synth.num_val, synth.image_size, synth.seed)
    meta = _read_meta(root)
    if meta is not None:
        _check_matches(root, meta, wanted)
        return root
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise DatasetError(
            f"data.root {root} exists but is not a generated synthetic dataset (no {META_FILE}); "
            "set data.root to a new folder for data.dataset: synthetic"
        )
    return generate_synthetic_dataset(root, num_train=synth.num_train, num_val=synth.num_val,
                                      image_size=synth.image_size, seed=synth.seed, progress=None)
