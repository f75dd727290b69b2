"""Lightning callbacks of the engine.

`PreserveTrainingState` keeps trained work from being lost: it writes `last.ckpt` at the end of each
training epoch, before validation runs (so an unreadable validation image or any validation failure
costs no training), and turns SIGINT / SIGTERM into a stop at the next batch boundary with the state
saved, raising `detr_lab.errors.Interrupted`.

`TimedEvaluation` measures accuracy against training time: at given marks of training wall time
(evaluation time excluded) it evaluates the validation set with COCOeval, records a row, optionally
saves a checkpoint, and stops training after the last mark.
"""

from __future__ import annotations

import contextlib
import signal
import time
from bisect import bisect_right
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import Callback, WeightAveraging
from lightning.pytorch.utilities import rank_zero_info

from detr_lab.config import ConfigError
from detr_lab.engine.evaluate import predict_dataset
from detr_lab.engine.evaluator import CocoEvaluator
from detr_lab.engine.optim import (
    FLAT_COSINE,
    MULTISTEP,
    StepSchedule,
    StepwiseLR,
    bind_to_trainer,
    build_param_groups,
    saved_schedule_kind,
    schedule_kind,
)
from detr_lab.errors import Interrupted


class PreserveTrainingState(Callback):
    """Save the training state where later work could lose it; stop cleanly on SIGINT / SIGTERM.

    - After the last training batch of every epoch, before validation, and after the last step of a
      run stopped by `max_steps`, the full state goes to `last_path` (the epoch-end checkpoint of
      `ModelCheckpoint` is written only after validation, and not at all when max_steps ends a run
      mid-epoch).
    - Inside `handle_signals()`, the first SIGINT or SIGTERM sets a flag; at the next training batch
      end the state is saved to `last_path` and `Interrupted` is raised (during validation it is
      raised at the next validation batch, `last_path` already holding the end-of-epoch state). A
      second SIGINT interrupts at once, without saving.

    The checkpoint is written where `ModelCheckpoint(every_n_train_steps)` writes its own, so a run
    resumed from it (`--resume auto`) continues exactly like one resumed from a periodic checkpoint.
    """

    def __init__(self, last_path: str | Path) -> None:
        self.last_path = Path(last_path)
        self.received: str | None = None  # name of the signal received, if any
        self.saved_at_step: int | None = None

    @contextlib.contextmanager
    def handle_signals(self) -> Iterator[None]:
        """Install the SIGINT / SIGTERM handlers (main thread only; a no-op elsewhere) while inside."""
        try:
            previous = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
        except ValueError:  # not the main thread: signals cannot be handled here
            yield
            return
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _on_signal(self, signum: int, frame) -> None:
        name = signal.Signals(signum).name
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now
        self.received = self.received or name

    def _save(self, trainer: L.Trainer) -> None:
        trainer.save_checkpoint(self.last_path, weights_only=False)
        self.saved_at_step = trainer.global_step

    def raise_interrupted(self, saved: bool) -> None:
        """Raise `Interrupted` naming the signal received and what was saved."""
        if saved or self.last_path.is_file():
            where = f"training state saved to {self.last_path}; continue with --resume auto"
        else:
            where = "nothing trained yet, nothing saved"
        raise Interrupted(f"{self.received} received; {where}")

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        """Resume a checkpoint taken after an epoch's last batch as a clean start of the next epoch.

        Lightning loads the exhausted position of that epoch's loader into the next epoch's loader
        whenever `max_steps` is set, so the next epoch yields nothing (Lightning issue #19617: a run
        resumed after epoch 0 of 3 with max_steps 12 ended at step 8). Here the epoch is marked
        finished and the loader position dropped, so the next epoch starts fresh, its order and
        augmentation given by (seed, epoch) (`detr_lab.data.samplers.EpochSampler`). A validation that
        had not finished when the checkpoint was taken is not re-run. A checkpoint of a run stopped by
        `max_steps` inside an epoch resumes that epoch where it stopped.
        """
        fit_loop = checkpoint.get("loops", {}).get("fit_loop", {})
        batches = fit_loop.get("epoch_loop.batch_progress", {})
        epochs = fit_loop.get("epoch_progress", {})
        if not batches or not epochs:
            return
        if not batches.get("is_last_batch"):
            _reopen_epoch_cut_by_max_steps(epochs, batches)
            return
        for counts in (epochs["total"], epochs["current"]):
            counts["processed"] = counts["completed"] = counts["started"]
        total = batches["total"]
        if total["completed"] < total["processed"]:  # taken in the last batch's end hooks
            total["completed"] = total["processed"]
            stepped = fit_loop.get("epoch_loop.state_dict", {})
            if "_batches_that_stepped" in stepped:  # the logging step, counted after those hooks
                stepped["_batches_that_stepped"] += 1
        batches["current"] = {key: 0 for key in batches["current"]}
        batches["is_last_batch"] = False
        fit_loop.get("state_dict", {}).pop("combined_loader", None)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx):
        last_of_epoch = batch_idx + 1 >= trainer.num_training_batches
        last_step = 0 < trainer.max_steps <= trainer.global_step  # the run stops here, maybe mid-epoch
        if last_of_epoch or last_step or self.received is not None:
            self._save(trainer)
        if self.received is not None:
            self.raise_interrupted(saved=True)

    def on_validation_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx, dataloader_idx=0
    ):
        if self.received is not None:
            self.raise_interrupted(saved=False)


