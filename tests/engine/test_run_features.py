"""A tiny detection run with EMA, early stopping, a time limit and the end-of-run summary switched on."""

from __future__ import annotations

import csv
import logging

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import Callback, EarlyStopping, Timer
from PIL import Image

from detr_lab.checkpoints import load_checkpoint
from detr_lab.config import load_config
from detr_lab.engine.ema import WarmupEMA
from detr_lab.engine.health import (
    NonFiniteGuard,
    NonFiniteTrainingError,
    QueryUsageMonitor,
    StalledAPMonitor,
    TrainingHealthWarning,
)
from detr_lab.engine.summary import RunSummary
from detr_lab.engine.trainer import build_run_callbacks, build_trainer, train
from detr_lab.visualize.draw import class_color, draw_ground_truth_and_predictions

from factories import TINY_AUGMENT, synthetic_data_yaml, tiny_model_yaml

TINY_YAML = tiny_model_yaml(
    num_classes=6, num_heads=2, dropout=0.0, num_queries=8, backbone__frozen_stages=0, decoder__num_layers=1
) + synthetic_data_yaml(4, 2, augment=TINY_AUGMENT.replace("0.0,", "0.0, hflip_prob: 0.0,")) + """
optim: {{lr: 1.0e-4, lr_backbone: 1.0e-4}}
trainer:
  output_dir: {root}/run
  accelerator: cpu
  devices: "1"
  max_epochs: 2
  log_every_n_steps: 1
  seed: 0
  ema: {{enabled: true, decay: 0.9, warmup_steps: 2}}
"""


class EmaSnapshots(Callback):
    """The EMA callback's averaged state after each validation round, by global step."""

    def __init__(self):
        self.by_step = {}

    def on_validation_end(self, trainer, pl_module):
        if not trainer.sanity_checking:
            ema = _callback(trainer, WarmupEMA)
            self.by_step[trainer.global_step] = {k: v.clone() for k, v in ema.averaged_state_dict().items()}


@pytest.fixture(scope="module")
def ema_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("ema_run")
    path = root / "tiny.yaml"
    path.write_text(TINY_YAML.format(root=root))
    cfg = load_config(path)
    snapshots = EmaSnapshots()
    trainer = train(cfg, progress_bar=False, callbacks=[snapshots])
    return {"root": root, "cfg": cfg, "trainer": trainer, "snapshots": snapshots.by_step}


def _callback(trainer, kind):
    found = [c for c in trainer.callbacks if isinstance(c, kind)]
    assert len(found) == 1, kind
    return found[0]


def test_config_builds_the_run_callbacks(tmp_path):
    cfg = load_config(overrides=[
        f"trainer.output_dir={tmp_path}", "trainer.accelerator=cpu", "trainer.ema.enabled=true",
        "trainer.ema.decay=0.99", "trainer.ema.warmup_steps=7", "trainer.early_stopping.enabled=true",
        "trainer.early_stopping.patience=2", "trainer.max_time_minutes=1.5",
        "trainer.monitors.non_finite=skip", "trainer.monitors.stalled_ap_rounds=4",
    ])
    trainer = build_trainer(cfg, progress_bar=False, loggers=False)
    ema = _callback(trainer, WarmupEMA)
    assert (ema.decay, ema.warmup_steps) == (0.99, 7)
    stopping = _callback(trainer, EarlyStopping)
    assert (stopping.monitor, stopping.mode, stopping.patience) == ("val/AP", "max", 2)
    assert _callback(trainer, Timer)._duration == pytest.approx(90.0)
    assert _callback(trainer, NonFiniteGuard).policy == "skip"
    assert _callback(trainer, StalledAPMonitor).rounds == 4
    _callback(trainer, QueryUsageMonitor)
    _callback(trainer, RunSummary)

    plain_cfg = load_config(overrides=[
        f"trainer.output_dir={tmp_path}", "trainer.accelerator=cpu", "trainer.monitors.stalled_ap_rounds=0",
        "trainer.monitors.query_usage=false", "trainer.summary=false",
    ])
    plain = build_trainer(plain_cfg, progress_bar=False, loggers=False)
    for kind in (WarmupEMA, EarlyStopping, Timer, StalledAPMonitor, QueryUsageMonitor, RunSummary):
        assert not [c for c in plain.callbacks if isinstance(c, kind)], kind
    _callback(plain, NonFiniteGuard)  # always on


