"""How long a training run waits for its data: the share of each step's wall time spent between the end
of one training batch and the start of the next (the loader's `next`, plus Lightning's few bookkeeping
calls between batches), against the time inside the batch (forward, matching, loss, backward, optimizer
step). A share, not absolute times, so that it reads the same on a machine shared with other work."""

from __future__ import annotations

import time
from typing import Any

import lightning as L


class DataWait(L.Callback):
    """Records, per training batch after the first `skip` ones (warm-up: loader workers starting, first
    allocations), the seconds waited before it (`waits`) and spent in it (`steps`)."""

    def __init__(self, skip: int = 2) -> None:
        self.skip = skip
        self.waits: list[float] = []
        self.steps: list[float] = []
        self._seen = 0
        self._batch_end: float | None = None
        self._batch_start = 0.0

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        now = time.perf_counter()
        self._seen += 1
        if self._batch_end is not None and self._seen > self.skip:
            self.waits.append(now - self._batch_end)
        self._batch_start = now

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self._batch_end = time.perf_counter()
        if self._seen > self.skip:
            self.steps.append(self._batch_end - self._batch_start)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._batch_end = None  # the gap across validation and the next epoch's start is not a wait

    def share(self) -> float:
        """Waiting time / (waiting + batch time) over the recorded batches; 0 when none was recorded."""
        total = sum(self.waits) + sum(self.steps)
        return sum(self.waits) / total if total > 0 else 0.0

    def summary(self) -> dict:
        """`share`, the number of waits and batches recorded, and their median seconds."""

        def median(values: list[float]) -> float:
            return sorted(values)[len(values) // 2] if values else 0.0

        return {"share": self.share(), "waits": len(self.waits), "batches": len(self.steps),
                "median_wait_s": median(self.waits), "median_batch_s": median(self.steps)}
