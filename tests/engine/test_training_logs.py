"""Training logs on a tiny DINO: per step the total and the final layer's main terms in one reduction,
the auxiliary-layer, proposal and denoising terms once per epoch (one more reduction)."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from detr_lab.engine.module import STEP_TERMS, DetectionModule, EpochMeans

from factories import tiny_batch, tiny_config

DINO = dict(
    num_classes=5, dropout=0.0, classification="sigmoid", query_source="mixed_selection",
    box_refine=True, share_heads=True, look_forward_twice=True, denoising__enabled=True,
    denoising__dn_number=4, encoder__attention="deformable", decoder__cross_attention="deformable",
    encoder__num_points=2, decoder__num_points=2, backbone__frozen_stages=4,
)
PER_LAYER_SUFFIXES = ("_0", "_enc", "_dn")


class RecordingModule(DetectionModule):
    """Records every `self.log` call with the phase it came from ("step" or "epoch end")."""

    phase = "other"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.logged: list[tuple[str, str, dict]] = []
        self.reductions: list[str] = []

    def log(self, name, value, **kwargs):
        self.logged.append((self.phase, name, kwargs))
        super().log(name, value, **kwargs)


class Phases(L.Callback):
    """Sets the module's phase around each training batch and counts the strategy's reductions."""

    def setup(self, trainer, pl_module, stage):
        reduce = trainer.strategy.reduce

        def counting_reduce(tensor, *args, **kwargs):
            pl_module.reductions.append(pl_module.phase)
            return reduce(tensor, *args, **kwargs)

        trainer.strategy.reduce = counting_reduce

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        pl_module.phase = f"step {batch_idx}"

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        pl_module.phase = "epoch end"


@pytest.mark.slow  # Lightning: two training steps
def test_a_training_step_logs_five_values_in_one_reduction():
    torch.manual_seed(0)
    cfg = tiny_config(**DINO)
    module = RecordingModule(cfg, [1, 2, 3, 4, 5], ["a", "b", "c", "d", "e"])
    batch = tiny_batch()
    trainer = L.Trainer(
        accelerator="cpu", devices=1, max_epochs=1, limit_val_batches=0, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        callbacks=[Phases()],
    )
    trainer.fit(module, train_dataloaders=DataLoader([batch, batch], batch_size=None))
    assert trainer.global_step == 2
    expected = {"train/loss", *(f"train/{name}" for name in STEP_TERMS)}
    for step in ("step 0", "step 1"):
        logged = [(name, options) for phase, name, options in module.logged if phase == step]
        assert {name for name, _ in logged} == expected and len(logged) == len(expected)
        assert not any(options["sync_dist"] for _, options in logged)
        assert module.reductions.count(step) == 1
    progress_bar = [options.get("prog_bar") for _, name, options in module.logged if name == "train/loss"]
    assert progress_bar == [True, True]
    epoch = [(name, options) for phase, name, options in module.logged if phase == "epoch end"]
    assert module.reductions.count("epoch end") == 1
    assert not any(options["sync_dist"] or options["on_step"] for _, options in epoch)
    for suffix in PER_LAYER_SUFFIXES:
        assert any(f"{suffix}_" in name for name, _ in epoch), suffix
    metrics = trainer.logged_metrics
    for name in ("train/loss_step", "train/loss_epoch", "train/loss_giou_epoch", "train/loss_bbox_0_epoch",
                 "train/loss_ce_dn_epoch", "train/loss_ce_enc_epoch", "train/cardinality_error_epoch"):
        assert name in metrics and torch.isfinite(metrics[name]), name


def test_epoch_means_weigh_by_samples_and_merge_new_names():
    means = EpochMeans()
    assert means.compute(lambda sums: sums) == {}
    means.add({"a": torch.tensor(1.0), "b": torch.tensor(4.0)}, 2)
    means.add({"a": torch.tensor(4.0), "b": torch.tensor(1.0)}, 1)
    means.add({"a": torch.tensor(0.0), "c": torch.tensor(3.0)}, 1)
    calls = []
    result = means.compute(lambda sums: calls.append(sums.shape) or sums)
    assert calls == [(2, 3)]
    assert {name: round(float(value), 6) for name, value in result.items()} == {"a": 1.5, "b": 3.0, "c": 3.0}