@pytest.mark.slow  # Lightning end to end
def test_checkpoints_hold_the_ema_weights(ema_run):
    trainer = ema_run["trainer"]
    ema = _callback(trainer, WarmupEMA)
    assert ema.num_updates == trainer.global_step == 4
    # The best checkpoint (validation at step 2): `state_dict` is the average of that moment, the raw
    # weights are kept aside for resuming.
    best = trainer.checkpoint_callback.best_model_path
    assert "best-epoch000" in best
    saved = torch.load(best, weights_only=True)
    averaged_then = ema_run["snapshots"][2]
    differs = False
    for name, value in saved["state_dict"].items():
        assert torch.equal(value, averaged_then[name]), name
        differs |= not torch.equal(value, saved["current_model_state"][name])
    assert differs  # the averaged weights are not the raw ones
    # What eval / infer / export load is that average.
    for name, value in load_checkpoint(best).model.state_dict().items():
        assert torch.equal(value, averaged_then[f"model.{name}"]), name
    # When fit ends, the module holds the final average (the summary image and any export use it).
    final = ema.averaged_state_dict()
    for name, value in trainer.lightning_module.state_dict().items():
        assert torch.equal(value, final[name]), name


@pytest.mark.slow  # Lightning end to end
def test_summary_reports_final_ap_best_checkpoint_image_and_plot(ema_run, caplog):
    trainer = ema_run["trainer"]
    summary = _callback(trainer, RunSummary)
    result = summary.result
    assert result is not None and result.final_step == trainer.global_step == 4
    # Validation ran at the end of each epoch; the final AP is the last round's (EMA weights).
    assert [row["step"] for row in summary.history] == [2, 4]
    assert result.final_ap == pytest.approx(float(trainer.callback_metrics["val/AP"]))
    assert result.best_checkpoint == trainer.checkpoint_callback.best_model_path
    height, width = trainer.datamodule.val_dataset.load_sample(0).image.shape[:2]
    scale = max(1.0, 320 / min(height, width))
    with Image.open(result.example_image) as image:  # two panels side by side, 8 px apart, 14 px titles
        assert image.size == (2 * round(width * scale) + 8, round(height * scale) + 14)
    with Image.open(result.ap_plot) as plot:
        assert plot.format == "PNG"
    rows = list(csv.DictReader(open(result.ap_plot.with_suffix(".csv"))))
    assert [int(r["step"]) for r in rows] == [2, 4]
    text = result.report()
    for piece in (f"{result.final_ap:.4f}", str(result.best_checkpoint), str(result.example_image),
                  str(result.ap_plot)):
        assert piece in text


@pytest.mark.slow  # Lightning end to end
def test_summary_evaluates_when_training_stops_between_validations(tmp_path, caplog):
    (tmp_path / "tiny.yaml").write_text(TINY_YAML.format(root=tmp_path))
    cfg = load_config(tmp_path / "tiny.yaml", ["trainer.max_steps=3", "trainer.ema.enabled=false"])
    with caplog.at_level(logging.INFO):
        trainer = train(cfg, progress_bar=False)
    summary = _callback(trainer, RunSummary)
    assert [row["step"] for row in summary.history] == [2, 3]  # the last row: evaluated by the summary
    assert summary.result.final_step == 3
    assert "final COCO AP on the validation set" in caplog.text


def test_example_drawing_puts_ground_truth_left_and_predictions_right():
    image = np.full((40, 60, 3), 255, np.uint8)
    names = ["circle", "square"]
    drawn = draw_ground_truth_and_predictions(
        image, np.array([[10.0, 10.0, 30.0, 30.0]]), [1],
        np.array([[5.0, 20.0, 50.0, 35.0]]), [0], [0.9], names, score_threshold=0.5, min_side=80,
    )
    header, panel_width = 14, 120  # min_side 80: a 2x upscale
    assert drawn.size == (2 * panel_width + 8, 80 + header)
    pixels = np.asarray(drawn)
    # Ground-truth box (class 1) on the left: its right edge at x = 30 * 2; nothing there on the right.
    assert tuple(pixels[header + 50, 60]) == class_color(1)
    assert tuple(pixels[header + 50, panel_width + 8 + 60]) == (255, 255, 255)
    # Predicted box (class 0) on the right: its bottom edge at y = 35 * 2.
    assert tuple(pixels[header + 70, panel_width + 8 + 60]) == class_color(0)
    assert tuple(pixels[header + 70, 60]) == (255, 255, 255)


class NaNPredictionsAt(Callback):
    """Makes the detector's predictions NaN for one training batch (by batch index)."""

    def __init__(self, batch_idx):
        self.batch_idx = batch_idx
        self.handle = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == self.batch_idx:
            self.handle = pl_module.model.register_forward_hook(
                lambda module, args, outputs: {**outputs, "pred_boxes": outputs["pred_boxes"] * float("nan")}
            )

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.handle is not None:
            self.handle.remove()
            self.handle = None


