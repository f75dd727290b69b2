"""Optimizer and LR schedules: AdamW with per-name learning rates; step decay, warm-up, flat-cosine.

Every trainable parameter gets `optim.lr`, or `optim.lr_backbone` when its name contains "backbone"
(or its module is marked `backbone_rate`, the ViTDet pyramid neck);
each `optim.lr_multipliers` substring found in the name multiplies that rate (several matches
multiply together). `lr_backbone: 0` freezes the backbone instead of training it at rate zero.
Parameters whose name contains an `optim.no_decay_keys` substring get weight decay 0 (in groups of
their own, named with a "no_decay" suffix); the others `optim.weight_decay`.

The schedule (`optim.schedule`, see `OptimConfig`) scales every group's own rate by one common factor:
- multistep without warm-up: torch's MultiStepLR, stepped once per epoch (DETR's step decay);
- multistep with `optim.warmup_steps` N > 0 (RT-DETR / D-FINE's LinearWarmup before MultiStepLR):
  factor(s) = min(1, (s + 1) / N) * lr_drop_factor ** (number of lr_drop_epochs <= s // steps_per_epoch);
- flat_cosine (DEIM's FlatCosineLRScheduler), with W = warmup_steps, F = flat_epochs * steps_per_epoch,
  A = no_aug_epochs * steps_per_epoch, T = max_epochs * steps_per_epoch, r = min_lr_ratio:
  (s / W) ** 2 for s <= W (only when W > 0); 1 for s <= F; r for s >= T - A;
  else r + (1 - r) * (1 + cos(pi * (s - F) / (T - F - A))) / 2.
Here s is the 0-based optimizer step the rate is used for (Lightning's `global_step` while it runs) and
steps_per_epoch the optimizer steps of one epoch (batches / accumulate_grad_batches, rounded up). The two
step-wise schedules are a `StepwiseLR` (torch's LambdaLR, stepped after every optimizer step); their
epoch length is known only once Lightning has set up the training loader, so `bind` fixes it when
training starts (`DetectionModule.on_train_start`, `ConfiguredLearningRates`).

Relative schedules (`optim.lr_drop_at`, `warmup_fraction`, `flat_fraction`, `no_aug_fraction`) read the
run's progress p(s) = max(s / S, t) (`run_progress`), with S the optimizer steps of the run
(max_epochs x steps_per_epoch, or max_steps when smaller) and t the fraction of the time budget used
(`trainer.max_time_minutes`; 0 without one), taken after every training batch (`update_time_fraction`):
- multistep: factor(s) = lr_drop_factor ** (number of lr_drop_at <= p(s)), times the linear warm-up
  min(1, max((s + 1) / S, t) / warmup_fraction) when warmup_fraction > 0 (or the step warm-up above);
- flat_cosine: the formula above in units of the run, with p(s) for s, 1 for T, warmup_fraction for W
  (when warmup_steps is 0), flat_fraction for F and no_aug_fraction for A.
A run limited by time thus goes through its whole schedule within its budget, on any dataset size.
"""

from __future__ import annotations

import math
from bisect import bisect_right

import torch
from lightning.pytorch.callbacks import Timer
from lightning.pytorch.trainer.states import RunningStage
from torch import nn

from detr_lab.config import ConfigError, OptimConfig, uses_relative_schedule

BACKBONE_KEY = "backbone"


def backbone_rate_parameters(model: nn.Module) -> set[int]:
    """ids of the parameters trained at `optim.lr_backbone`: those whose name contains "backbone" and
    those of modules marked `backbone_rate = True` (the ViTDet pyramid, part of the backbone before
    it became a neck: its runs keep their recipe and parameter groups)."""
    ids = {id(p) for name, p in model.named_parameters() if BACKBONE_KEY in name}
    for module in model.modules():
        if getattr(module, "backbone_rate", False):
            ids |= {id(p) for p in module.parameters()}
    return ids


def freeze_backbone(model: nn.Module) -> int:
    """Set requires_grad False on every backbone-rate parameter (`backbone_rate_parameters`); return
    how many."""
    ids = backbone_rate_parameters(model)
    count = 0
    for parameter in model.parameters():
        if id(parameter) in ids:
            parameter.requires_grad_(False)
            count += 1
    return count


