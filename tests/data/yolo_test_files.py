"""Helpers for the tests: write a tiny YOLO-format (Ultralytics layout) dataset."""

from __future__ import annotations

from pathlib import Path

from PIL import Image

# image stem -> (width, height, label lines); sizes differ so that pixel boxes are checked per image.
TRAIN = {
    "a": (64, 32, ["0 0.5 0.5 0.5 0.5", "1 0.25 0.25 0.25 0.5"]),
    "b": (40, 40, []),  # an empty label file
}
VAL = {
    "c": (50, 100, ["1 0.2 0.3 0.2 0.1"]),
    "d": (30, 60, None),  # no label file at all
}


def write_yolo_set(root: Path, *, names="[cat, dog]", val=None, extra_yaml: str = "") -> Path:
    """Write images/{train,val}, labels/{train,val} and data.yaml under `root`; return the yaml path."""
    for split, items in (("train", TRAIN), ("val", VAL if val is None else val)):
        (root / "images" / split).mkdir(parents=True, exist_ok=True)
        (root / "labels" / split).mkdir(parents=True, exist_ok=True)
        for stem, (width, height, lines) in items.items():
            Image.new("RGB", (width, height), (120, 100, 80)).save(root / "images" / split / f"{stem}.png")
            if lines is not None:
                (root / "labels" / split / f"{stem}.txt").write_text("\n".join(lines) + "\n")
    path = root / "data.yaml"
    path.write_text(f"path: .\ntrain: images/train\nval: images/val\nnames: {names}\n{extra_yaml}")
    return path
