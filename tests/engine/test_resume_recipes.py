"""Bitwise resume for every shipped recipe family, with what draws from the global generator turned on.

Each family's demo config, shrunk (hidden 32, one or two decoder layers, a frozen backbone, 64-pixel
images, 2 + 2 images, batch 2): dropout 0.1 everywhere (DETR, Deformable DETR and ACT train with it),
DINO / RT-DETR / D-FINE's denoising noise, DEIM's mosaic and mixup, EMA. The uninterrupted run trains 2
steps (epochs 0 and 1); the resumed one starts from the checkpoint written after step 1 (the last
batch of epoch 0) and trains step 2. No validation round runs, so the two runs differ by where they
start alone (the resumed process has drawn nothing yet). Compared bit for bit: the averaged weights
the module holds at the end, and the raw weights that `last.ckpt` keeps for a further resume
(Lightning's `ModelCheckpoint` writes `last.ckpt` once more at the end of a resumed run, after EMA
copied the average into the model).
"""

import shutil
import warnings
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import Callback

from detr_lab.config import load_config
from detr_lab.engine.trainer import train
from detr_lab.io import safe_load

pytestmark = pytest.mark.slow  # Lightning end to end, two short runs per family (2 + 1 steps)

REPO = Path(__file__).resolve().parents[2]
TINY_LAYERS = ["model.hidden_dim=32", "model.num_heads=4", "model.ffn_dim=64", "model.num_queries=5",
               "model.dropout=0.1", "model.decoder.num_layers=2"]
TINY_DATA = ["data.synthetic.num_train=2", "data.synthetic.num_val=2", "data.synthetic.image_size=64",
             "data.batch_size=2", "data.num_workers=0"]
DETR_SIZES = ["data.augment.train_scales=[48,64]", "data.augment.max_size=96", "data.augment.crop_prob=0.5",
              "data.augment.crop_resize_scales=[40,48]", "data.augment.crop_min_size=30",
              "data.augment.crop_max_size=50", "data.augment.eval_size=64", "data.augment.eval_max_size=96"]
SQUARE_SIZES = ["data.augment.square_size=64", "data.augment.square_scales=[48,64]"]
FAMILIES = {
    "detr": ("demo_detr.yaml", ["model.encoder.num_layers=1", *DETR_SIZES]),
    "deformable": ("demo_deformable.yaml", ["model.encoder.num_layers=1", *DETR_SIZES]),
    "dino": ("demo_dino.yaml", ["model.encoder.num_layers=1", *DETR_SIZES]),
    "rtdetr": ("demo_rtdetr.yaml", ["model.neck.options.dropout=0.1", *SQUARE_SIZES]),
    "deim": ("demo_deim.yaml", ["model.neck.options.dropout=0.1", "data.augment.mosaic.output_size=48",
                                "data.augment.start_epoch=0", "data.augment.mosaic.start_epoch=0",
                                "data.augment.mixup.start_epoch=0", "optim.warmup_steps=2",
                                "optim.flat_epochs=1", "optim.no_aug_epochs=1", *SQUARE_SIZES]),
}


class SnapshotAfterStep(Callback):
    """Copies `last.ckpt` once PreserveTrainingState has written it after optimizer step `step`."""

    def __init__(self, step: int, target: Path):
        self.step, self.target = step, target

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            shutil.copy(Path(trainer.default_root_dir) / "checkpoints" / "last.ckpt", self.target)


def family_config(name: str, root: Path, run: str):
    config, extra = FAMILIES[name]
    overrides = [*TINY_LAYERS, *TINY_DATA, *extra, f"data.root={root / 'data'}",
                 f"trainer.output_dir={root / run}", "trainer.max_epochs=3", "trainer.max_steps=2",
                 "trainer.save_every_n_steps=0", "trainer.max_time_minutes=0", "trainer.summary=false",
                 "trainer.log_every_n_steps=1", "trainer.seed=0", "trainer.ema.enabled=true",
                 "trainer.ema.decay=0.5", "trainer.ema.warmup_steps=0", "data.doctor=false",
                 "trainer.check_val_every_n_epoch=10", "trainer.monitors.stalled_ap_rounds=0",
                 "trainer.monitors.query_usage=false", "optim.lr_backbone=0"]  # frozen backbone: faster steps
    return load_config(REPO / "configs" / config, overrides)


def fit(cfg, **options):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return train(cfg, progress_bar=False, **options)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_resumed_run_is_bitwise_the_uninterrupted_run(tmp_path, family):
    snapshot = tmp_path / "after_step_1.ckpt"
    whole = fit(family_config(family, tmp_path, "whole"), callbacks=[SnapshotAfterStep(1, snapshot)])
    assert whole.global_step == 2 and snapshot.is_file()
    (tmp_path / "resumed" / "checkpoints").mkdir(parents=True)
    shutil.copy(snapshot, tmp_path / "resumed" / "checkpoints" / "last.ckpt")
    resumed = fit(family_config(family, tmp_path, "resumed"), resume="auto")
    assert resumed.global_step == 2

    averaged, averaged_resumed = whole.lightning_module.state_dict(), resumed.lightning_module.state_dict()
    differing = [k for k, v in averaged_resumed.items() if not torch.equal(v, averaged[k])]
    assert differing == [], f"{len(differing)} of {len(averaged)} averaged tensors differ: {differing[:3]}"

    whole_last = safe_load(tmp_path / "whole" / "checkpoints" / "last.ckpt")
    resumed_last = safe_load(tmp_path / "resumed" / "checkpoints" / "last.ckpt")
    assert resumed_last["global_step"] == whole_last["global_step"] == 2
    raw, raw_resumed = whole_last["current_model_state"], resumed_last["current_model_state"]
    differing = [k for k, v in raw_resumed.items() if not torch.equal(v, raw[k])]
    assert differing == [], f"raw weights of last.ckpt: {len(differing)} tensors differ, e.g. {differing[:3]}"
    # The raw weights are not the average (decay 0.5): a further resume continues from the raw ones.
    assert any(not torch.equal(raw_resumed[k], v) for k, v in resumed_last["state_dict"].items()
               if v.is_floating_point())
