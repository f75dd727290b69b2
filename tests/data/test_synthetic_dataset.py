"""The synthetic shapes set: COCO 2017 layout, deterministic, boxes on the drawn shapes, atomic writes."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from detr_lab.config import DataConfig, SyntheticConfig
from detr_lab.data import synthetic
from detr_lab.data.coco import CocoDetectionDataset
from detr_lab.data.errors import DatasetError
from detr_lab.data.synthetic import (
    SHAPE_CATEGORIES,
    ensure_synthetic_dataset,
    generate_synthetic_dataset,
    split_paths,
)

SMALL = {"num_train": 4, "num_val": 2, "image_size": 96, "seed": 0}


@pytest.fixture(scope="module")
def small_root(tmp_path_factory):
    return generate_synthetic_dataset(tmp_path_factory.mktemp("synth") / "shapes", **SMALL)


def test_layout_and_categories(small_root):
    for split, count in (("train", 4), ("val", 2)):
        images_dir, annotation_file = split_paths(small_root, split)
        assert images_dir.name == f"{split}2017"
        assert annotation_file == small_root / "annotations" / f"instances_{split}2017.json"
        data = json.loads(annotation_file.read_text())
        assert len(data["images"]) == count == len(list(images_dir.glob("*.jpg")))
        ids = [c["id"] for c in data["categories"]]
        assert len(ids) >= 5 and ids != list(range(1, len(ids) + 1))  # non-contiguous on purpose
        for image in data["images"]:
            with Image.open(images_dir / image["file_name"]) as file:
                assert file.format == "JPEG" and file.size == (image["width"], image["height"])
                assert max(file.size) == 96
    train_ids = {i["id"] for i in json.loads(split_paths(small_root, "train")[1].read_text())["images"]}
    val_ids = {i["id"] for i in json.loads(split_paths(small_root, "val")[1].read_text())["images"]}
    assert not train_ids & val_ids


def test_loads_as_a_coco_dataset(small_root):
    images_dir, annotation_file = split_paths(small_root, "train")
    dataset = CocoDetectionDataset(images_dir, annotation_file)
    assert dataset.category_ids == sorted(c.id for c in SHAPE_CATEGORIES)
    assert dataset.degenerate_box_counts == {"non_positive_size": 0, "outside_image": 0, "clipped": 0,
                                             "float32_resolution": 0}
    counts = [len(dataset.load_sample(i).labels) for i in range(len(dataset))]
    assert all(1 <= c <= synthetic.MAX_OBJECTS for c in counts)


def test_boxes_are_tight_around_the_shape_colour(small_root):
    """Inside each box, the pixels of the object's colour reach all four sides (within JPEG blur)."""
    colors = {c.id: np.array(c.color, dtype=np.float32) for c in SHAPE_CATEGORIES}
    for split in ("train", "val"):
        images_dir, annotation_file = split_paths(small_root, split)
        data = json.loads(annotation_file.read_text())
        files = {i["id"]: images_dir / i["file_name"] for i in data["images"]}
        for ann in data["annotations"]:
            pixels = np.asarray(Image.open(files[ann["image_id"]]).convert("RGB"), dtype=np.float32)
            x, y, w, h = (int(v) for v in ann["bbox"])
            assert w > 0 and h > 0 and ann["area"] > 0
            window = pixels[y:y + h, x:x + w]
            close = np.abs(window - colors[ann["category_id"]]).max(-1) < 60
            rows, cols = np.nonzero(close)
            assert len(rows) > 0.3 * ann["area"], ann
            assert rows.min() <= 2 and cols.min() <= 2, ann
            assert rows.max() >= h - 3 and cols.max() >= w - 3, ann


def test_deterministic_from_the_seed(tmp_path, small_root):
    again = generate_synthetic_dataset(tmp_path / "again", **SMALL)
    other = generate_synthetic_dataset(tmp_path / "other", **{**SMALL, "seed": 1})
    for split in ("train", "val"):
        first_dir, first_json = split_paths(small_root, split)
        again_dir, again_json = split_paths(again, split)
        assert first_json.read_text() == again_json.read_text()
        for path in first_dir.iterdir():
            assert path.read_bytes() == (again_dir / path.name).read_bytes()
        assert split_paths(other, split)[1].read_text() != first_json.read_text()


def test_val_split_independent_of_train_size(tmp_path, small_root):
    bigger = generate_synthetic_dataset(tmp_path / "bigger", **{**SMALL, "num_train": 6})
    assert split_paths(bigger, "val")[1].read_text() == split_paths(small_root, "val")[1].read_text()


def test_interrupted_generation_leaves_nothing(tmp_path, monkeypatch):
    real_write = synthetic._write_split

    def failing_write(root, split, *args):
        if split == "val":
            raise KeyboardInterrupt  # interrupted half-way
        real_write(root, split, *args)

    monkeypatch.setattr(synthetic, "_write_split", failing_write)
    with pytest.raises(KeyboardInterrupt):
        generate_synthetic_dataset(tmp_path / "shapes", **SMALL)
    assert list(tmp_path.iterdir()) == []


def _data_cfg(root, **synthetic_overrides) -> DataConfig:
    synthetic_cfg = SyntheticConfig(**{**SMALL, **synthetic_overrides})
    return DataConfig(dataset="synthetic", root=str(root), synthetic=synthetic_cfg)


def test_ensure_generates_once_then_reuses(tmp_path, monkeypatch):
    root = ensure_synthetic_dataset(_data_cfg(tmp_path / "shapes"))
    assert (root / "synthetic.json").is_file()

    def must_not_run(*args, **kwargs):
        raise AssertionError("regenerated an existing dataset")

    monkeypatch.setattr(synthetic, "generate_synthetic_dataset", must_not_run)
    assert ensure_synthetic_dataset(_data_cfg(tmp_path / "shapes")) == root


def test_ensure_refuses_other_parameters_or_foreign_folders(tmp_path):
    ensure_synthetic_dataset(_data_cfg(tmp_path / "shapes"))
    with pytest.raises(DatasetError, match=r"shapes holds a synthetic .*image_size: on disk 96, wanted 128"):
        ensure_synthetic_dataset(_data_cfg(tmp_path / "shapes", image_size=128))
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(DatasetError, match=r"foreign exists but is not a generated synthetic dataset"):
        ensure_synthetic_dataset(_data_cfg(foreign))
    assert (foreign / "notes.txt").read_text() == "mine"