def build_param_groups(model: nn.Module, optim: OptimConfig) -> list[dict]:
    """AdamW parameter groups of the trainable parameters of `model`, one per distinct rate rule.

    Each group is `{"params": [...], "lr": float, "name": str, "param_names": [...]}` (and
    `"weight_decay": 0.0` for no-decay groups); `name` is "backbone" or "default", followed by the
    multiplier keys that matched (e.g. "default*sampling_offsets") and "no_decay" where it applies.
    Raises:
        ConfigError: a key of `optim.lr_multipliers` or `optim.no_decay_keys` matches no parameter
            name (likely a typo).
    """
    all_names = [name for name, _ in model.named_parameters()]
    for option, keys in (("lr_multipliers", optim.lr_multipliers), ("no_decay_keys", optim.no_decay_keys)):
        for key in keys:
            if not any(key in name for name in all_names):
                raise ConfigError(f"'optim.{option}' key '{key}' matches no parameter name of the model")
    groups: dict[str, dict] = {}
    backbone_ids = backbone_rate_parameters(model)
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        is_backbone = id(parameter) in backbone_ids
        lr = optim.lr_backbone if is_backbone else optim.lr
        matched = [key for key in optim.lr_multipliers if key in name]
        for key in matched:
            lr *= optim.lr_multipliers[key]
        no_decay = any(key in name for key in optim.no_decay_keys)
        parts = [BACKBONE_KEY if is_backbone else "default", *matched, *(["no_decay"] if no_decay else [])]
        group_name = "*".join(parts)
        group = groups.setdefault(group_name, {"params": [], "lr": lr, "name": group_name, "param_names": []})
        if no_decay:
            group["weight_decay"] = 0.0
        group["params"].append(parameter)
        group["param_names"].append(name)
    return list(groups.values())


# Devices and dtypes of torch's fused AdamW kernels (one kernel per step for all tensors).
FUSED_DEVICES = ("cpu", "cuda")
FUSED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def build_optimizer(model: nn.Module, optim: OptimConfig, *, fused: bool = True) -> torch.optim.AdamW:
    """AdamW over `build_param_groups(model, optim)` with `optim.weight_decay` on every group.

    With `fused`, torch's fused implementation where every parameter is on a CPU or CUDA device in a
    float dtype: the same update up to rounding (1.5e-8 on DETR-R50's weights after 8 steps), and on
    a 2-core Xeon 36 ms per DETR-R50 step against 96 ms for the default per-tensor loop. Pass
    `fused=False` under Lightning's mixed precision, whose gradient clipping refuses a fused optimizer.
    """
    groups = build_param_groups(model, optim)
    if not groups:
        raise ConfigError("the model has no trainable parameter (check 'optim.lr_backbone' and the backbone)")
    parameters = [p for group in groups for p in group["params"]]
    fused = fused and all(p.device.type in FUSED_DEVICES and p.dtype in FUSED_DTYPES for p in parameters)
    fused = fused or None  # None: torch's default implementation
    return torch.optim.AdamW(groups, lr=optim.lr, weight_decay=optim.weight_decay, fused=fused)


# The kinds of schedule: an epoch-stepped MultiStepLR, or one of the step-wise `StepSchedule`s. A run
# resumes only with the kind it was saved with (`ConfiguredLearningRates`).
MULTISTEP, MULTISTEP_WARMUP, FLAT_COSINE = "multistep", "multistep_warmup", "flat_cosine"
KIND_KEY = "schedule_kind"  # in a `StepwiseLR` state dict


def schedule_kind(optim: OptimConfig) -> str:
    """MULTISTEP (no warm-up: epoch-stepped), MULTISTEP_WARMUP or FLAT_COSINE (step-wise)."""
    if optim.schedule == FLAT_COSINE:
        return FLAT_COSINE
    # A relative multistep schedule is step-wise too (its drops fall between epochs); the kind keeps its
    # name, which checkpoints store.
    stepwise = optim.warmup_steps > 0 or uses_relative_schedule(optim)
    return MULTISTEP_WARMUP if stepwise else MULTISTEP


def saved_schedule_kind(state: dict) -> str:
    """The kind of schedule a scheduler state dict of a checkpoint belongs to (MultiStepLR's has none)."""
    return state.get(KIND_KEY, MULTISTEP)


