"""Messages that used to hide or leak: resume weights named key by key, why training stopped, renamed
classes on --init-from, no ImageNet fetch before --init-from or --resume, every segment of a resumed
run's curves, the first of two write errors kept. Unit-level: nothing trains."""

from __future__ import annotations

import csv
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from lightning.pytorch.callbacks import EarlyStopping, Timer

import detr_lab.engine.trainer as trainer_module
from detr_lab.checkpoints import save_checkpoint
from detr_lab.config import load_config
from detr_lab.engine.module import DetectionModule
from detr_lab.engine.run_messages import StopReport, check_resume_weights
from detr_lab.engine.trainer import build_run_callbacks, init_from_checkpoint, train
from detr_lab.errors import InputError
from detr_lab.files import FileWriteError
from detr_lab.models.build import build_model
from detr_lab.predict.detections_file import DetectionsWriter
from detr_lab.visualize.curves import plot_run_curves, read_run_metrics

from factories import TINY_RUN_YAML, tiny_config

IDS, NAMES = [1, 2, 3], ["cat", "dog", "owl"]


# ------------------------------------------------------------------------------- resume weights
def test_resume_with_another_model_names_the_keys(tmp_path):
    saved = DetectionModule(tiny_config(hidden_dim=64), IDS, NAMES)
    path = tmp_path / "last.ckpt"
    torch.save({"state_dict": saved.state_dict()}, path)
    here = DetectionModule(tiny_config(), IDS, NAMES)
    with pytest.raises(InputError) as caught:
        check_resume_weights(path, here)
    message = str(caught.value)
    assert message.startswith(f"--resume {path}: the checkpoint's weights do not fit this run's model")
    assert "with a different shape (e.g. model." in message and "vs model" in message
    assert "config.yaml" in message and "--init-from" in message
    check_resume_weights(path, saved)  # the same model: no complaint


def test_train_checks_resume_weights_before_fitting(tmp_path):
    cfg = load_config(_tiny_run(tmp_path))
    other = DetectionModule(load_config(_tiny_run(tmp_path), ["model.hidden_dim=64"]),
                            list(range(1, 7)), [str(i) for i in range(6)])
    path = tmp_path / "other.ckpt"
    torch.save({"state_dict": other.state_dict()}, path)
    expected = r"with a different shape \(e\.g\. model\.\S+: \(64,\) vs model \(32,\)"
    with pytest.raises(InputError, match=expected):
        train(cfg, resume=str(path), progress_bar=False)
    assert not (Path(cfg.trainer.output_dir) / "checkpoints" / "last.ckpt").exists()


def _tiny_run(tmp_path: Path) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(TINY_RUN_YAML.format(root=tmp_path))
    return path


# ---------------------------------------------------------------------------- why it stopped
def _trainer(callbacks, *, step=40, max_steps=-1):
    return SimpleNamespace(interrupted=False, current_epoch=4, global_step=step, callbacks=callbacks,
                           max_steps=max_steps)


def test_early_stopping_is_said():
    stopper = EarlyStopping(monitor="val/AP", mode="max", patience=2, min_delta=0.01)
    stopper.stopped_epoch, stopper.best_score = 4, torch.tensor(0.25)
    reason = StopReport().stop_reason(_trainer([stopper]))
    assert reason == ("training stopped early at epoch 4, step 40: val/AP did not improve by more than 0.01 "
                      "for 2 validation rounds (trainer.early_stopping); best val/AP 0.2500")
    stopper.stopped_epoch = 0  # patience not exhausted: nothing to say
    assert StopReport().stop_reason(_trainer([stopper])) == ""


def test_a_spent_time_budget_is_said_also_when_a_resume_trains_nothing():
    timer = Timer(duration=timedelta(minutes=1))
    timer._offset = 90.0  # seconds spent before this fit (restored from the checkpoint)
    report = StopReport()
    report.on_train_start(_trainer([timer]), None)  # the resumed step: 40
    reason = report.stop_reason(_trainer([timer]))
    assert "the time budget trainer.max_time_minutes is spent (1.5 minutes trained)" in reason
    assert "before any step of this run" in reason and "raise trainer.max_time_minutes" in reason
    later = report.stop_reason(_trainer([timer], step=45))
    assert "spent" in later and "before any step" not in later


