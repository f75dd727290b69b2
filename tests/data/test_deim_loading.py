"""DEIM's Dense O2O (mosaic + mixup) through the real loaders: the epoch policy at batch level, the
unchanged loaders when it is off, the same batches in workers and resumed runs; and its config keys
(the official numbers, off by default, errors naming the key)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from detr_lab.config import (
    AugmentConfig,
    Config,
    ConfigError,
    DataConfig,
    MixupConfig,
    MosaicConfig,
    SyntheticConfig,
    load_config,
)
from detr_lab.data.collate import SquareMultiScaleCollate
from detr_lab.data.datamodule import DetectionDataModule
from detr_lab.data.mosaic import MosaicTransform
from detr_lab.data.transforms import StopEpochTransform

DEIM_DATA_YAML = Path(__file__).resolve().parents[2] / "configs" / "base" / "data_coco_deim.yaml"
NO_NORMALIZATION = {"mean": [0.0, 0.0, 0.0], "std": [1.0, 1.0, 1.0]}
EPOCHS = range(6)


def _cfg(root, *, dense: bool, num_workers: int = 0, mosaic_start: int = 1, mixup_start: int = 1,
         dense_stop: int | None = 3) -> Config:
    """Synthetic set, rtdetr policy stopping at epoch 4; with `dense`, mosaic and mixup (p 0.5) from
    their start epoch (default 1) to `dense_stop` (None: to the policy's stop)."""
    augment = AugmentConfig(policy="rtdetr", square_size=64, square_scales=[48, 80], stop_epoch=4,
                            **NO_NORMALIZATION)
    if dense:
        augment.mosaic = MosaicConfig(prob=0.5, start_epoch=mosaic_start, stop_epoch=dense_stop,
                                      output_size=32)
        augment.mixup = MixupConfig(prob=0.5, start_epoch=mixup_start, stop_epoch=dense_stop)
    cfg = Config()
    cfg.data = DataConfig(dataset="synthetic", root=str(root), batch_size=4, num_workers=num_workers,
                          augment=augment, synthetic=SyntheticConfig(num_train=12, num_val=2, image_size=72))
    return cfg


def _epochs(cfg: Config, epochs=EPOCHS, current_epoch: int | None = None) -> dict[int, list]:
    dm = DetectionDataModule(cfg)
    if current_epoch is not None:
        dm.trainer = SimpleNamespace(current_epoch=current_epoch)  # a run resumed at this epoch
    dm.setup("fit")
    loader = dm.train_dataloader()
    batches = {}
    for epoch in epochs:
        if current_epoch is None:
            loader.sampler.set_epoch(epoch)  # what Lightning does at each epoch start
        batches[epoch] = list(loader)
    return batches


def _same_batches(first: list, second: list) -> bool:
    if len(first) != len(second):
        return False
    for (images, _, targets), (other_images, _, other_targets) in zip(first, second, strict=True):
        if images.shape != other_images.shape or not torch.equal(images, other_images):
            return False
        for target, other in zip(targets, other_targets, strict=True):
            if target.keys() != other.keys() or not all(torch.equal(target[k], other[k]) for k in target):
                return False
    return True


def test_dense_o2o_runs_in_its_window_only_and_the_loaders_are_unchanged_outside(tmp_path):
    root = tmp_path / "shapes"
    off = _epochs(_cfg(root, dense=False))
    dense = _epochs(_cfg(root, dense=True))
    # Before the window (epoch 0) and from the mosaic / mixup stop on (3, and the final epochs 4, 5):
    # batch for batch what the loaders without Dense O2O give.
    for epoch in (0, 3, 4, 5):
        assert _same_batches(dense[epoch], off[epoch]), epoch
    for epoch in (1, 2):
        assert not _same_batches(dense[epoch], off[epoch]), epoch
        for images, mask, targets in dense[epoch]:
            assert images.shape[-1] in (48, 80) and not mask.any()
            for target in targets:
                assert ((target["boxes"] >= 0) & (target["boxes"] <= 1)).all() and "epoch" not in target
                assert len(target["boxes"]) == len(target["labels"])
    count = {epoch: sum(len(t["labels"]) for batch in dense[epoch] for t in batch[2]) for epoch in EPOCHS}
    reference = {epoch: sum(len(t["labels"]) for batch in off[epoch] for t in batch[2]) for epoch in EPOCHS}
    assert count[1] > reference[1] and count[2] > reference[2]  # denser targets in the window


def test_the_final_no_augmentation_epochs_have_neither_mosaic_nor_mixup(tmp_path):
    """Windows without an end of their own stop at the policy's stop_epoch (4)."""
    root = tmp_path / "shapes"
    off = _epochs(_cfg(root, dense=False), epochs=(3, 4, 5))
    dense = _epochs(_cfg(root, dense=True, dense_stop=None), epochs=(3, 4, 5))
    assert not _same_batches(dense[3], off[3])
    assert _same_batches(dense[4], off[4]) and _same_batches(dense[5], off[5])


def test_defaults_build_the_previous_loader_objects(tmp_path):
    dm = DetectionDataModule(_cfg(tmp_path / "shapes", dense=False))
    dm.setup("fit")
    assert isinstance(dm.train_dataset.transforms, StopEpochTransform)
    collate = dm.train_dataloader().collate_fn
    assert isinstance(collate, SquareMultiScaleCollate) and collate.mixup is None
    dense = DetectionDataModule(_cfg(tmp_path / "shapes", dense=True))
    dense.setup("fit")
    assert isinstance(dense.train_dataset.transforms, MosaicTransform)
    # mixup's window is clipped by stop_epoch; the transform reads other images of the training set
    assert dense.train_dataloader().collate_fn.mixup.stop_epoch == 3
    assert dense.train_dataset.transforms._num_samples == len(dense.train_dataset)


def test_mosaic_alone_and_mixup_alone_each_change_only_their_own_part(tmp_path):
    root = tmp_path / "shapes"
    off = _epochs(_cfg(root, dense=False), epochs=(1, 2))
    only_mixup = _epochs(_cfg(root, dense=True, mosaic_start=3 - 1, mixup_start=1), epochs=(1,))
    only_mosaic = _epochs(_cfg(root, dense=True, mosaic_start=1, mixup_start=2), epochs=(1,))
    for batches in (only_mixup[1], only_mosaic[1]):
        assert not _same_batches(batches, off[1])
    # mixup never changes the number of images or their sides; it appends the previous image's boxes
    for (images, _, targets), (ref_images, _, ref_targets) in zip(only_mixup[1], off[1], strict=True):
        assert images.shape == ref_images.shape
        mixed = not torch.equal(images, ref_images)
        counts, ref_counts = [len(t["labels"]) for t in targets], [len(t["labels"]) for t in ref_targets]
        assert counts == ([own + prev for own, prev in zip(ref_counts, ref_counts[-1:] + ref_counts[:-1],
                                                           strict=True)] if mixed else ref_counts)


def test_workers_and_resumed_runs_draw_the_same_dense_batches(tmp_path):
    root = tmp_path / "shapes"
    expected = _epochs(_cfg(root, dense=True))
    workers = _epochs(_cfg(root, dense=True, num_workers=2))
    for epoch in EPOCHS:
        assert _same_batches(workers[epoch], expected[epoch]), epoch
    for epoch in (1, 2, 4):
        resumed = _epochs(_cfg(root, dense=True), epochs=(epoch,), current_epoch=epoch)
        assert _same_batches(resumed[epoch], expected[epoch]), epoch


# ------------------------------------------------------------------------------------------- config
def test_deim_config_holds_the_official_numbers(tmp_path):
    path = tmp_path / "deim.yaml"
    path.write_text(f"_base_: {DEIM_DATA_YAML}\n")
    aug = load_config(path).data.augment
    assert (aug.policy, aug.square_size, aug.start_epoch, aug.stop_epoch) == ("rtdetr", 640, 4, 50)
    assert aug.square_scales == [480, 512, 544, 576, 608, 640, 640, 640, 640, 672, 704, 736, 768, 800]
    mosaic, mixup = aug.mosaic, aug.mixup
    assert (mosaic.prob, mosaic.start_epoch, mosaic.stop_epoch, mosaic.output_size) == (0.5, 4, 29, 320)
    assert (mosaic.degrees, mosaic.translate, mosaic.scale, mosaic.fill) == (10.0, [0.1, 0.1], [0.5, 1.5], 0)
    assert (mixup.prob, mixup.start_epoch, mixup.stop_epoch) == (0.5, 4, 29)
    probabilities = (aug.photometric_prob, aug.zoom_out_prob, aug.iou_crop_prob, aug.hflip_prob)
    assert probabilities == (0.5, 0.5, 0.8, 0.5)
    defaults = load_config().data.augment
    assert defaults.mosaic.prob == 0.0 and defaults.mixup.prob == 0.0 and defaults.start_epoch is None


KEY = r"'data\.augment\."  # the start of every key named below


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["data.augment.mosaic.prob=1.5"], KEY + r"mosaic\.prob' is 1\.5; it must be <= 1"),
        (["data.augment.mixup.prob=-0.5"], KEY + r"mixup\.prob' is -0\.5; it must be >= 0"),
        (["data.augment.mosaic.start_epoch=-1"], KEY + r"mosaic\.start_epoch' is -1; it must be >= 0"),
        (["data.augment.mosaic.start_epoch=4", "data.augment.mosaic.stop_epoch=4"],
         KEY + r"mosaic\.stop_epoch' \(4\) must be above " + KEY + r"mosaic\.start_epoch' \(4\)"),
        (["data.augment.policy=rtdetr", "data.augment.mixup.start_epoch=5",
          "data.augment.mixup.stop_epoch=2"],
         KEY + r"mixup\.stop_epoch' \(2\) must be above " + KEY + r"mixup\.start_epoch' \(5\)"),
        (["data.augment.mosaic.output_size=0"], KEY + r"mosaic\.output_size' is 0; it must be > 0"),
        (["data.augment.mosaic.degrees=200"], KEY + r"mosaic\.degrees' is 200\.0; it must be <= 180"),
        (["data.augment.mosaic.translate=[0.1]"], KEY + r"mosaic\.translate' is \[0\.1\]; expected"),
        (["data.augment.mosaic.translate=[0.1,1.5]"], KEY + r"mosaic\.translate' is \[0\.1, 1\.5\]"),
        (["data.augment.mosaic.scale=[1.5,0.5]"], KEY + r"mosaic\.scale' is \[1\.5, 0\.5\]; expected"),
        (["data.augment.mosaic.scale=[0,1]"], KEY + r"mosaic\.scale' is \[0\.0, 1\.0\]"),
        (["data.augment.mosaic.fill=300"], KEY + r"mosaic\.fill' is 300; it must be <= 255"),
        (["data.augment.mixup.prob=0.5"],
         KEY + r"mixup\.prob' is 0\.5; mixup needs " + KEY + "policy: rtdetr'"),
        (["data.augment.start_epoch=4"], KEY + r"start_epoch' applies to " + KEY + "policy: rtdetr' only"),
        (["data.augment.policy=rtdetr", "data.augment.start_epoch=5", "data.augment.stop_epoch=5"],
         KEY + r"start_epoch' \(5\) must be below " + KEY + r"stop_epoch' \(5\)"),
        (["data.augment.mosaic.probability=0.5"], r"unknown key " + KEY + r"mosaic\.probability'.*'prob'"),
        (["data.augment.mixup.prob=high"], r"invalid value for " + KEY + r"mixup\.prob'"),
    ],
)
def test_bad_dense_o2o_values_name_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(overrides=overrides)