def _reopen_epoch_cut_by_max_steps(epochs: dict, batches: dict) -> None:
    """A run stopped by `max_steps` inside an epoch saves that epoch as processed although batches of it
    remain; mark it unfinished so that a resume with a larger `max_steps` finishes the same epoch
    (same order, from the saved loader position) instead of numbering the remainder as a new epoch."""
    current = epochs["current"]
    if batches["current"].get("ready", 0) > 0 and current["processed"] == current["started"] > 0:
        for counts in (epochs["total"], epochs["current"]):
            counts["processed"] = counts["completed"] = counts["started"] - 1


class ConfiguredLearningRates(Callback):
    """On a resumed run, apply the config's learning rates and schedule over the restored optimizer state.

    Lightning restores the optimizer's and scheduler's saved hyper-parameters, which would silently
    override a changed `optim.lr`, `optim.lr_backbone`, `optim.lr_multipliers`, `optim.weight_decay`,
    `optim.lr_drop_epochs`, `optim.lr_drop_factor` or the step-wise schedule's values (`warmup_steps`,
    `flat_epochs`, `no_aug_epochs`, `min_lr_ratio`) while config.yaml says they apply. Like the official
    Deformable-DETR's `--override_resumed_lr_drop`, the scheduler keeps its count (epochs, or optimizer
    steps for a step-wise schedule) and takes the new base rates and schedule; each group's rate becomes
    `base * factor(count)`: `lr_drop_factor ** (number of lr_drop_epochs <= scheduler epoch)`
    (MultiStepLR's rule), or the `StepSchedule` at that step, bound to the trainer's epoch length and
    `max_epochs`. Adam moments are kept. Raises ConfigError when the configured parameter groups do not
    match the checkpoint's (e.g. a multiplier key added), or when the kind of schedule changed
    (`optim.schedule`, or warm-up on / off for multistep: an epoch-stepped count cannot become a step
    count), before anything is restored.
    """

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        saved = checkpoint.get("lr_schedulers") or []
        if not saved:
            return
        was, now = saved_schedule_kind(saved[0]), schedule_kind(pl_module.cfg.optim)
        if was == now:
            return
        optim = pl_module.cfg.optim
        if FLAT_COSINE in (was, now):
            key, value = "optim.schedule", optim.schedule
            hint = f"set it back to {'flat_cosine' if was == FLAT_COSINE else 'multistep'}"
        elif was == MULTISTEP:  # epoch-stepped then, step-wise now
            key, value = "optim.warmup_steps / lr_drop_at / warmup_fraction", "set"
            hint = "give the drops in 'optim.lr_drop_epochs' without warm-up, as the checkpoint's run did"
        else:
            key, value = "optim.warmup_steps", optim.warmup_steps
            hint = ("set it back to > 0, or give a relative schedule (a warm-up already passed no longer "
                    "changes the rate)")
        raise ConfigError(f"cannot resume with '{key}: {value}': the checkpoint's LR schedule is {was!r}, "
                          f"the config's {now!r}, and the kind of schedule cannot change in a run; {hint}")

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        optim = pl_module.cfg.optim
        groups = build_param_groups(pl_module.model, optim)
        wanted = {group["name"]: group["lr"] for group in groups}
        decays = {group["name"]: group.get("weight_decay", optim.weight_decay) for group in groups}
        optimizer = trainer.optimizers[0]
        scheduler = trainer.lr_scheduler_configs[0].scheduler
        names = [group.get("name") for group in optimizer.param_groups]
        if sorted(map(str, names)) != sorted(wanted):
            raise ConfigError(f"cannot apply 'optim' to the resumed optimizer: its parameter groups are "
                              f"{names}, the config gives {sorted(wanted)}")
        if isinstance(scheduler, StepwiseLR):
            scheduler.set_schedule(StepSchedule(optim))
            bind_to_trainer(scheduler, trainer)
            factor = scheduler.schedule(scheduler.last_epoch)
        else:
            milestones = sorted(optim.lr_drop_epochs)
            factor = optim.lr_drop_factor ** bisect_right(milestones, scheduler.last_epoch)
            scheduler.milestones = Counter(milestones)
            scheduler.gamma = optim.lr_drop_factor
        changes = []
        for index, group in enumerate(optimizer.param_groups):
            base = wanted[group["name"]]
            if abs(group["lr"] - base * factor) > 1e-12 * max(1.0, base):
                changes.append(f"{group['name']} {group['lr']:g} -> {base * factor:g}")
            group["initial_lr"] = base
            group["lr"] = base * factor
            group["weight_decay"] = decays[group["name"]]
            scheduler.base_lrs[index] = base
        scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]
        if changes:
            rank_zero_info("resumed with the configured learning rates: " + ", ".join(changes))