def test_max_steps_and_a_full_run():
    assert StopReport().stop_reason(_trainer([], step=3, max_steps=3)) == (
        "training stopped at epoch 4, step 3: trainer.max_steps (3) reached")
    assert StopReport().stop_reason(_trainer([Timer(duration=timedelta(minutes=5))])) == ""
    assert any(isinstance(c, StopReport) for c in build_run_callbacks(tiny_config()))


# --------------------------------------------------------------------------------- --init-from
def test_init_from_with_other_names_at_the_same_ids_says_so(tmp_path):
    cfg = tiny_config()
    path = save_checkpoint(tmp_path / "source.pt", build_model(cfg.model), cfg, IDS, NAMES)
    transfer = init_from_checkpoint(build_model(cfg.model), path, category_ids=IDS,
                                    class_names=["dog", "cat", "owl"])
    assert transfer.renamed == [(0, 1, "cat", "dog"), (1, 2, "dog", "cat")]
    warning = transfer.class_warning()
    assert "2 classes have other names" in warning
    assert "class 0 (id 1): 'cat' in the checkpoint, 'dog' here" in warning
    assert warning in transfer.report()
    same = init_from_checkpoint(build_model(cfg.model), path, category_ids=IDS, class_names=NAMES)
    assert same.renamed == [] and same.class_warning() == ""


class _Built(Exception):
    """Stops `train` once the module is built (the test looks at its config only)."""


@pytest.mark.parametrize("how", ["init_from", "resume"])
def test_a_checkpoint_start_fetches_no_imagenet_weights(tmp_path, monkeypatch, how):
    cfg = load_config(_tiny_run(tmp_path), ["model.backbone.pretrained=true"])
    path = tmp_path / "weights.ckpt"
    path.write_bytes(b"unused")
    seen = []

    def module(model_cfg, *_args):
        seen.append(model_cfg.model.backbone)
        raise _Built

    monkeypatch.setattr(trainer_module, "DetectionModule", module)
    with pytest.raises(_Built):
        train(cfg, progress_bar=False, **{how: str(path)})
    assert seen[0].pretrained is False and seen[0].weights_path is None
    seen.clear()
    with pytest.raises(_Built):
        train(cfg, progress_bar=False)  # from scratch: the ImageNet weights are wanted
    assert seen[0].pretrained is True


# ------------------------------------------------------------------------------------ curves
def _segment(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["epoch", "step", "train/loss_step", "val/AP"])
        writer.writeheader()
        writer.writerows(rows)


def test_curves_of_a_resumed_run_join_every_segment(tmp_path):
    # segment 0: steps 0..5 (killed after step 5, last checkpoint at step 3); segment 1: steps 4..9
    _segment(tmp_path / "csv" / "version_0" / "metrics.csv",
             [{"epoch": 0, "step": s, "train/loss_step": 10 - s} for s in range(6)]
             + [{"epoch": 0, "step": 3, "val/AP": 0.1}])
    _segment(tmp_path / "csv" / "version_1" / "metrics.csv",
             [{"epoch": 1, "step": s, "train/loss_step": 20 - s} for s in range(4, 10)]
             + [{"epoch": 1, "step": 9, "val/AP": 0.3}])
    paths = sorted((tmp_path / "csv").glob("version_*/metrics.csv"))
    series = read_run_metrics(paths)
    assert [(step, value) for _, step, value in series["train/loss_step"]] == [
        (0, 10), (1, 9), (2, 8), (3, 7), (4, 16), (5, 15), (6, 14), (7, 13), (8, 12), (9, 11)]
    assert [(epoch, value) for epoch, _, value in series["val/AP"]] == [(0, 0.1), (1, 0.3)]
    assert plot_run_curves(tmp_path, tmp_path / "curves.png").stat().st_size > 0


# -------------------------------------------------------------------------------- write errors
def test_a_failed_results_write_does_not_replace_the_first_error(tmp_path):
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("")
    writer = DetectionsWriter(blocker / "detections.json", {})
    first = FileWriteError(tmp_path / "out" / "a.jpg", OSError(28, "No space left on device"))
    with pytest.raises(FileWriteError) as caught:
        try:
            raise first
        finally:
            writer.flush(force=True)
    assert caught.value is first and "a.jpg" in str(caught.value)
    assert any("detections.json" in note for note in caught.value.__notes__)
    with pytest.raises(FileWriteError, match="detections.json"):
        writer.flush(force=True)  # alone, its own error is raised