def warmup_multistep_factor(
    step: int, *, warmup_steps: int, steps_per_epoch: int, milestones: list[int], gamma: float
) -> float:
    """LR factor of optimizer step `step`: a linear warm-up over the first `warmup_steps` steps (RT-DETR's
    LinearWarmup: (step + 1) / warmup_steps, so the last warm-up step runs at the full rate) times the
    step decay of the epoch the step belongs to (one `gamma` per milestone epoch <= that epoch).

    Unlike the official loop, which skips the MultiStepLR epoch count while the warm-up lasts (delaying
    every milestone by the epochs that end inside the warm-up), milestones here are plain epochs.
    """
    factor = gamma ** bisect_right(sorted(milestones), step // steps_per_epoch)
    if step < warmup_steps:
        factor *= (step + 1) / warmup_steps
    return factor


def flat_cosine_factor(
    step: float, *, total_steps: float, warmup_steps: float, flat_steps: float, no_aug_steps: float,
    min_ratio: float,
) -> float:
    """LR factor of optimizer step `step` under DEIM's flat-cosine schedule (its `flat_cosine_schedule`
    with init_lr 1 and min_lr `min_ratio`): quadratic warm-up to step `warmup_steps`, flat to step
    `flat_steps`, cosine decay to `min_ratio`, flat at `min_ratio` from step `total_steps -
    no_aug_steps` on. The phases are tested in that order, as the official code does: a flat phase that
    reaches past the tail wins (`flat_steps` >= total: no decay at all). No warm-up when `warmup_steps`
    is 0 (the official code divides by it).

    Step `step` runs at factor(step). The official loop sets factor(i) after iteration i, so its
    iteration i + 1 runs at factor(i) and its first iteration at whatever rate the optimizer held (in
    DEIM's configs lr / 500, left by the LinearWarmup of base/optimizer.yml): the same sequence, one
    iteration later. Here the tail starts exactly with the first step of the tail epochs."""
    if warmup_steps > 0 and step <= warmup_steps:
        return (step / warmup_steps) ** 2
    if step <= flat_steps:
        return 1.0
    if step >= total_steps - no_aug_steps:
        return min_ratio
    progress = (step - flat_steps) / (total_steps - flat_steps - no_aug_steps)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def run_progress(step: int, *, total_steps: int, time_fraction: float = 0.0) -> float:
    """The fraction of the run done before optimizer step `step` (0-based): the larger of
    `step / total_steps` and `time_fraction` (the fraction of the time budget used), at most 1."""
    return min(1.0, max(step / total_steps, time_fraction))


def relative_multistep_factor(
    step: int, *, total_steps: int, time_fraction: float, drops_at: list[float], gamma: float,
    warmup_fraction: float,
) -> float:
    """LR factor of optimizer step `step` under a multistep schedule given in fractions of the run:
    one `gamma` per fraction of `drops_at` <= `run_progress`, times the linear warm-up
    min(1, max((step + 1) / total_steps, time_fraction) / warmup_fraction) when `warmup_fraction` > 0
    (the step form's (s + 1) / N with N = warmup_fraction x total_steps)."""
    progress = run_progress(step, total_steps=total_steps, time_fraction=time_fraction)
    factor = gamma ** bisect_right(sorted(drops_at), progress)
    if warmup_fraction > 0:
        factor *= min(1.0, max((step + 1) / total_steps, time_fraction) / warmup_fraction)
    return factor


class StepSchedule:
    """The LR factor of each optimizer step under `optim` (a step-wise kind), once `bind` has given the
    epoch length: `schedule(step)` is `warmup_multistep_factor` or `flat_cosine_factor`, or their
    relative forms (`relative_multistep_factor`; flat-cosine in units of the run) when `optim` gives
    any part of the schedule as a fraction of the run. `time_fraction` is the fraction of the run's time
    budget used so far (0 without one), kept current by `update_time_fraction`."""

    def __init__(self, optim: OptimConfig) -> None:
        self.kind = schedule_kind(optim)
        if self.kind == MULTISTEP:
            raise ValueError("StepSchedule: the multistep schedule without warm-up is epoch-stepped")
        self.warmup_steps = optim.warmup_steps
        self.milestones = sorted(optim.lr_drop_epochs)
        self.gamma = optim.lr_drop_factor
        self.flat_epochs = optim.flat_epochs
        self.no_aug_epochs = optim.no_aug_epochs
        self.min_ratio = optim.min_lr_ratio
        self.relative = uses_relative_schedule(optim)
        self.drops_at = sorted(optim.lr_drop_at)
        self.warmup_fraction = optim.warmup_fraction
        self.flat_fraction = optim.flat_fraction
        self.no_aug_fraction = optim.no_aug_fraction
        self.steps_per_epoch: int | None = None
        self.max_epochs: int | None = None
        self.max_steps = -1
        self.time_fraction = 0.0

    @property
    def bound(self) -> bool:
        return self.steps_per_epoch is not None

    @property
    def total_steps(self) -> int:
        """The optimizer steps of the run: max_epochs x steps_per_epoch, or max_steps when smaller."""
        if self.steps_per_epoch is None or self.max_epochs is None:
            raise RuntimeError("StepSchedule: call bind(steps_per_epoch, max_epochs) first")
        total = self.max_epochs * self.steps_per_epoch
        return min(total, self.max_steps) if self.max_steps > 0 else total

    def bind(self, steps_per_epoch: int, max_epochs: int, max_steps: int = -1) -> None:
        """Fix the epoch length (optimizer steps), the number of epochs of the run and its step limit
        (-1: none; only relative schedules read it)."""
        if steps_per_epoch < 1 or max_epochs < 1:
            raise ValueError(f"StepSchedule.bind: {steps_per_epoch} steps per epoch, {max_epochs} epochs; "
                             "both must be >= 1")
        self.steps_per_epoch, self.max_epochs = int(steps_per_epoch), int(max_epochs)
        self.max_steps = int(max_steps)

    def __call__(self, step: int) -> float:
        if self.steps_per_epoch is None or self.max_epochs is None:
            raise RuntimeError("StepSchedule: call bind(steps_per_epoch, max_epochs) first")
        if self.relative:
            return self._relative(step)
        if self.kind == MULTISTEP_WARMUP:
            return warmup_multistep_factor(step, warmup_steps=self.warmup_steps,
                                           steps_per_epoch=self.steps_per_epoch,
                                           milestones=self.milestones, gamma=self.gamma)
        return flat_cosine_factor(
            step,
            total_steps=self.max_epochs * self.steps_per_epoch,
            warmup_steps=self.warmup_steps,
            flat_steps=self.flat_epochs * self.steps_per_epoch,
            no_aug_steps=self.no_aug_epochs * self.steps_per_epoch,
            min_ratio=self.min_ratio,
        )

    def _relative(self, step: int) -> float:
        total = self.total_steps
        if self.kind == MULTISTEP_WARMUP:
            factor = relative_multistep_factor(step, total_steps=total, time_fraction=self.time_fraction,
                                               drops_at=self.drops_at, gamma=self.gamma,
                                               warmup_fraction=self.warmup_fraction)
            if step < self.warmup_steps:
                factor *= (step + 1) / self.warmup_steps
            return factor
        if self.warmup_steps > 0 and step <= self.warmup_steps:
            return (step / self.warmup_steps) ** 2
        # Epoch-given phases keep their length, as a fraction of this run.
        flat = self.flat_fraction or self.flat_epochs * self.steps_per_epoch / total
        tail = self.no_aug_fraction or self.no_aug_epochs * self.steps_per_epoch / total
        progress = run_progress(step, total_steps=total, time_fraction=self.time_fraction)
        return flat_cosine_factor(progress, total_steps=1.0, warmup_steps=self.warmup_fraction,
                                  flat_steps=flat, no_aug_steps=tail, min_ratio=self.min_ratio)


class StepwiseLR(torch.optim.lr_scheduler.LambdaLR):
    """torch's LambdaLR with one `StepSchedule` for every group, stepped after each optimizer step: the
    rate of optimizer step s is `group's initial lr * schedule(s)`, so every group (backbone, multiplied,
    no-decay) follows the schedule in proportion to its own rate, as the official schedulers do.

    Until `bind` gives the epoch length the groups keep their rates. The state dict holds the step count,
    base rates and the schedule's kind, not the schedule: a resumed run takes its values from the config
    (`ConfiguredLearningRates`), and its epoch length from the trainer.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, schedule: StepSchedule) -> None:
        self.schedule = schedule
        super().__init__(optimizer, lr_lambda=schedule)

    def set_schedule(self, schedule: StepSchedule) -> None:
        self.schedule = schedule
        self.lr_lambdas = [schedule] * len(self.optimizer.param_groups)

    def bind(self, steps_per_epoch: int, max_epochs: int, max_steps: int = -1) -> None:
        """Fix the schedule's epoch length (and run length) and set every group's rate for the current
        step."""
        self.schedule.bind(steps_per_epoch, max_epochs, max_steps)
        self.refresh()

    def refresh(self) -> None:
        """Set every group's rate for the current step from the schedule (after its `time_fraction`
        changed, or a new binding)."""
        factor = self.schedule(self.last_epoch)
        for group, base in zip(self.optimizer.param_groups, self.base_lrs, strict=True):
            group["lr"] = base * factor
        self._last_lr = [group["lr"] for group in self.optimizer.param_groups]

    def get_lr(self) -> list[float]:
        if not self.schedule.bound:
            return [group["lr"] for group in self.optimizer.param_groups]
        return super().get_lr()

    def state_dict(self) -> dict:
        skip = ("optimizer", "lr_lambdas", "schedule")
        state = {key: value for key, value in self.__dict__.items() if key not in skip}
        state[KIND_KEY] = self.schedule.kind
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        kind = saved_schedule_kind(state_dict)
        if kind != self.schedule.kind:
            raise ValueError(f"StepwiseLR: the saved schedule is {kind!r}, this one {self.schedule.kind!r}")
        skip = ("optimizer", "lr_lambdas", "schedule", KIND_KEY)
        self.__dict__.update({key: value for key, value in state_dict.items() if key not in skip})


def build_lr_scheduler(
    optimizer: torch.optim.Optimizer,
    optim: OptimConfig,
    *,
    steps_per_epoch: int | None = None,
    max_epochs: int | None = None,
) -> torch.optim.lr_scheduler.LRScheduler:
    """The scheduler of `optim.schedule`; Lightning steps it per epoch (MultiStepLR) or per optimizer step
    (`StepwiseLR`, see `scheduler_interval`).

    multistep without warm-up: multiply every group's rate by `optim.lr_drop_factor` at each epoch of
    `optim.lr_drop_epochs`; stepped once per epoch, so the drop applies from epoch `lr_drop_epochs[i]`
    (0-based) onwards. The step-wise schedules are bound to `steps_per_epoch` and `max_epochs` when both
    are given, else later (`StepwiseLR.bind`).
    """
    if schedule_kind(optim) == MULTISTEP:
        return torch.optim.lr_scheduler.MultiStepLR(
            optimizer, milestones=sorted(optim.lr_drop_epochs), gamma=optim.lr_drop_factor
        )
    scheduler = StepwiseLR(optimizer, StepSchedule(optim))
    if steps_per_epoch is not None and max_epochs is not None:
        scheduler.bind(steps_per_epoch, max_epochs)
    return scheduler


def scheduler_interval(scheduler: torch.optim.lr_scheduler.LRScheduler) -> str:
    """Lightning's `interval` for `scheduler`: "step" for a `StepwiseLR`, else "epoch"."""
    return "step" if isinstance(scheduler, StepwiseLR) else "epoch"