@dataclass
class TimedRecord:
    mark_minutes: float  # the mark this row answers
    train_minutes: float  # training time when evaluated (>= the mark by at most one step), eval excluded
    wall_minutes: float  # wall time since training started, evaluations included
    cpu_minutes: float  # CPU time of this process (all its threads) for training, evaluation excluded
    epoch: int
    global_step: int
    stats: dict[str, float]  # COCOeval numbers by name (AP, AP50, ...)


class TimedEvaluation(Callback):
    """Evaluate the model on the validation set once training time passes each mark (minutes).

    Checked after every training batch, so each evaluation happens at most one step after its mark.
    Single-process only (it evaluates the whole validation set itself).

    Args:
        marks_minutes: increasing training-time marks.
        checkpoint_dir: if set, `trainer.save_checkpoint(<dir>/at_<mark>min.ckpt)` at each mark.
        stop_after_last: stop training once the last mark is evaluated.
        schedule_minutes: if set, a relative LR schedule (`optim.lr_drop_at`, ...) reads the fraction
            of this many training minutes used (evaluations excluded) as its time budget, in place of
            `trainer.max_time_minutes`, which the marks replace.
    """

    def __init__(
        self,
        marks_minutes: Sequence[float],
        *,
        checkpoint_dir: str | Path | None = None,
        stop_after_last: bool = True,
        schedule_minutes: float | None = None,
    ) -> None:
        marks = [float(m) for m in marks_minutes]
        if not marks or marks != sorted(marks) or marks[0] <= 0:
            raise ValueError(f"marks_minutes must be increasing positive numbers, got {list(marks_minutes)}")
        self.marks = marks
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
        self.stop_after_last = stop_after_last
        if schedule_minutes is not None and schedule_minutes <= 0:
            raise ValueError(f"schedule_minutes must be > 0, got {schedule_minutes}")
        self.schedule_minutes = schedule_minutes
        self.records: list[TimedRecord] = []
        self._start = 0.0
        self._eval_seconds = 0.0
        self._cpu_start = 0.0
        self._eval_cpu_seconds = 0.0

    def training_minutes(self) -> float:
        return (time.monotonic() - self._start - self._eval_seconds) / 60.0

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.world_size > 1:
            raise RuntimeError("TimedEvaluation runs in a single process; use one device")
        self._start = time.monotonic()
        self._eval_seconds = 0.0
        self._cpu_start = time.process_time()
        self._eval_cpu_seconds = 0.0

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx):
        scheduler = trainer.lr_scheduler_configs[0].scheduler if trainer.lr_scheduler_configs else None
        relative = isinstance(scheduler, StepwiseLR) and scheduler.schedule.relative
        if self.schedule_minutes is not None and relative:
            scheduler.schedule.time_fraction = min(1.0, self.training_minutes() / self.schedule_minutes)
            scheduler.refresh()
        done = len(self.records)
        if done == len(self.marks) or self.training_minutes() < self.marks[done]:
            return
        train_minutes = self.training_minutes()
        cpu_minutes = (time.process_time() - self._cpu_start - self._eval_cpu_seconds) / 60.0
        began, cpu_began = time.monotonic(), time.process_time()
        stats = self._evaluate(trainer, pl_module)
        record = TimedRecord(
            mark_minutes=self.marks[done],
            train_minutes=train_minutes,
            wall_minutes=(began - self._start) / 60.0,
            cpu_minutes=cpu_minutes,
            epoch=trainer.current_epoch,
            global_step=trainer.global_step,
            stats=stats,
        )
        self.records.append(record)
        rank_zero_info(
            f"[{record.mark_minutes:g} min mark] training {record.train_minutes:.2f} min, "
            f"epoch {record.epoch}, step {record.global_step}: AP {stats['AP']:.4f}, AP50 {stats['AP50']:.4f}"
        )
        if self.checkpoint_dir is not None:
            path = self.checkpoint_dir / f"at_{record.mark_minutes:g}min.ckpt"
            trainer.save_checkpoint(path, weights_only=False)  # full training state
        self._eval_seconds += time.monotonic() - began
        self._eval_cpu_seconds += time.process_time() - cpu_began
        if self.stop_after_last and len(self.records) == len(self.marks):
            trainer.should_stop = True

    def _evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, float]:
        """COCO stats of the weights a validation round would see: with a `WeightAveraging` callback
        (EMA), its average is swapped in through the callback's own validation hooks and back after."""
        datamodule = trainer.datamodule
        evaluator = CocoEvaluator(datamodule.val_dataset.coco, pl_module.category_ids)
        averaging = [callback for callback in trainer.callbacks if isinstance(callback, WeightAveraging)]
        was_training = pl_module.training
        for callback in averaging:
            callback.on_validation_epoch_start(trainer, pl_module)
        pl_module.eval()
        try:
            loader = datamodule.val_dataloader()
            predict_dataset(pl_module.model, pl_module.postprocess, loader, evaluator, pl_module.device)
        finally:
            pl_module.train(was_training)
            for callback in reversed(averaging):
                callback.on_validation_epoch_end(trainer, pl_module)
        return evaluator.compute()
