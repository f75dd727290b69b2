"""Exponential moving average (EMA) of the weights with a decay warm-up, on Lightning's `WeightAveraging`.

Lightning's callback keeps the averaged copy (`torch.optim.swa_utils.AveragedModel`), swaps it in for
validation, writes it as the checkpoint's `state_dict` (the raw weights go to `current_model_state`,
the average's counter to `averaging_state`), restores both on resume and copies the average into the
model when training ends. `WarmupEMA` keeps the raw weights of that moment for any checkpoint written
after it (Lightning's `ModelCheckpoint` writes `last.ckpt` in its own `on_train_end`, after the copy,
when no `last.ckpt` was written yet in a resumed run), so `current_model_state` always holds the raw
weights and a further resume continues from them, not from the average.

Besides that, this module supplies the averaging rule: the ModelEMA warm-up of YOLOv5 / RT-DETR,

    d_n = decay * (1 - exp(-n / warmup_steps)),   ema = d_n * ema + (1 - d_n) * weights,

where n >= 1 counts the updates before this one (the first update copies the weights). Early on, d_n is
small and the average tracks the fast-changing weights; after a few `warmup_steps` it is `decay`.
"""

from __future__ import annotations

import math

import lightning as L
import torch
from lightning.pytorch.callbacks import WeightAveraging
from torch import Tensor

from detr_lab.config import EmaConfig


def warmup_decay(num_updates: int | Tensor, decay: float, warmup_steps: int) -> float | Tensor:
    """The decay applied at update `num_updates` (>= 1): `decay * (1 - exp(-n / warmup_steps))`.

    `warmup_steps == 0` gives the constant `decay`. Accepts a Python int or an integer tensor (the
    `AveragedModel.n_averaged` counter) and returns the same kind.
    """
    if warmup_steps == 0:
        return decay
    if isinstance(num_updates, Tensor):
        return decay * (1 - torch.exp(-num_updates.double() / warmup_steps))
    return decay * (1 - math.exp(-num_updates / warmup_steps))


class WarmupEMA(WeightAveraging):
    """Lightning `WeightAveraging` with the warm-up EMA rule above, updated after every optimizer step.

    Args:
        decay: the decay reached after the warm-up, in [0, 1].
        warmup_steps: the warm-up's time constant in optimizer steps (0: constant decay).
    Floating-point parameters and buffers are averaged (BatchNorm running statistics included); integer
    buffers follow the model. Single-device and
    DDP (every rank holds the same replica); not for sharded strategies.
    """

    def __init__(self, decay: float = 0.9998, warmup_steps: int = 2000) -> None:
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA decay must be in [0, 1], got {decay}")
        if warmup_steps < 0:
            raise ValueError(f"EMA warmup_steps must be >= 0, got {warmup_steps}")
        self.decay = float(decay)
        self.warmup_steps = int(warmup_steps)
        self._raw_at_end: dict[str, Tensor] | None = None  # the raw weights when the average was copied in
        super().__init__(use_buffers=True, avg_fn=self._average)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._raw_at_end = None

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Keep a copy of the raw weights, then copy the average into the model (Lightning's rule)."""
        self._raw_at_end = {name: value.detach().clone() for name, value in pl_module.state_dict().items()}
        super().on_train_end(trainer, pl_module)

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        """Lightning's layout (average in `state_dict`, raw weights in `current_model_state`); after
        training ended, the raw weights are those kept before the average was copied in."""
        super().on_save_checkpoint(trainer, pl_module, checkpoint)
        if self._raw_at_end is not None and "current_model_state" in checkpoint:
            checkpoint["current_model_state"] = dict(self._raw_at_end)

    @classmethod
    def from_config(cls, cfg: EmaConfig) -> WarmupEMA:
        return cls(decay=cfg.decay, warmup_steps=cfg.warmup_steps)

    def _average(self, averaged: Tensor, current: Tensor, num_averaged: Tensor) -> Tensor:
        # Called by AveragedModel.update_parameters for every parameter and buffer, n_averaged >= 1.
        if not averaged.is_floating_point():
            return current  # integer buffers (BatchNorm's num_batches_tracked) are counters, not averaged
        decay = warmup_decay(num_averaged, self.decay, self.warmup_steps)
        if isinstance(decay, Tensor):
            decay = decay.to(device=averaged.device, dtype=averaged.dtype)
        return averaged * decay + current * (1 - decay)

    @property
    def num_updates(self) -> int:
        """How many updates the average has received (0 before the first optimizer step)."""
        if self._average_model is None:
            return 0
        return int(self._average_model.n_averaged)

    def averaged_state_dict(self) -> dict[str, Tensor]:
        """The averaged `LightningModule` state dict (keys as the module's own, e.g. `model.…`)."""
        if self._average_model is None:
            raise RuntimeError("WarmupEMA: no averaged model before fit starts")
        return dict(self._average_model.module.state_dict())