@pytest.mark.parametrize("policy", ["error", "skip"])
def test_non_finite_predictions_stop_or_skip_the_detection_step(tmp_path, policy):
    (tmp_path / "tiny.yaml").write_text(TINY_YAML.format(root=tmp_path))
    cfg = load_config(tmp_path / "tiny.yaml", [
        "trainer.max_steps=2", "trainer.ema.enabled=false", "trainer.summary=false",
        f"trainer.monitors.non_finite={policy}", "data.synthetic.num_train=6",
    ])
    if policy == "error":
        expected = (r"non-finite predictions .* at optimizer step 1 \(epoch 0, batch 1\); "
                    r"image ids of the batch: \[\d+, \d+\]")
        with pytest.raises(NonFiniteTrainingError, match=expected):
            train(cfg, progress_bar=False, callbacks=[NaNPredictionsAt(1)])
        return
    with pytest.warns(TrainingHealthWarning, match="skipped a step: non-finite predictions"):
        trainer = train(cfg, progress_bar=False, callbacks=[NaNPredictionsAt(1)])
    assert _callback(trainer, NonFiniteGuard).skipped_steps == 1
    assert trainer.global_step == 2  # batches 0 and 2 stepped
    weights = trainer.lightning_module.model.state_dict()
    assert all(torch.isfinite(v).all() for v in weights.values() if v.is_floating_point())


class ScriptedAP(L.LightningModule):
    """Logs val/AP from a list, one value per validation round."""

    def __init__(self, aps):
        super().__init__()
        self.aps = list(aps)
        self.weight = torch.nn.Parameter(torch.ones(1))
        self.rounds = 0

    def training_step(self, batch, batch_idx):
        return (self.weight * batch[0]).pow(2).mean()

    def validation_step(self, batch, batch_idx):
        pass

    def on_validation_epoch_end(self):
        self.log("val/AP", self.aps[self.rounds])
        self.rounds += 1

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def test_early_stopping_waits_patience_rounds_without_a_better_ap(tmp_path):
    cfg = load_config(overrides=["trainer.early_stopping.enabled=true", "trainer.early_stopping.patience=2",
                                 "trainer.monitors.stalled_ap_rounds=0", "trainer.summary=false"])
    stopping = [c for c in build_run_callbacks(cfg) if isinstance(c, EarlyStopping)]
    module = ScriptedAP([0.1, 0.3, 0.2, 0.3, 0.25, 0.9, 0.9])  # best 0.3 at round 2; 0.3 again is no gain
    trainer = L.Trainer(max_epochs=7, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_checkpointing=False, num_sanity_val_steps=0, default_root_dir=tmp_path,
                        callbacks=stopping, enable_model_summary=False)
    data = torch.utils.data.DataLoader(torch.ones(2, 1), batch_size=1)
    trainer.fit(module, train_dataloaders=data, val_dataloaders=data)
    assert module.rounds == 4 and trainer.current_epoch == 4  # stopped after rounds 3 and 4 brought nothing


def test_a_failing_summary_picture_is_reported_not_raised():
    def unreadable():
        raise OSError("val/000.png: cannot identify image file")

    with pytest.warns(UserWarning, match="the example image was not written: OSError: val/000.png"):
        assert RunSummary._attempt("the example image", unreadable) is None


@pytest.mark.slow  # Lightning end to end
def test_resumed_detection_run_continues_the_average(ema_run, tmp_path):
    """Resume from the epoch-0 checkpoint (step 2) to the end: same average as the uninterrupted run."""
    straight = _callback(ema_run["trainer"], WarmupEMA).averaged_state_dict()
    best = ema_run["trainer"].checkpoint_callback.best_model_path  # written after epoch 0, full state
    cfg = load_config(ema_run["root"] / "tiny.yaml", [f"trainer.output_dir={tmp_path / 'run'}"])
    trainer = train(cfg, resume=best, progress_bar=False)
    ema = _callback(trainer, WarmupEMA)
    assert trainer.global_step == 4 and ema.num_updates == 4
    resumed = ema.averaged_state_dict()
    for name, value in straight.items():
        torch.testing.assert_close(resumed[name], value, rtol=1e-5, atol=1e-6, msg=name)
    summary = _callback(trainer, RunSummary)
    assert [row["step"] for row in summary.history] == [2, 4]  # the curve before the resume is kept


def test_bad_run_settings_name_the_key():
    from detr_lab.config import ConfigError

    with pytest.raises(ConfigError, match=r"'trainer.ema.decay' is 1.5; it must be <= 1"):
        load_config(overrides=["trainer.ema.decay=1.5"])
    with pytest.raises(ConfigError, match=r"'trainer.monitors.non_finite' is 'ignore'; expected one of"):
        load_config(overrides=["trainer.monitors.non_finite=ignore"])
    with pytest.raises(ConfigError, match=r"unknown key 'trainer.ema.decy'.*did you mean 'decay'"):
        load_config(overrides=["trainer.ema.decy=0.9"])
    with pytest.raises(ConfigError, match=r"'trainer.max_time_minutes' is -1.0; it must be >= 0"):
        load_config(overrides=["trainer.max_time_minutes=-1"])
