"""Annotation fields checked at load, duplicates removed, blocking doctor findings, YOLO compatibility.

Every case writes a tiny COCO or YOLO set; nothing trains.
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from coco_test_files import solid_image, write_coco_json, write_small_set
from PIL import Image
from yolo_test_files import write_yolo_set

from detr_lab.checkpoints import save_checkpoint
from detr_lab.config import DataConfig, load_config
from detr_lab.data.coco import CocoDetectionDataset, read_coco_json
from detr_lab.data.datamodule import DetectionDataModule
from detr_lab.data.doctor import diagnose
from detr_lab.data.errors import AnnotationWarning, ClassMappingWarning, DatasetError
from detr_lab.data.yolo import YoloDetectionDataset
from detr_lab.engine.evaluate import evaluate_model
from detr_lab.engine.evaluator import CocoEvaluator
from detr_lab.models.build import build_model

from factories import load_tool, tiny_config


def _edit_small_set(root: Path, edit) -> tuple[Path, Path]:
    """`write_small_set`, then `edit(data)` applied to its json (annotation ids 10..13, images 1..3)."""
    images_dir, path = write_small_set(root)
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))
    return images_dir, path


def _annotation(data: dict, ann_id: int) -> dict:
    return next(a for a in data["annotations"] if a["id"] == ann_id)


# -------------------------------------------------------------------------------- kind 3: fields
@pytest.mark.parametrize(("key", "value", "expected"), [
    ("iscrowd", "0", "'iscrowd' must be 0 or 1, got '0'"),
    ("iscrowd", 2, "'iscrowd' must be 0 or 1, got 2"),
    ("area", "320", "'area' must be a finite number >= 0, got '320'"),
    ("area", -5.0, "'area' must be a finite number >= 0, got -5.0"),
    ("area", math.nan, "'area' must be a finite number >= 0, got nan"),
    ("segmentation", "poly", "'segmentation' must be a list of polygons"),
    ("segmentation", [[1, 2, "x", 4, 5, 6]], "'segmentation' must be a list of polygons"),
    ("segmentation", {"counts": 5, "size": [48, 64]}, "RLE"),
    ("bbox", [1, 2, 3], "'bbox' must be 4 finite numbers"),
    ("category_id", "5", "'category_id' must be an integer, got '5'"),
    ("image_id", 1.5, "'image_id' must be an integer, got 1.5"),
])
def test_an_invalid_annotation_field_names_file_id_and_value(tmp_path, key, value, expected):
    images_dir, path = _edit_small_set(tmp_path, lambda data: _annotation(data, 11).update({key: value}))
    with pytest.raises(DatasetError) as caught:
        CocoDetectionDataset(images_dir, path)
    message = str(caught.value)
    assert str(path) in message and "annotation id 11" in message and expected in message


@pytest.mark.parametrize(("key", "value", "expected"), [
    ("width", "64", "'width' must be a positive integer, got '64'"),
    ("height", 0, "'height' must be a positive integer, got 0"),
    ("width", 63.5, "'width' must be a positive integer, got 63.5"),
])
def test_an_invalid_image_size_names_file_image_and_value(tmp_path, key, value, expected):
    images_dir, path = _edit_small_set(tmp_path, lambda data: data["images"][0].update({key: value}))
    with pytest.raises(DatasetError, match="image id 1") as caught:
        read_coco_json(path)
    assert expected in str(caught.value) and str(path) in str(caught.value)


def test_repairable_fields_are_repaired_and_counted(tmp_path):
    def edit(data):
        _annotation(data, 10).update({"area": None, "segmentation": None})
        _annotation(data, 11)["iscrowd"] = None
        _annotation(data, 13)["iscrowd"] = True  # a crowd object now
        data["images"][0]["width"] = 64.0

    images_dir, path = _edit_small_set(tmp_path, edit)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dataset = CocoDetectionDataset(images_dir, path)
    texts = [str(w.message) for w in caught if issubclass(w.category, AnnotationWarning)]
    repaired = [t for t in texts if "null 'area'" in t]
    assert repaired and str(path) in repaired[0]
    for phrase in ("1 null 'area' values set to the bbox's w * h", "1 null 'iscrowd' values set to 0",
                   "1 true/false 'iscrowd' values set to 1/0", "1 null 'segmentation' values removed",
                   "1 integral float image 'width'/'height' values made integers"):
        assert phrase in repaired[0]
    gt = dataset.coco.anns
    assert gt[10]["area"] == 16 * 20 and "segmentation" not in gt[10]
    assert gt[11]["iscrowd"] == 0 and gt[13]["iscrowd"] == 1
    assert dataset.num_crowd == 2  # ann 12 and the repaired ann 13
    _, target = dataset[2]  # image 3: its only object is now a crowd
    assert len(target["labels"]) == 0


def test_the_doctor_reports_a_string_iscrowd_as_an_error(tmp_path):
    _edit_small_set(tmp_path, lambda data: _annotation(data, 10).update({"iscrowd": "0"}))
    cfg = load_config(overrides=["model.num_classes=3", "model.num_queries=10"])
    cfg.data = DataConfig(root=str(tmp_path), train_images="images", train_annotations="annotations.json",
                          val_images="images", val_annotations="annotations.json", num_workers=0)
    errors = [f.message for f in diagnose(cfg).errors]
    assert any("annotation id 10" in m and "'iscrowd' must be 0 or 1, got '0'" in m for m in errors), errors


# --------------------------------------------------------------------------- kind 5: duplicates
def test_exact_duplicate_coco_objects_are_removed_with_a_count(tmp_path):
    def edit(data):
        for new_id, ann_id in ((20, 10), (21, 13), (22, 13)):
            data["annotations"].append({**_annotation(data, ann_id), "id": new_id})
        # same box, other category: not a duplicate
        data["annotations"].append({**_annotation(data, 10), "id": 23, "category_id": 9})

    images_dir, path = _edit_small_set(tmp_path, edit)
    with pytest.warns(AnnotationWarning, match="3 exact duplicate objects"):
        dataset = CocoDetectionDataset(images_dir, path)
    assert sorted(dataset.coco.anns) == [10, 11, 12, 13, 23]
    _, target = dataset[0]
    # class indices of ids 1, 5, 9: 0, 1, 2; image 1 keeps id 5 (ann 10) and id 9 (anns 11, 23)
    assert sorted(target["labels"].tolist()) == [1, 2, 2]


def _yolo_with_every_line_twice(root: Path) -> Path:
    yaml_path = write_yolo_set(root)
    for label in (root / "labels").rglob("*.txt"):
        lines = label.read_text().splitlines()
        label.write_text("\n".join(lines + lines) + "\n")
    return yaml_path


def test_duplicate_yolo_lines_are_removed_and_a_perfect_model_scores_ap_1(tmp_path):
    yaml_path = _yolo_with_every_line_twice(tmp_path)
    expected = r"2 exact duplicate label line\(s\) removed \(first: .*a\.txt:3 repeats .*a\.txt:1\)"
    with pytest.warns(AnnotationWarning, match=expected):
        train = YoloDetectionDataset(yaml_path, "train")
    assert len(train.coco.anns) == 2
    val = YoloDetectionDataset(yaml_path, "val")
    assert len(val.coco.anns) == 1
    evaluator = CocoEvaluator(val.coco, [0, 1])
    # image c (id 1) is 50 x 100: "1 0.2 0.3 0.2 0.1" -> x 5..15, y 25..35; image d (id 2) has none
    evaluator.update({1: {"scores": torch.tensor([0.9]), "labels": torch.tensor([1]),
                          "boxes": torch.tensor([[5.0, 25.0, 15.0, 35.0]])},
                      2: {"scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.int64),
                          "boxes": torch.zeros(0, 4)}})
    assert evaluator.compute()["AP"] == pytest.approx(1.0)


def test_the_doctor_names_duplicate_yolo_label_lines(tmp_path):
    _yolo_with_every_line_twice(tmp_path)
    cfg = load_config(overrides=["model.num_classes=2", "model.num_queries=10"])
    cfg.data = DataConfig(root=str(tmp_path), format="yolo", num_workers=0)
    warned = [f.message for f in diagnose(cfg).warnings if f.split == "train"]
    duplicates = [m for m in warned if "exact duplicate objects" in m]
    assert len(duplicates) == 1
    assert "label lines " in duplicates[0] and "a.txt:3" in duplicates[0] and "a.txt:4" in duplicates[0]


# ------------------------------------------------------------------------ kind 4: the doctor
def _coco_cfg(root: Path, num_classes: int = 3):
    cfg = load_config(overrides=[f"model.num_classes={num_classes}", "model.num_queries=10"])
    cfg.data = DataConfig(root=str(root), train_images="images", train_annotations="train.json",
                          val_images="images", val_annotations="val.json", num_workers=0)
    return cfg


def _two_splits(root: Path, edit_val) -> None:
    images_dir, path = write_small_set(root)
    data = json.loads(path.read_text())
    (root / "train.json").write_text(json.dumps(data))
    edit_val(data)
    (root / "val.json").write_text(json.dumps(data))


def test_a_split_without_images_blocks_training_and_evaluation(tmp_path):
    _two_splits(tmp_path, lambda data: data.update({"images": [], "annotations": []}))
    cfg = _coco_cfg(tmp_path)
    report = diagnose(cfg)
    assert any("the val split has no images" in f.message for f in report.errors if f.split == "val")
    assert "no blocking problem" not in report.text()
    datamodule = DetectionDataModule(cfg)
    with pytest.raises(DatasetError, match=r"val\.json: the val split has no images"):
        datamodule.setup("fit")


def test_a_val_split_without_objects_is_blocking_and_evaluation_refuses_it(tmp_path):
    _two_splits(tmp_path, lambda data: data.update({"annotations": []}))
    cfg = _coco_cfg(tmp_path)
    errors = [f.message for f in diagnose(cfg).errors if f.split == "val"]
    assert any("no usable object in the val split" in m for m in errors), errors
    with pytest.raises(DatasetError, match=r"nothing to evaluate: .*val\.json has 3 images but no object"):
        evaluate_model(cfg, None, [1, 5, 9], torch.device("cpu"), output=tmp_path / "r.json", progress=False,
                       source="model.ckpt")


def test_only_crowd_objects_in_train_is_blocking(tmp_path):
    def crowd_only(data):
        for ann in data["annotations"]:
            ann["iscrowd"] = 1

    images_dir, path = write_small_set(tmp_path)
    data = json.loads(path.read_text())
    (tmp_path / "val.json").write_text(json.dumps(data))
    crowd_only(data)
    (tmp_path / "train.json").write_text(json.dumps(data))
    errors = [f.message for f in diagnose(_coco_cfg(tmp_path)).errors if f.split == "train"]
    assert any("no usable object in the train split" in m and "no targets" in m for m in errors), errors


def test_no_categories_is_an_error_without_suggesting_zero_classes(tmp_path):
    _two_splits(tmp_path, lambda data: data.update({"categories": [], "annotations": []}))
    report = diagnose(_coco_cfg(tmp_path))
    messages = [f.message for f in report.errors]
    assert any("val.json lists no categories" in m for m in messages), messages
    assert not any("num_classes=0" in f.message for f in report.findings)


def test_the_full_doctor_decodes_every_image(tmp_path):
    _two_splits(tmp_path, lambda data: None)
    jpeg = tmp_path / "images" / "a.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(jpeg)
    jpeg.write_bytes(jpeg.read_bytes()[:1500])  # the header stays readable
    cfg = _coco_cfg(tmp_path)
    full = [f.message for f in diagnose(cfg).errors if f.split == "val"]
    assert any("image files unreadable" in m and "a.jpg" in m for m in full), full
    brief = [f.message for f in diagnose(cfg, brief=True).errors]
    assert not any("unreadable" in m for m in brief)  # headers only: the sample check stays fast


def test_yolo_labels_in_pixels_are_blocking_and_named_by_file_and_line(tmp_path):
    write_yolo_set(tmp_path)
    (tmp_path / "labels" / "train" / "a.txt").write_text("0 0.5 0.5 0.5 0.5\n1 32 16 16 8\n")
    (tmp_path / "labels" / "train" / "b.txt").write_text("0 20 20 10 10\n")
    cfg = load_config(overrides=["model.num_classes=2", "model.num_queries=10"])
    cfg.data = DataConfig(root=str(tmp_path), format="yolo", num_workers=0)
    report = diagnose(cfg)
    errors = [f.message for f in report.errors if f.split == "train"]
    pixels = [m for m in errors if "coordinates above 1" in m]
    assert len(pixels) == 1 and "2 label lines" in pixels[0]
    assert f"{tmp_path / 'labels' / 'train' / 'a.txt'}:2" in pixels[0]
    assert f"{tmp_path / 'labels' / 'train' / 'b.txt'}:1" in pixels[0]
    dropped = [f.message for f in report.warnings if "outside their image" in f.message]
    assert dropped and "b.txt:1" in dropped[0] and "annotation ids" not in dropped[0]


def test_a_yolo_split_whose_boxes_are_all_dropped_is_blocking(tmp_path):
    write_yolo_set(tmp_path)
    (tmp_path / "labels" / "train" / "a.txt").write_text("0 40 20 8 8\n")
    cfg = load_config(overrides=["model.num_classes=2", "model.num_queries=10"])
    cfg.data = DataConfig(root=str(tmp_path), format="yolo", num_workers=0)
    errors = [f.message for f in diagnose(cfg).errors if f.split == "train"]
    assert any("no usable object in the train split" in m for m in errors), errors


# ---------------------------------------------------------------------- kind 11: compatibility
def test_a_roboflow_yolov8_export_loads_as_ultralytics_reads_it(tmp_path):
    for folder in ("train", "valid"):
        (tmp_path / folder / "images").mkdir(parents=True)
        (tmp_path / folder / "labels").mkdir(parents=True)
        for stem in ("x", "y"):
            solid_image(40, 20).save(tmp_path / folder / "images" / f"{stem}.jpg")
            (tmp_path / folder / "labels" / f"{stem}.txt").write_text("0 0.5 0.5 0.5 0.5\n")
    (tmp_path / "data.yaml").write_text("train: ../train/images\nval: ../valid/images\ntest: ../test/images\n"
                                        "nc: 1\nnames: ['widget']\nroboflow:\n  workspace: w\n  version: 1\n")
    train = YoloDetectionDataset(tmp_path / "data.yaml", "train")
    val = YoloDetectionDataset(tmp_path / "data.yaml", "val")
    assert len(train) == 2 and len(val) == 2
    assert sorted(train.file_names) == ["train/images/x.jpg", "train/images/y.jpg"]
    assert [a["bbox"] for a in val.coco.dataset["annotations"]] == [[10.0, 5.0, 20.0, 10.0]] * 2


def test_a_missing_parent_relative_split_still_names_the_path(tmp_path):
    (tmp_path / "data.yaml").write_text("train: ../nowhere/images\nval: ../nowhere/images\nnames: [a]\n")
    with pytest.raises(DatasetError, match=r"'train' source not found .*nowhere"):
        YoloDetectionDataset(tmp_path / "data.yaml", "train")


def test_a_yolo_copy_of_a_coco_set_is_mapped_by_name(tmp_path):
    write_yolo_set(tmp_path)
    cfg = load_config(overrides=["model.num_classes=2"])
    cfg.data = DataConfig(root=str(tmp_path), format="yolo", num_workers=0)
    datamodule = DetectionDataModule(cfg, category_ids=[17, 18], class_names=["dog", "cat"])
    with pytest.warns(ClassMappingWarning, match=r"mapped by name \(0 'cat' -> 18, 1 'dog' -> 17\)"):
        datamodule.setup("validate")
    assert datamodule.category_ids == [17, 18] and datamodule.class_names == ["dog", "cat"]
    val = datamodule.val_dataset
    assert [a["category_id"] for a in val.coco.dataset["annotations"]] == [17]  # the val object is a dog
    _, target = val[0]
    assert target["labels"].tolist() == [0]  # class index of id 17 in the model's mapping


def test_yolo_names_that_do_not_match_one_to_one_are_not_mapped(tmp_path):
    write_yolo_set(tmp_path)
    cfg = load_config(overrides=["model.num_classes=2"])
    cfg.data = DataConfig(root=str(tmp_path), format="yolo", num_workers=0)
    datamodule = DetectionDataModule(cfg, category_ids=[17, 18], class_names=["dog", "owl"])
    with warnings.catch_warnings():
        warnings.simplefilter("error", ClassMappingWarning)
        with pytest.raises(DatasetError, match="not in the class mapping"):
            datamodule.setup("validate")
    same = DetectionDataModule(cfg, category_ids=[0, 1], class_names=["cat", "dog"])
    with warnings.catch_warnings():
        warnings.simplefilter("error", ClassMappingWarning)
        same.setup("validate")
    assert same.category_ids == [0, 1]


def test_coco_annotations_survive_a_write_and_read_unchanged(tmp_path):
    """A clean file is not repaired: no warning, the same annotations."""
    _, path = write_small_set(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error", AnnotationWarning)
        data = read_coco_json(path)
    assert [a["id"] for a in data["annotations"]] == [10, 11, 12, 13]
    write_coco_json(tmp_path / "copy.json", data["images"], data["annotations"], data["categories"])
    assert read_coco_json(tmp_path / "copy.json") == data


def test_eval_tool_with_nothing_to_evaluate_exits_non_zero(tmp_path, capsys):
    _two_splits(tmp_path, lambda data: data.update({"annotations": []}))
    cfg = tiny_config()
    checkpoint = save_checkpoint(tmp_path / "model.pt", build_model(cfg.model), cfg, [1, 5, 9],
                                 ["one", "five", "nine"])
    config = tmp_path / "eval.yaml"
    config.write_text(f"data: {{root: {tmp_path}, val_images: images, val_annotations: val.json, "
                      f"num_workers: 0}}\ntrainer: {{output_dir: {tmp_path / 'out'}}}\n")
    code = load_tool("eval").main(["--config", str(config), "--checkpoint", str(checkpoint), "--no-progress"])
    assert code == 1
    err = capsys.readouterr().err
    assert "nothing to evaluate" in err and "val.json" in err and "-1.000" not in err
