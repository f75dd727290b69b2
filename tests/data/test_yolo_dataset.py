"""YOLO-format datasets: data.yaml parsing, label conversion to COCO boxes, errors, datamodule, converter."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from yolo_test_files import write_yolo_set

from detr_lab.config import AugmentConfig, Config, DataConfig
from detr_lab.data.datamodule import DetectionDataModule, resolve_format
from detr_lab.data.errors import DatasetError
from detr_lab.data.yolo import (
    YoloDetectionDataset,
    label_path,
    read_data_yaml,
    upright_size,
    yolo_split_to_coco,
)
from detr_lab.engine.evaluator import CocoEvaluator

from factories import load_tool, tiny_overrides


def test_label_path_replaces_the_last_images_folder():
    assert label_path(Path("/d/images/x/images/train/a.jpg")) == Path("/d/images/x/labels/train/a.txt")


def test_names_as_list_or_dict_and_nc_check(tmp_path):
    yaml_path = write_yolo_set(tmp_path / "a", names="{0: cat, 1: dog}")
    assert read_data_yaml(yaml_path).names == ["cat", "dog"]
    bad = write_yolo_set(tmp_path / "b", names="{0: cat, 2: dog}")
    with pytest.raises(DatasetError, match=r"data.yaml: 'names' keys must be the class indices 0..1"):
        read_data_yaml(bad)
    mismatch = write_yolo_set(tmp_path / "c", extra_yaml="nc: 3\n")
    with pytest.raises(DatasetError, match="'nc' is 3 but 'names' has 2 entries"):
        read_data_yaml(mismatch)


def test_split_from_a_txt_list_of_images(tmp_path):
    yaml_path = write_yolo_set(tmp_path)
    (tmp_path / "val.txt").write_text("./images/val/d.png\n\nimages/val/c.png\n")
    yaml_path.write_text("train: images/train\nval: val.txt\nnames: [cat, dog]\n")
    coco = yolo_split_to_coco(yaml_path, "val").coco
    assert [i["file_name"] for i in coco["images"]] == ["images/val/c.png", "images/val/d.png"]
    assert [a["image_id"] for a in coco["annotations"]] == [1]
    (tmp_path / "val.txt").write_text("images/val/nope.png\n")
    with pytest.raises(DatasetError, match=r"val.txt, line 1: image file not found: .*nope.png"):
        yolo_split_to_coco(yaml_path, "val")


def test_split_converted_to_coco_pixel_boxes(tmp_path):
    converted = yolo_split_to_coco(write_yolo_set(tmp_path), "train")
    coco = converted.coco
    assert [(i["id"], i["file_name"], i["width"], i["height"]) for i in coco["images"]] == [
        (1, "images/train/a.png", 64, 32), (2, "images/train/b.png", 40, 40)]
    # a.png 64x32: "0 0.5 0.5 0.5 0.5" -> x = (0.5 - 0.25) * 64 = 16, y = 8, w = 32, h = 16
    #              "1 0.25 0.25 0.25 0.5" -> x = (0.25 - 0.125) * 64 = 8, y = 0, w = 16, h = 16
    boxes = [(a["image_id"], a["category_id"], a["bbox"]) for a in coco["annotations"]]
    assert boxes == [(1, 0, [16.0, 8.0, 32.0, 16.0]), (1, 1, [8.0, 0.0, 16.0, 16.0])]
    assert coco["categories"] == [{"id": 0, "name": "cat"}, {"id": 1, "name": "dog"}]


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("0 0.5 0.5 0.5", "line 2: expected 5 values 'class cx cy w h' or a segment .*, got 4"),
        ("0 0.1 0.1 0.2 0.2 0.3", "line 2: expected 5 values .* got 6: '0 0.1 0.1 0.2 0.2 0.3'"),
        ("0 0.1 0.1 0.2 y 0.3 0.3", "line 2: y2 'y' is not a finite number"),
        ("cat 0.5 0.5 0.5 0.5", "line 2: class 'cat' is not an integer"),
        ("2 0.5 0.5 0.5 0.5", r"line 2: class 2 is outside \[0, 2\)"),
        ("0 0.5 nan 0.5 0.5", "line 2: cy 'nan' is not a finite number"),
        ("0 0.5 0.5 x 0.5", "line 2: w 'x' is not a finite number"),
    ],
)
def test_invalid_label_lines_name_file_line_and_value(tmp_path, line, message):
    yaml_path = write_yolo_set(tmp_path)
    (tmp_path / "labels" / "train" / "a.txt").write_text(f"0 0.5 0.5 0.5 0.5\n{line}\n")
    with pytest.raises(DatasetError, match=rf"labels/train/a.txt, {message}"):
        yolo_split_to_coco(yaml_path, "train")


def test_segment_line_gives_its_enclosing_box(tmp_path):
    yaml_path = write_yolo_set(tmp_path)
    # a.png 64x32: triangle (0.25, 0.5), (0.75, 0.25), (0.5, 1.0) -> x 16..48, y 8..32
    (tmp_path / "labels" / "train" / "a.txt").write_text("1 0.25 0.5 0.75 0.25 0.5 1.0\n")
    coco = yolo_split_to_coco(yaml_path, "train").coco
    assert [(a["category_id"], a["bbox"]) for a in coco["annotations"]] == [(1, [16.0, 8.0, 32.0, 24.0])]


def test_exif_rotated_image_size_is_upright(tmp_path):
    image = Image.new("RGB", (40, 20))
    exif = image.getexif()
    exif[0x0112] = 6  # rotate 90 degrees when displayed
    image.save(tmp_path / "r.jpg", exif=exif)
    assert upright_size(tmp_path / "r.jpg") == (20, 40)


def _cfg(root: Path, fmt: str = "auto") -> Config:
    cfg = Config()
    cfg.data = DataConfig(root=str(root), format=fmt, batch_size=2, num_workers=0,
                          augment=AugmentConfig(train_scales=[64], max_size=96, crop_prob=0.0, eval_size=64,
                                                eval_max_size=96))
    return cfg


def test_datamodule_detects_yolo_and_evaluates_ground_truth_at_ap_one(tmp_path):
    write_yolo_set(tmp_path)
    assert resolve_format(_cfg(tmp_path).data) == "yolo"
    assert resolve_format(_cfg(tmp_path, "coco").data) == "coco"
    assert resolve_format(_cfg(tmp_path / "elsewhere").data) == "coco"
    dm = DetectionDataModule(_cfg(tmp_path))
    assert dm.category_ids == [0, 1] and dm.class_names == ["cat", "dog"]
    dm.setup("fit")
    assert isinstance(dm.train_dataset, YoloDetectionDataset)
    assert len(dm.train_dataset) == 2 and len(dm.val_dataset) == 2
    images, padding_mask, targets = next(iter(dm.val_dataloader()))
    assert images.shape[0] == 2 and padding_mask.dtype == torch.bool
    # c.png 50x100: "1 0.2 0.3 0.2 0.1" -> normalized cxcywh unchanged by resizing
    torch.testing.assert_close(targets[0]["boxes"], torch.tensor([[0.2, 0.3, 0.2, 0.1]]))
    assert targets[0]["labels"].tolist() == [1] and targets[1]["labels"].numel() == 0

    # The in-memory ground truth, fed back as predictions, scores AP 1 with pycocotools.
    coco = dm.val_dataset.coco
    evaluator = CocoEvaluator(coco, dm.category_ids)
    for image_id in coco.getImgIds():
        anns = coco.imgToAnns[image_id]
        xywh = [a["bbox"] for a in anns]
        boxes = torch.tensor([[x, y, x + w, y + h] for x, y, w, h in xywh]).reshape(-1, 4)
        labels = torch.tensor([dm.category_ids.index(a["category_id"]) for a in anns], dtype=torch.int64)
        evaluator.update({image_id: {"boxes": boxes, "labels": labels, "scores": torch.ones(len(anns))}})
    assert evaluator.compute()["AP"] == pytest.approx(1.0)

    # A COCO annotation file beside a data.yaml: "auto" keeps COCO.
    (tmp_path / "annotations").mkdir()
    (tmp_path / "annotations" / "instances_val2017.json").write_text("{}")
    assert resolve_format(_cfg(tmp_path).data) == "coco"


def test_convert_dataset_tool_writes_coco_json_and_reports_bad_lines(tmp_path, capsys):
    tool = load_tool("convert_dataset")
    yaml_path = write_yolo_set(tmp_path / "set")
    out = tmp_path / "out"
    assert tool.main([str(yaml_path), "--output-dir", str(out)]) == 0, capsys.readouterr().err
    val = json.loads((out / "instances_val.json").read_text())
    assert [a["bbox"] for a in val["annotations"]] == [[5.0, 25.0, 10.0, 10.0]]  # 50x100 image
    assert np.isclose(val["annotations"][0]["area"], 100.0)
    assert sorted(p.name for p in out.iterdir()) == ["instances_train.json", "instances_val.json"]

    (tmp_path / "set" / "labels" / "val" / "c.txt").write_text("1 0.2 0.3 0.2\n")
    assert tool.main([str(yaml_path), "--output-dir", str(out), "--split", "val"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("convert_dataset.py: error: ")
    expected = "labels/val/c.txt, line 1: expected 5 values 'class cx cy w h' or a segment"
    assert expected in err


@pytest.mark.slow  # Lightning end to end (train, validate, eval tool)
def test_training_on_a_yolo_set_logs_ap_and_curves(tmp_path):
    """One step and one validation on a YOLO set, the doctor on; the real CSV log draws as curves."""
    from detr_lab.config import load_config
    from detr_lab.engine.trainer import train
    from detr_lab.visualize.curves import plot_run_curves, read_metrics

    write_yolo_set(tmp_path / "set")
    cfg = load_config(overrides=tiny_overrides(
        f"data.root={tmp_path / 'set'}",
        "data.batch_size=2", "data.num_workers=0", "data.augment.train_scales=[64]",
        "data.augment.max_size=96", "data.augment.crop_prob=0", "data.augment.eval_size=64",
        "data.augment.eval_max_size=96",
        f"trainer.output_dir={tmp_path / 'run'}", "trainer.accelerator=cpu", "trainer.devices=1",
        "trainer.max_epochs=1", "trainer.log_every_n_steps=1",
        num_classes=2, num_heads=2, num_queries=4, backbone__frozen_stages=0, decoder__num_layers=1,
    ))
    trainer = train(cfg, progress_bar=False)
    assert trainer.global_step == 1 and "val/AP" in trainer.logged_metrics
    csv_path = next((tmp_path / "run" / "csv").glob("version_*/metrics.csv"))
    series = read_metrics(csv_path)
    assert [epoch for epoch, _, _ in series["val/AP"]] == [0] and "train/loss_step" in series
    assert plot_run_curves(tmp_path / "run", tmp_path / "curves.png").stat().st_size > 10_000

    # tools/eval.py's path: the checkpoint against the YOLO val split, results with YOLO class ids.
    from detr_lab.engine.evaluate import evaluate_checkpoint

    run = tmp_path / "run"
    result = evaluate_checkpoint(run / "config.yaml", run / "checkpoints" / "last.ckpt", device="cpu",
                                 progress=False)
    assert result.num_images == 2 and 0.0 <= result.stats["AP"] <= 1.0
    detections = json.loads(result.results_path.read_text())
    assert detections and {d["category_id"] for d in detections} <= {0, 1}