def optimizer_steps_per_epoch(trainer) -> int:
    """Optimizer steps of one training epoch of a Lightning trainer whose training loader is set up (from
    `on_train_start` on): its batches (after `limit_train_batches`) over `accumulate_grad_batches`,
    rounded up, as Lightning steps the optimizer on an epoch's last batch."""
    batches = trainer.num_training_batches
    if not math.isfinite(batches):
        raise RuntimeError("a step-wise LR schedule needs a training loader of known length")
    return math.ceil(int(batches) / trainer.accumulate_grad_batches)


def _budget_timer(trainer) -> Timer | None:
    """The trainer's `Timer` callback when the run has a time budget (`max_time`), else None."""
    for callback in trainer.callbacks:
        if isinstance(callback, Timer) and callback.time_remaining(RunningStage.TRAINING) is not None:
            return callback
    return None


def time_budget_fraction(trainer) -> float:
    """The fraction of the trainer's time budget (`max_time`, Lightning's `Timer`) used so far, training
    stage, validation rounds inside it included; 0 when the run has no budget."""
    timer = _budget_timer(trainer)
    if timer is None:
        return 0.0
    elapsed = timer.time_elapsed(RunningStage.TRAINING)
    remaining = timer.time_remaining(RunningStage.TRAINING)
    return min(1.0, max(0.0, elapsed / max(elapsed + remaining, 1e-9)))


def bind_to_trainer(scheduler: StepwiseLR, trainer) -> None:
    """Bind a step-wise scheduler to the run of a Lightning trainer whose training loader is set up: its
    epoch length, `max_epochs`, `max_steps` and the time budget used so far."""
    scheduler.schedule.time_fraction = time_budget_fraction(trainer)
    scheduler.bind(optimizer_steps_per_epoch(trainer), trainer.max_epochs, trainer.max_steps)


def update_time_fraction(scheduler, trainer) -> None:
    """After a training batch: give a relative step-wise schedule the fraction of the time budget used,
    the same on every process (rank 0's clock), so that all ranks change rate at the same step, and set
    the rate of the next step with it (Lightning steps the scheduler before the batch-end hooks)."""
    if not (isinstance(scheduler, StepwiseLR) and scheduler.schedule.relative):
        return
    if _budget_timer(trainer) is None:
        return
    scheduler.schedule.time_fraction = float(trainer.strategy.broadcast(time_budget_fraction(trainer), src=0))
    scheduler.refresh()
