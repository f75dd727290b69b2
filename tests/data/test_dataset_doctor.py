"""The dataset doctor: each check on a tiny generated set, the tool's exit codes, the training-start hook."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from coco_test_files import solid_image, write_coco_json
from PIL import Image
from yolo_test_files import write_yolo_set

from detr_lab.config import Config, DataConfig, load_config
from detr_lab.data.doctor import DoctorReport, diagnose, padding_waste
from detr_lab.data.errors import DatasetError

from factories import load_tool

CATEGORIES = [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}, {"id": 7, "name": "owl"}]


def _box(ann_id: int, image_id: int, category: int, bbox: list[float]) -> dict:
    return {"id": ann_id, "image_id": image_id, "category_id": category, "bbox": bbox}


def _problem_set(root: Path) -> None:
    """train: 4 images with problems; val: one clean image.

    train image 1 a.png 40x30: 3 objects (cat, cat, dog), one clipped (x 30..50 > 40)
          image 2 b.png 20x20: no objects; a zero-width box (ann 4) and one fully outside (ann 5)
          image 3 r.jpg stored 40x20 with EXIF orientation 6 (upright 20x40), json says 40x20
          image 4 gone.png: no file
    """
    images_dir = root / "train"
    images_dir.mkdir(parents=True)
    solid_image(40, 30).save(images_dir / "a.png")
    solid_image(20, 20).save(images_dir / "b.png")
    rotated = Image.new("RGB", (40, 20))
    exif = rotated.getexif()
    exif[0x0112] = 6
    rotated.save(images_dir / "r.jpg", exif=exif)
    images = [{"id": 1, "file_name": "a.png", "width": 40, "height": 30},
              {"id": 2, "file_name": "b.png", "width": 20, "height": 20},
              {"id": 3, "file_name": "r.jpg", "width": 40, "height": 20},
              {"id": 4, "file_name": "gone.png", "width": 10, "height": 10}]
    annotations = [_box(1, 1, 1, [2, 2, 10, 10]), _box(2, 1, 1, [5, 5, 10, 10]),
                   _box(3, 1, 2, [30, 0, 20, 10]), _box(4, 2, 1, [3, 3, 0, 5]), _box(5, 2, 2, [25, 25, 5, 5])]
    write_coco_json(root / "train.json", images, annotations, CATEGORIES)
    (root / "val").mkdir()
    solid_image(30, 30).save(root / "val" / "v.png")
    write_coco_json(root / "val.json", [{"id": 1, "file_name": "v.png", "width": 30, "height": 30}],
                    [_box(1, 1, 7, [1, 1, 5, 5])], CATEGORIES)


def _cfg(root: Path, *, num_classes: int = 3, num_queries: int = 10, batch_size: int = 2) -> Config:
    cfg = load_config(overrides=[f"model.num_classes={num_classes}", f"model.num_queries={num_queries}"])
    cfg.data = DataConfig(root=str(root), train_images="train", train_annotations="train.json",
                          val_images="val", val_annotations="val.json", batch_size=batch_size, num_workers=0)
    return cfg


def _messages(report: DoctorReport, severity: str, split: str | None = "train") -> list[str]:
    return [f.message for f in report.of(severity) if f.split == split]


def _one(messages: list[str], fragment: str) -> str:
    found = [m for m in messages if fragment in m]
    assert len(found) == 1, (fragment, messages)
    return found[0]


def test_every_problem_of_a_coco_set_is_reported(tmp_path):
    _problem_set(tmp_path)
    report = diagnose(_cfg(tmp_path, num_classes=2, num_queries=2))
    errors, warnings, infos = (_messages(report, s) for s in ("error", "warning", "info"))
    # num_classes below the number of categories, for the whole dataset
    assert _one(_messages(report, "error", None), "'model.num_classes' is 2 but the data has 3 categories")
    assert _one(_messages(report, "info", None), "3 categories").endswith("1:cat, 2:dog, 7:owl")
    # 3 objects in image 1 for 2 queries
    assert "image ids 1)" in _one(errors, "1 images have more objects than 'model.num_queries' (2; max 3")
    # file checks: the EXIF-rotated image and the missing one
    mismatch = _one(errors, "upright size differs")
    assert "r.jpg (image id 3): file 20x40, annotations 40x20 (EXIF orientation" in mismatch
    assert "gone.png (image id 4)" in _one(errors, "image files missing")
    # repaired boxes, with their annotation ids
    assert _one(warnings, "zero or negative width").endswith("(annotation ids 4)")
    assert _one(warnings, "outside their image and are dropped").endswith("(annotation ids 5)")
    assert _one(warnings, "clipped").endswith("(annotation ids 3)")
    assert _one(warnings, "no training objects").endswith("(ids 7): the model cannot learn them")
    # empty images: b.png (both its boxes dropped), r.jpg and gone.png
    assert _one(infos, "4 images, 3 objects; 3 images (75.0%) have no objects")
    assert _one(infos, "objects per image: mean 0.8").endswith("max 3 (model.num_queries 2)")
    assert _one(infos, "class counts").startswith("class counts: most cat (2), least dog (1)")
    assert _one(infos, "image widths 10..40 (median 30), heights 10..30 (median 20); aspect w/h 1.00..2.00")
    assert not _messages(report, "error", "val")
    assert report.text().endswith("4 error(s), 4 warning(s): training would fail or be silently wrong")
    short = report.text(lowest="warning").splitlines()
    assert len(short) == 1 + 4 + 4 + 1 and short[1].startswith("ERROR") and short[-2].startswith("WARNING")

    # The same data with enough classes and queries and without the file problems: no error left.
    (tmp_path / "train" / "r.jpg").unlink()
    solid_image(40, 20).save(tmp_path / "train" / "r.jpg")
    solid_image(10, 10).save(tmp_path / "train" / "gone.png")
    assert diagnose(_cfg(tmp_path, num_classes=3, num_queries=3)).errors == []
    more = diagnose(_cfg(tmp_path, num_classes=5))  # the training module needs exactly one per category
    assert _one(_messages(more, "error", None), "'model.num_classes' is 5 but the data has 3 categories")


def test_duplicate_ids_and_unknown_categories_are_errors(tmp_path):
    _problem_set(tmp_path)
    data = json.loads((tmp_path / "train.json").read_text())
    data["annotations"][1]["id"] = 1
    data["images"].append(dict(data["images"][0]))
    (tmp_path / "train.json").write_text(json.dumps(data))
    report = diagnose(_cfg(tmp_path))
    errors = _messages(report, "error")
    assert _one(errors, "1 image id(s) appear more than once in 'images': 1")
    assert _one(errors, "1 annotation id(s) appear more than once in 'annotations': 1")
    # the other checks still run, on the first entry of each id: 4 images, annotation 2 left out
    assert _one(_messages(report, "info"), "4 images, 2 objects")

    _problem_set(tmp_path / "b")
    val = json.loads((tmp_path / "b" / "val.json").read_text())
    val["categories"] = CATEGORIES[1:]
    val["annotations"] = []
    (tmp_path / "b" / "val.json").write_text(json.dumps(val))
    errors = _messages(diagnose(_cfg(tmp_path / "b")), "error")
    assert _one(errors, "category ids [1] are used in").endswith("val.json (the class mapping)")


def test_padding_waste_by_hand():
    sizes = np.array([[10, 10], [10, 20], [20, 10], [20, 20]])
    # batches (0, 1): 2 * 10 * 20 = 400 px, 300 real; (2, 3): 2 * 20 * 20 = 800, 600 real
    assert padding_waste(sizes, 2, np.arange(4)) == pytest.approx(1 - 900 / 1200)
    # (0, 3): 800 px, 500 real; (1, 2): 800 px, 400 real
    assert padding_waste(sizes, 2, np.array([0, 3, 1, 2])) == pytest.approx(1 - 900 / 1600)
    assert padding_waste(sizes, 1, np.arange(4)) == 0.0
    # a last, smaller batch: (4,) alone, 25 px, no padding
    with_rest = np.concatenate([sizes, [[5, 5]]])
    assert padding_waste(with_rest, 2, np.arange(5)) == pytest.approx(1 - 925 / 1225)


def test_imbalance_and_small_data_suggestions(tmp_path):
    (tmp_path / "train").mkdir()
    solid_image(64, 64).save(tmp_path / "train" / "a.png")
    annotations = [_box(i, 1, 1, [i, i, 4, 4]) for i in range(1, 12)] + [_box(12, 1, 2, [1, 40, 9, 9])]
    images = [{"id": 1, "file_name": "a.png", "width": 64, "height": 64}]
    write_coco_json(tmp_path / "train.json", images, annotations, CATEGORIES[:2])
    (tmp_path / "val").mkdir()
    solid_image(64, 64).save(tmp_path / "val" / "a.png")
    write_coco_json(tmp_path / "val.json", images, annotations[:1], CATEGORIES[:2])
    report = diagnose(_cfg(tmp_path, num_classes=2, num_queries=100))
    assert report.errors == []
    assert "ratio 11.0: strongly imbalanced" in _one(_messages(report, "warning"), "class counts")
    small = _one(_messages(report, "info", None), "small dataset (1 training images)")
    assert "model.num_queries=24; at most 12 objects" in small
    assert "model.backbone.frozen_stages=4" in small and "denoising" in small


def test_yolo_set_report_and_bad_label_line(tmp_path):
    yaml_path = write_yolo_set(tmp_path)
    (tmp_path / "labels" / "train" / "stray.txt").write_text("0 0.5 0.5 0.1 0.1\n")
    cfg = _cfg(tmp_path, num_classes=2)
    cfg.data.format = "auto"
    report = diagnose(cfg)
    assert report.source == f"yolo dataset at {yaml_path}"
    assert report.errors == []
    assert _one(_messages(report, "warning"), "1 label file(s) without an image").endswith("stray.txt")
    assert _one(_messages(report, "info", "val"), "2 images, 1 objects; 1 images (50.0%) have no objects")
    (tmp_path / "labels" / "val" / "c.txt").write_text("5 0.5 0.5 0.1 0.1\n")
    errors = _messages(diagnose(cfg), "error", "val")
    assert _one(errors, "c.txt, line 1: class 5 is outside [0, 2)")


def _write_config(tmp_path: Path, root: Path, extra: str = "") -> Path:
    path = tmp_path / "cfg.yaml"
    path.write_text(f"model: {{num_classes: 3, num_queries: 10}}\ndata: {{root: {root}, train_images: train, "
                    f"train_annotations: train.json, val_images: val, val_annotations: val.json{extra}}}\n")
    return path




def test_doctor_tool_exit_codes(tmp_path, capsys):
    _problem_set(tmp_path / "set")
    config = _write_config(tmp_path, tmp_path / "set")
    main = load_tool("doctor").main
    assert main(["--config", str(config), "--json", str(tmp_path / "out" / "doctor.json")]) == 1
    assert "ERROR   [train] 1 of 4 checked: image files missing" in capsys.readouterr().out
    written = json.loads((tmp_path / "out" / "doctor.json").read_text())
    assert written["errors"] == 2 and written["warnings"] == 4
    missing = [f for f in written["findings"] if "image files missing" in f["message"]]
    assert [(f["severity"], f["split"]) for f in missing] == [("error", "train")]
    clean_train = ["--set", "data.train_annotations=val.json", "--set", "data.train_images=val"]
    assert main(["--config", str(config), *clean_train]) == 0
    assert capsys.readouterr().out.rstrip().endswith("0 error(s), 1 warning(s): no blocking problem")
    assert main(["--config", str(config), "--set", "data.fromat=yolo"]) == 2
    assert "did you mean 'format'" in capsys.readouterr().err


def test_training_stops_before_fitting_on_a_blocking_problem(tmp_path, monkeypatch):
    from detr_lab.engine import trainer

    _problem_set(tmp_path)
    cfg = _cfg(tmp_path)
    cfg.trainer.output_dir = str(tmp_path / "run")

    def never(*args, **kwargs):
        raise AssertionError("the datamodule must not be built")

    monkeypatch.setattr(trainer, "DetectionDataModule", never)
    with pytest.raises(DatasetError, match=r"dataset doctor: 2 problem\(s\) .* first: \[train\]"):
        trainer.train(cfg)
    cfg.data.doctor = False
    with pytest.raises(AssertionError, match="must not be built"):
        trainer.train(cfg)
    # Warnings only: logged, and training goes on (to the datamodule, stubbed here).
    cfg = _cfg(tmp_path, num_queries=3)
    cfg.trainer.output_dir = str(tmp_path / "run")
    cfg.data.train_annotations, cfg.data.train_images = "val.json", "val"
    cfg.data.augment.train_scales = [400]
    cfg.data.batch_size = 1  # one image per batch: no padding; the empty categories 1, 2: warnings
    with pytest.raises(AssertionError, match="must not be built"):
        trainer.train(cfg)


# The ConvNeXt-T recipe at test size on a small generated set read as a COCO dataset (so the doctor runs),
# with a pretrained backbone from a local file: no download.
WIDTHS = {"dims": [8, 16, 32, 64], "depths": [1, 1, 1, 1]}


def _convnext_run(tmp_path: Path) -> Config:
    import timm
    import torch

    from detr_lab.data.synthetic import SYNTHETIC_CATEGORY_IDS, generate_synthetic_dataset

    root = generate_synthetic_dataset(tmp_path / "data", num_train=2, num_val=2, image_size=64)
    torch.manual_seed(0)
    weights = tmp_path / "convnext_tiny.pth"
    torch.save(timm.create_model("convnext_tiny", **WIDTHS).state_dict(), weights)
    widths = [f"model.backbone.timm_kwargs.{key}={value}".replace(" ", "") for key, value in WIDTHS.items()]
    return load_config("configs/deformable_convnext_t.yaml", [
        *widths, "model.backbone.pretrained=false", f"model.backbone.weights_path={weights}",
        "model.hidden_dim=32", "model.num_heads=2", "model.ffn_dim=64", "model.encoder.num_layers=1",
        "model.decoder.num_layers=1", "model.num_queries=10",
        f"model.num_classes={len(SYNTHETIC_CATEGORY_IDS)}",
        f"data.root={root}", "data.batch_size=2", "data.num_workers=0", "data.augment.train_scales=[64]",
        "data.augment.max_size=80", "data.augment.crop_prob=0.0", "trainer.max_steps=1",
        "trainer.max_epochs=1", "trainer.check_val_every_n_epoch=2", "trainer.accelerator=cpu",
        "trainer.devices=1", f"trainer.output_dir={tmp_path / 'run'}",
    ])  # fmt: skip


@pytest.mark.slow  # Lightning: one training step
def test_pretrained_timm_backbone_on_a_small_set_trains(tmp_path):
    from detr_lab.engine.trainer import train

    cfg = _convnext_run(tmp_path)
    assert cfg.model.backbone.frozen_stages is None and cfg.model.backbone.dilation is None
    assert cfg.model.backbone.norm is None and cfg.model.neck.type == "projection"
    small = _one(_messages(diagnose(cfg), "info", None), "small dataset (2 training images)")
    assert "freezing the pretrained backbone (optim.lr_backbone=0)" in small and "frozen_stages" not in small
    assert train(cfg, progress_bar=False).global_step == 1  # the doctor ran at the start (dataset: coco)


VIT = ["model.backbone.type=vit", "model.backbone.name=vit_tiny_patch16_224"]
CONVNEXT = ["model.backbone.type=timm", "model.backbone.name=convnext_tiny"]


@pytest.mark.parametrize(
    ("backbone", "expected"),
    [
        ([*VIT], "optim.lr_backbone=0)"),
        ([*CONVNEXT, "model.backbone.frozen_stages=null", "model.backbone.dilation=null",
          "model.backbone.norm=null"], "optim.lr_backbone=0)"),
        (["model.backbone.frozen_stages=null", "model.backbone.norm=null"], "frozen_stages=4"),
        (["model.backbone.frozen_stages=4", "model.backbone.weights_path=r18.pth"], None),
        (["model.backbone.frozen_stages=null", "model.backbone.weights_path=r18.pth"], "frozen_stages=4"),
        ([*VIT, "model.backbone.pretrained=true", "optim.lr_backbone=0"], None),
    ],
)  # fmt: skip
def test_small_data_backbone_hint_for_each_backbone_type(tmp_path, backbone, expected):
    _problem_set(tmp_path)
    cfg = _cfg(tmp_path)
    options = load_config(overrides=backbone)
    cfg.model.backbone, cfg.optim = options.model.backbone, options.optim
    small = _one(_messages(diagnose(cfg), "info", None), "small dataset")
    if expected is None:
        assert "backbone" not in small, small
    else:
        assert expected in small, small
