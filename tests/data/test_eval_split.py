"""The evaluated split of a DetectionDataModule: the test split of a COCO-format or YOLO set."""

import json

import pytest
from yolo_test_files import write_yolo_set

from detr_lab.config import load_config
from detr_lab.data.datamodule import DetectionDataModule
from detr_lab.data.errors import DatasetError


def test_yolo_test_split(tmp_path):
    yaml_path = write_yolo_set(tmp_path, extra_yaml="test: images/train\n")  # train images as the test split
    cfg = load_config(overrides=[f"data.root={tmp_path}", "data.format=yolo",
                                 f"data.yolo_data={yaml_path.name}"])
    datamodule = DetectionDataModule(cfg, eval_split="test")
    datamodule.setup("validate")
    names = sorted(image["file_name"] for image in datamodule.val_dataset.coco.dataset["images"])
    assert names == ["images/train/a.png", "images/train/b.png"]
    assert len(datamodule.val_dataset.coco.dataset["annotations"]) == 2


def test_coco_test_split_and_its_class_names(tmp_path):
    (tmp_path / "annotations").mkdir()
    (tmp_path / "test").mkdir()
    categories = [{"id": 4, "name": "kite"}, {"id": 2, "name": "bus"}]
    data = {"images": [], "annotations": [], "categories": categories}
    (tmp_path / "annotations" / "t.json").write_text(json.dumps(data))
    cfg = load_config(overrides=[f"data.root={tmp_path}", "data.format=coco", "data.test_images=test",
                                 "data.test_annotations=annotations/t.json"])
    datamodule = DetectionDataModule(cfg, eval_split="test")
    # read from the test file: there is no val file
    assert (datamodule.category_ids, datamodule.class_names) == ([2, 4], ["bus", "kite"])


def test_synthetic_set_has_no_test_split():
    with pytest.raises(DatasetError, match="'synthetic' has no test split"):
        DetectionDataModule(load_config(overrides=["data.dataset=synthetic"]), eval_split="test")
