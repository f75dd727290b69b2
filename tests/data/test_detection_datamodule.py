"""DetectionDataModule on a tiny synthetic set and on a COCO-layout set: mapping, datasets, batches."""

from __future__ import annotations

import pytest
import torch
from coco_test_files import solid_image, write_coco_json
from torchdata.stateful_dataloader import StatefulDataLoader

from detr_lab.config import AugmentConfig, Config, DataConfig, SyntheticConfig
from detr_lab.data.datamodule import DetectionDataModule
from detr_lab.data.errors import DatasetError
from detr_lab.data.samplers import AspectRatioBatchSampler, EpochSampler, SameSizeBatchSampler

SMALL_AUGMENT = AugmentConfig(train_scales=[64, 80], max_size=128, crop_resize_scales=[72, 88],
                              crop_min_size=48, crop_max_size=72, eval_size=80, eval_max_size=128)


def _synthetic_cfg(root) -> Config:
    cfg = Config()
    cfg.data = DataConfig(dataset="synthetic", root=str(root), batch_size=2, num_workers=0,
                          augment=SMALL_AUGMENT,
                          synthetic=SyntheticConfig(num_train=4, num_val=2, image_size=96, seed=0))
    return cfg


def test_synthetic_datamodule_end_to_end(tmp_path):
    torch.manual_seed(0)
    dm = DetectionDataModule(_synthetic_cfg(tmp_path / "shapes"))
    # The class mapping is known before any file exists (the model is built from it).
    assert dm.category_ids == [1, 2, 3, 5, 8, 13]
    assert dm.class_names == ["circle", "square", "triangle", "star", "ring", "cross"]
    assert dm.num_classes == 6
    assert not (tmp_path / "shapes").exists()

    dm.prepare_data()
    dm.setup("fit")
    assert len(dm.train_dataset) == 4 and len(dm.val_dataset) == 2
    assert dm.train_dataset.category_ids == dm.val_dataset.category_ids == dm.category_ids
    assert dm.train_dataset.skip_corrupt_images and not dm.val_dataset.skip_corrupt_images
    assert sorted(dm.val_dataset.coco.getImgIds()) == dm.val_dataset.image_ids.tolist()

    images, padding_mask, targets = next(iter(dm.train_dataloader()))
    assert images.shape[:2] == (2, 3) and images.dtype == torch.float32
    assert padding_mask.shape == (2, *images.shape[2:]) and padding_mask.dtype == torch.bool
    for i, target in enumerate(targets):
        height, width = target["size"].tolist()
        assert not padding_mask[i, :height, :width].any()
        assert padding_mask[i].sum() == padding_mask[i].numel() - height * width
        assert target["boxes"].shape[1] == 4 and ((target["boxes"] >= 0) & (target["boxes"] <= 1)).all()
        assert ((target["labels"] >= 0) & (target["labels"] < 6)).all()

    images, padding_mask, targets = next(iter(dm.val_dataloader()))
    for target in targets:
        assert min(target["size"].tolist()) == 80  # eval_size; 96-px images stay under eval_max_size
        assert max(target["orig_size"].tolist()) == 96


def test_explicit_category_ids_reorder_classes(tmp_path):
    reversed_ids = [13, 8, 5, 3, 2, 1]
    dm = DetectionDataModule(_synthetic_cfg(tmp_path / "shapes"), category_ids=reversed_ids)
    assert dm.category_ids == reversed_ids and dm.class_names[0] == "cross"
    dm.setup("validate")
    assert dm.train_dataset is None and dm.val_dataset.category_ids == reversed_ids
    ann_category = dm.val_dataset.coco.anns[min(dm.val_dataset.coco.anns)]["category_id"]
    first_image = dm.val_dataset.coco.anns[min(dm.val_dataset.coco.anns)]["image_id"]
    _, target = dm.val_dataset[dm.val_dataset.image_ids.tolist().index(first_image)]
    assert reversed_ids.index(ann_category) in target["labels"].tolist()


def test_loader_settings(tmp_path):
    cfg = _synthetic_cfg(tmp_path / "shapes")
    cfg.data.num_workers = 1
    dm = DetectionDataModule(cfg)
    with pytest.raises(RuntimeError, match="setup"):
        dm.train_dataloader()
    dm.setup("fit")
    train, val = dm.train_dataloader(), dm.val_dataloader()
    assert train.num_workers == 1 and train.persistent_workers
    assert isinstance(train, StatefulDataLoader) and callable(train.state_dict)  # resumable mid-epoch
    # the default: batches of one orientation, drawn from the (seed, epoch) order of an EpochSampler
    assert isinstance(train.batch_sampler, AspectRatioBatchSampler) and train.batch_sampler.batch_size == 2
    assert isinstance(train.batch_sampler.sampler, EpochSampler)  # keys (epoch, index)
    cfg.data.train_batching = "padded"
    mixed = DetectionDataModule(cfg)
    mixed.setup("fit")
    loader = mixed.train_dataloader()
    assert isinstance(loader.sampler, EpochSampler) and loader.batch_size == 2
    assert isinstance(val.batch_sampler, SameSizeBatchSampler)  # no padding: AP independent of batching
    assert isinstance(val.batch_sampler.sampler, torch.utils.data.SequentialSampler)
    cfg.data.eval_batching = "padded"
    padded = DetectionDataModule(cfg)
    padded.setup("validate")
    assert isinstance(padded.val_dataloader().sampler, torch.utils.data.SequentialSampler)


def _write_coco_layout(root):
    """COCO 2017 layout with categories 3 and 7 (a 'three' and a 'seven')."""
    categories = [{"id": 7, "name": "seven"}, {"id": 3, "name": "three"}]
    for split in ("train", "val"):
        folder = root / f"{split}2017"
        folder.mkdir(parents=True)
        solid_image(40, 30).save(folder / "1.jpg")
        write_coco_json(root / "annotations" / f"instances_{split}2017.json",
                        [{"id": 1, "file_name": "1.jpg", "width": 40, "height": 30}],
                        [{"id": 1, "image_id": 1, "category_id": 7, "bbox": [4, 4, 10, 10]}], categories)


def test_coco_datamodule_reads_the_default_layout(tmp_path):
    _write_coco_layout(tmp_path)
    cfg = Config()
    cfg.data = DataConfig(dataset="coco", root=str(tmp_path), num_workers=0, augment=SMALL_AUGMENT)
    dm = DetectionDataModule(cfg)
    assert dm.category_ids == [3, 7] and dm.class_names == ["three", "seven"]
    dm.setup("fit")
    _, _, targets = next(iter(dm.val_dataloader()))
    assert targets[0]["labels"].tolist() == [1]


def test_coco_datamodule_missing_annotations_named(tmp_path):
    cfg = Config()
    cfg.data = DataConfig(dataset="coco", root=str(tmp_path / "nothing"), num_workers=0)
    with pytest.raises(DatasetError, match=r"annotation file not found: .*instances_val2017\.json"):
        _ = DetectionDataModule(cfg).num_classes
