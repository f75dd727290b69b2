"""What a training run says that it would otherwise leave unsaid: a resumed checkpoint whose weights
do not fit the model (named key by key, before Lightning's bare `RuntimeError`), and why training
stopped before `trainer.max_epochs` (early stopping, a spent time budget, `trainer.max_steps`).

    check_resume_weights(path, module)             # raises InputError naming the keys
    callbacks.append(StopReport())                 # prints the reason when training ends
"""

from __future__ import annotations

import os

import lightning as L
from lightning.pytorch.callbacks import Callback, EarlyStopping, Timer
from lightning.pytorch.utilities import rank_zero_info

from detr_lab.errors import InputError
from detr_lab.io import diff_state_dicts, safe_load


def check_resume_weights(path: str | os.PathLike, module: L.LightningModule) -> None:
    """Refuse to resume `path` when its weights do not fit `module`, naming the keys that differ.

    Lightning loads the checkpoint's `state_dict` strictly; a changed model section (e.g.
    `model.hidden_dim`) would fail there with "Error(s) in loading state_dict". Checkpoints without a
    `state_dict` (not Lightning's) are left to Lightning.

    Raises:
        InputError: missing, unexpected or differently shaped keys (counts and examples with shapes);
        CheckpointError: the file cannot be read (see `safe_load`).
    """
    state = safe_load(path).get("state_dict")
    if not isinstance(state, dict):
        return
    diff = diff_state_dicts(module.state_dict(), state)
    if diff.exact:
        return
    raise InputError(
        f"--resume {path}: the checkpoint's weights do not fit this run's model: {diff.summary(3)}; resume "
        f"with the model settings the run was started with (its config.yaml), or start a new run from "
        "these weights with --init-from"
    )


class StopReport(Callback):
    """When training ends, print why, if it ended before `max_epochs`: early stopping (with its patience
    and best val/AP), the spent `trainer.max_time_minutes` budget (also when a resumed run had none
    left and trained no step), or `trainer.max_steps`. `reason` holds the printed line ("" when the
    run simply reached `max_epochs`)."""

    def __init__(self) -> None:
        self.reason = ""
        self._start_step = 0

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start_step = trainer.global_step  # restored by now on resume

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.reason = self.stop_reason(trainer)
        if self.reason:
            rank_zero_info(self.reason)

    def stop_reason(self, trainer: L.Trainer) -> str:
        """The line `on_train_end` prints (see the class doc)."""
        if trainer.interrupted:
            return ""
        where = f"at epoch {trainer.current_epoch}, step {trainer.global_step}"
        for callback in trainer.callbacks:
            if isinstance(callback, EarlyStopping) and callback.stopped_epoch > 0:
                best = callback.best_score
                best_text = f"; best {callback.monitor} {float(best):.4f}" if best is not None else ""
                return (f"training stopped early {where}: {callback.monitor} did not improve by more than "
                        f"{abs(callback.min_delta)} for {callback.patience} validation rounds "
                        f"(trainer.early_stopping){best_text}")
        for callback in trainer.callbacks:
            if isinstance(callback, Timer) and callback.time_remaining() is not None \
                    and callback.time_remaining() <= 0:
                minutes = callback.time_elapsed() / 60
                trained = trainer.global_step - self._start_step
                nothing = (" before any step of this run: the resumed run had spent it already; raise "
                           "trainer.max_time_minutes to train further") if trained == 0 else ""
                return (f"training stopped {where}: the time budget trainer.max_time_minutes is spent "
                        f"({minutes:.1f} minutes trained){nothing}")
        if trainer.max_steps != -1 and trainer.global_step >= trainer.max_steps:
            return f"training stopped {where}: trainer.max_steps ({trainer.max_steps}) reached"
        return ""

