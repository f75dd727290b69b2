"""RT-DETR's batch multi-scale collate and stop epoch through the real loaders (workers, resume), and
the validation of the `data.augment` keys of the rtdetr policy."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import Callback

from detr_lab.config import AugmentConfig, Config, ConfigError, DataConfig, SyntheticConfig, load_config
from detr_lab.data.collate import SquareMultiScaleCollate, collate_detection
from detr_lab.data.datamodule import DetectionDataModule
from detr_lab.data.doctor import diagnose

from factories import tiny_overrides

NO_NORMALIZATION = {"mean": [0.0, 0.0, 0.0], "std": [1.0, 1.0, 1.0]}
RTDETR_DATA_YAML = Path(__file__).resolve().parents[2] / "configs" / "base" / "data_coco_rtdetr.yaml"


def _sample(size: int, image_id: int, epoch: int | None = None, seed: int = 0):
    image = torch.from_numpy(np.random.default_rng(seed).random((3, size, size), dtype=np.float32))
    target = {"boxes": torch.tensor([[0.5, 0.4, 0.2, 0.3]]), "labels": torch.tensor([1]),
              "image_id": torch.tensor(image_id), "orig_size": torch.tensor([48, 64]),
              "size": torch.tensor([size, size])}
    if epoch is not None:
        target["epoch"] = torch.tensor(epoch)
    return image, target


# ------------------------------------------------------------------------------------------- collate
def test_collate_resizes_the_batch_by_nearest_neighbour_and_keeps_the_boxes():
    collate = SquareMultiScaleCollate([32, 128], stop_epoch=3, seed=0)
    for epoch in range(3):
        batch = [_sample(64, i, epoch=epoch, seed=i) for i in (1, 2)]
        images, padding_mask, targets = collate(batch)
        size = images.shape[-1]
        assert images.shape == (2, 3, size, size) and size in (32, 128)
        assert padding_mask.shape == (2, size, size) and not padding_mask.any()
        # torch's default "nearest": output pixel i reads input pixel floor(i * 64 / size)
        rows = (np.arange(size) * 64) // size
        for (image, _), resized in zip(batch, images, strict=True):
            torch.testing.assert_close(resized, image[:, rows][:, :, rows], rtol=0, atol=0)
        for target in targets:
            assert "epoch" not in target and target["size"].tolist() == [size, size]
            assert torch.equal(target["boxes"], torch.tensor([[0.5, 0.4, 0.2, 0.3]]))  # normalized: unchanged
    for epoch in (3, 4, 10):  # from stop_epoch on, the batch keeps the transform's size
        images, padding_mask, targets = collate([_sample(64, i, epoch=epoch, seed=i) for i in (1, 2)])
        assert images.shape == (2, 3, 64, 64) and "epoch" not in targets[0]
        assert targets[0]["size"].tolist() == [64, 64]


def test_collate_draws_sizes_from_the_scales_reproducibly():
    collate = SquareMultiScaleCollate([480, 640, 640, 640, 800], stop_epoch=None, seed=7)
    draws = [collate.size_for(epoch, [i, i + 1]) for epoch in range(20) for i in range(50)]
    assert set(draws) == {480, 640, 800}
    assert 0.5 < draws.count(640) / len(draws) < 0.7  # 640 three times out of five
    assert draws == [collate.size_for(epoch, [i, i + 1]) for epoch in range(20) for i in range(50)]
    assert SquareMultiScaleCollate([480, 800], seed=8).size_for(0, [1]) in (480, 800)
    assert SquareMultiScaleCollate([], seed=8).size_for(0, [1]) is None  # no scales: no resize


def test_collate_refuses_mixed_sizes_and_epochs():
    collate = SquareMultiScaleCollate([32], seed=0)
    with pytest.raises(ValueError, match=r"one size, got \[\(48, 48\), \(64, 64\)\]"):
        collate([_sample(64, 1), _sample(48, 2)])
    with pytest.raises(ValueError, match=r"epochs \[0, 1\]"):
        collate([_sample(64, 1, epoch=0), _sample(64, 2, epoch=1)])
    with pytest.raises(ValueError, match="positive sizes"):
        SquareMultiScaleCollate([640, 0])


# --------------------------------------------------------------------------------------- datamodule
def _rtdetr_cfg(root, num_workers: int = 0) -> Config:
    cfg = Config()
    augment = AugmentConfig(policy="rtdetr", square_size=64, square_scales=[32, 128], stop_epoch=2,
                            **NO_NORMALIZATION)
    cfg.data = DataConfig(dataset="synthetic", root=str(root), batch_size=2, num_workers=num_workers,
                          augment=augment, synthetic=SyntheticConfig(num_train=4, num_val=3, image_size=96))
    return cfg


def _epochs(dm: DetectionDataModule, epochs) -> dict[int, list]:
    loader = dm.train_dataloader()
    batches = {}
    for epoch in epochs:
        loader.sampler.set_epoch(epoch)  # what Lightning does at each epoch start
        batches[epoch] = list(loader)
    return batches


def test_train_loader_multi_scale_until_stop_epoch_with_persistent_workers(tmp_path):
    reference = DetectionDataModule(_rtdetr_cfg(tmp_path / "shapes"))
    reference.setup("fit")
    expected = _epochs(reference, range(4))
    workers = DetectionDataModule(_rtdetr_cfg(tmp_path / "shapes", num_workers=2))
    workers.setup("fit")
    assert workers.train_dataloader().persistent_workers
    got = _epochs(workers, range(4))
    for epoch in range(4):
        assert len(got[epoch]) == 2
        for (images, mask, targets), (ref_images, _, ref_targets) in zip(got[epoch], expected[epoch],
                                                                         strict=True):
            size = images.shape[-1]
            # Before stop_epoch a batch side from square_scales, then the transform's square_size.
            assert size in ((32, 128) if epoch < 2 else (64,)), (epoch, size)
            assert not mask.any() and all("epoch" not in target for target in targets)
            # Workers (persistent) draw exactly what the main process draws: the epoch rides on the key.
            torch.testing.assert_close(images, ref_images, rtol=0, atol=0)
            for target, ref in zip(targets, ref_targets, strict=True):
                torch.testing.assert_close(target["boxes"], ref["boxes"], rtol=0, atol=0)
    assert {batch[0].shape[-1] for epoch in (0, 1) for batch in got[epoch]} == {32, 128}


def test_resumed_loader_starts_at_the_trainers_epoch(tmp_path):
    uninterrupted = DetectionDataModule(_rtdetr_cfg(tmp_path / "shapes"))
    uninterrupted.setup("fit")
    expected = _epochs(uninterrupted, range(4))
    for epoch in (1, 3):
        resumed = DetectionDataModule(_rtdetr_cfg(tmp_path / "shapes"))
        resumed.trainer = SimpleNamespace(current_epoch=epoch)  # a run resumed at this epoch
        resumed.setup("fit")
        batches = list(resumed.train_dataloader())
        assert len(batches) == len(expected[epoch])
        for (images, _, _), (ref_images, _, _) in zip(batches, expected[epoch], strict=True):
            torch.testing.assert_close(images, ref_images, rtol=0, atol=0)


def test_val_loader_resizes_to_the_square_without_padding(tmp_path):
    cfg = _rtdetr_cfg(tmp_path / "shapes")
    cfg.data.batch_size = 3
    dm = DetectionDataModule(cfg)
    dm.setup("validate")
    batches = list(dm.val_dataloader())
    assert len(batches) == 1  # one size for every image: one batch
    images, padding_mask, targets = batches[0]
    assert images.shape == (3, 3, 64, 64) and not padding_mask.any()
    assert all(target["size"].tolist() == [64, 64] for target in targets)
    assert all(max(target["orig_size"].tolist()) == 96 for target in targets)


def test_detr_policy_keeps_the_padding_collate(tmp_path):
    cfg = _rtdetr_cfg(tmp_path / "shapes")
    cfg.data.augment = AugmentConfig(train_scales=[64, 80], max_size=128, crop_prob=0.0)
    dm = DetectionDataModule(cfg)
    dm.setup("fit")
    assert dm.train_dataloader().collate_fn is collate_detection


def test_doctor_reports_no_padding_for_the_square_resize(tmp_path):
    cfg = _rtdetr_cfg(tmp_path / "shapes")
    cfg.model.num_classes = 6
    text = diagnose(cfg).text()
    assert "no padding: every image is resized to 64 x 64" in text
    assert "padding is" not in text


# ------------------------------------------------------------------------------------------- config
def test_rtdetr_config_loads_from_yaml_and_overrides(tmp_path):
    path = tmp_path / "rt.yaml"
    path.write_text(f"_base_: {RTDETR_DATA_YAML}\n")
    cfg = load_config(path)
    aug = cfg.data.augment
    assert aug.policy == "rtdetr" and aug.square_size == 640 and aug.stop_epoch == 71
    assert aug.square_scales == [480, 512, 544, 576, 608, 640, 640, 640, 672, 704, 736, 768, 800]
    assert aug.mean == [0.0, 0.0, 0.0] and aug.std == [1.0, 1.0, 1.0]
    probabilities = (aug.photometric_prob, aug.zoom_out_prob, aug.iou_crop_prob, aug.hflip_prob)
    assert probabilities == (0.5, 0.5, 0.8, 0.5) and aug.zoom_out_max == 4.0
    off = load_config(path, overrides=["data.augment.square_scales=[]", "data.augment.stop_epoch=null"])
    assert off.data.augment.square_scales == [] and off.data.augment.stop_epoch is None
    assert load_config().data.augment.policy == "detr"  # the default, DETR's recipe


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["data.augment.policy=rtdtr"], r"'data\.augment\.policy' is 'rtdtr'; expected one of: detr, rtdetr; "
                                        r"did you mean 'rtdetr'\?"),
        (["data.augment.square_size=0"], r"'data\.augment\.square_size' is 0; it must be > 0"),
        (["data.augment.square_scales=[640,0]"],
         r"'data\.augment\.square_scales\[1\]' is 0; sizes must be > 0"),
        (["data.augment.policy=rtdetr", "data.augment.stop_epoch=-1"],
         r"'data\.augment\.stop_epoch' is -1; it must be >= 0"),
        (["data.augment.stop_epoch=5"],
         r"'data\.augment\.stop_epoch' applies to 'data\.augment\.policy: rtdetr' only, not 'detr'"),
        (["data.augment.iou_crop_prob=1.5"], r"'data\.augment\.iou_crop_prob' is 1\.5; it must be <= 1"),
        (["data.augment.photometric_prob=-0.1"],
         r"'data\.augment\.photometric_prob' is -0\.1; it must be >= 0"),
        (["data.augment.zoom_out_prob=2"], r"'data\.augment\.zoom_out_prob' is 2\.0; it must be <= 1"),
        (["data.augment.zoom_out_max=0.5"], r"'data\.augment\.zoom_out_max' is 0\.5; it must be >= 1"),
        (["data.augment.std=[1,0,1]"], r"'data\.augment\.std\[1\]' is 0(\.0)?; use 1 for no scaling"),
        (["data.augment.square_size=big"], r"invalid value for 'data\.augment\.square_size'"),
        (["data.augment.stop_epochs=3"],
         r"unknown key 'data\.augment\.stop_epochs'.*did you mean 'stop_epoch'"),
    ],
)
def test_bad_rtdetr_augment_values_name_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(overrides=overrides)


# ------------------------------------------------------------------------------- Lightning training
class _BatchSides(Callback):
    """Records (epoch, batch side) of every training batch."""

    def __init__(self) -> None:
        self.sides: list[tuple[int, int]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        images, padding_mask, targets = batch
        assert not padding_mask.any() and all("epoch" not in target for target in targets)
        self.sides.append((trainer.current_epoch, images.shape[-1]))


def _train(root, run: str, max_epochs: int, resume: str | None = None) -> list[tuple[int, int]]:
    from detr_lab.engine.trainer import train

    cfg = load_config(overrides=tiny_overrides(
        "data.dataset=synthetic", f"data.root={root / 'data'}", "data.batch_size=2", "data.num_workers=1",
        "data.synthetic.num_train=4", "data.synthetic.num_val=2", "data.synthetic.image_size=64",
        "data.augment.policy=rtdetr", "data.augment.square_size=64", "data.augment.square_scales=[32,96]",
        "data.augment.stop_epoch=2", "data.augment.mean=[0,0,0]", "data.augment.std=[1,1,1]",
        f"trainer.output_dir={root / run}", "trainer.accelerator=cpu", "trainer.devices=1",
        f"trainer.max_epochs={max_epochs}", "trainer.summary=false", "trainer.seed=0",
        "trainer.check_val_every_n_epoch=100", "trainer.log_every_n_steps=1", "data.doctor=false",
        "trainer.monitors.stalled_ap_rounds=0", "trainer.monitors.query_usage=false",
        num_classes=6, num_heads=2, num_queries=8, backbone__frozen_stages=0, decoder__num_layers=1,
    ))
    sides = _BatchSides()
    train(cfg, resume=resume, callbacks=[sides], progress_bar=False)
    return sides.sides


@pytest.mark.slow  # three short CPU fits of the tiny model
def test_training_switches_at_stop_epoch_and_a_resumed_run_draws_the_same_batches(tmp_path):
    uninterrupted = _train(tmp_path, "whole", max_epochs=3)
    assert [epoch for epoch, _ in uninterrupted] == [0, 0, 1, 1, 2, 2]
    assert {side for epoch, side in uninterrupted if epoch < 2} <= {32, 96}
    assert [side for epoch, side in uninterrupted if epoch == 2] == [64, 64]
    first = _train(tmp_path, "parts", max_epochs=2)
    rest = _train(tmp_path, "parts", max_epochs=3, resume="auto")  # a new process would do the same
    assert first + rest == uninterrupted
