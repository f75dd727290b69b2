"""Training-health monitors: Lightning callbacks that stay silent while training is healthy.

- `StalledAPMonitor`: val/AP still at chance level after N validation rounds -> one warning that names
  the likely causes found in the config and the data (`find_stalled_ap_causes`).
- `NonFiniteGuard`: a non-finite loss or gradient -> stop with an error naming the optimizer step and
  the batch's image ids, or (policy "skip") drop that optimizer step and count it.
- `QueryUsageMonitor`: per training epoch, how the final decoder layer's Hungarian matches spread over
  the query slots -> a warning when a few slots take most matches, or when images have more objects
  than the model has queries (the extra objects can never be matched).

Warnings are `TrainingHealthWarning`s, issued on rank zero.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor

from detr_lab.config import Config

# Above this the learning rate is far from the DETR family's recipes (1e-4 DETR, 2e-4 Deformable DETR).
HIGH_LR = 1e-3
# A from-scratch backbone on fewer training images than this is a likely cause of a stalled AP.
FEW_IMAGES_FROM_SCRATCH = 10_000
# Boxes narrower or lower than this (pixels) are degenerate.
DEGENERATE_BOX_PX = 1.0


class TrainingHealthWarning(UserWarning):
    """A training-health monitor found a likely problem (the message says which and why)."""


class NonFiniteTrainingError(RuntimeError):
    """The loss or a gradient is NaN or infinite (the message names the step and the image ids)."""


def _warn(trainer: L.Trainer, message: str) -> None:
    if trainer.is_global_zero:
        warnings.warn(message, TrainingHealthWarning, stacklevel=2)


def _batch_image_ids(batch: Any) -> list[int]:
    """Image ids of a `(images, padding_mask, targets)` batch; [] for any other batch layout."""
    if isinstance(batch, (list, tuple)) and len(batch) == 3 and isinstance(batch[2], (list, tuple)):
        return [int(t["image_id"]) for t in batch[2] if isinstance(t, dict) and "image_id" in t]
    return []


# ------------------------------------------------------------------------------------- stalled AP
def find_stalled_ap_causes(
    cfg: Config | None,
    *,
    num_train_images: int | None,
    train_annotations: Sequence[dict] = (),
    val_annotations: Sequence[dict] = (),
    category_ids: Sequence[int] = (),
) -> list[str]:
    """Likely reasons why a run's AP stays at 0, each a one-line explanation naming the key or value.

    Args:
        cfg: the run's config (None: config checks skipped).
        num_train_images: size of the training set (None: unknown).
        train_annotations, val_annotations: COCO annotation dicts (`bbox` [x, y, w, h] pixels, `category_id`).
        category_ids: the model's class index -> category id mapping.
    Returns:
        the causes found, most specific first; [] when none.
    """
    causes: list[str] = []
    train_boxes = [a["bbox"] for a in train_annotations if "bbox" in a]
    if train_boxes:
        degenerate = sum(1 for _, _, w, h in train_boxes if w < DEGENERATE_BOX_PX or h < DEGENERATE_BOX_PX)
        if degenerate * 2 >= len(train_boxes):
            causes.append(
                f"{degenerate} of {len(train_boxes)} training boxes are degenerate (width or height under "
                f"{DEGENERATE_BOX_PX:g} px): check that 'bbox' is [x, y, width, height] in pixels"
            )
    elif num_train_images:
        causes.append("the training annotations hold no boxes")
    train_classes = {int(a["category_id"]) for a in train_annotations if "category_id" in a}
    val_classes = {int(a["category_id"]) for a in val_annotations if "category_id" in a}
    if val_annotations and train_annotations and not val_classes & train_classes:
        causes.append(
            f"no category id of the validation annotations ({sorted(val_classes)[:10]}) occurs in the "
            f"training annotations ({sorted(train_classes)[:10]}): check the id mapping of the two files"
        )
    elif val_classes - train_classes and train_annotations:
        causes.append(
            f"validation category ids {sorted(val_classes - train_classes)[:10]} have no training annotation"
        )
    if category_ids and train_classes and len(train_classes) * 2 < len(category_ids):
        causes.append(
            f"'model.num_classes' is {len(category_ids)} but the training annotations use only "
            f"{len(train_classes)} category ids: check model.num_classes and the id mapping"
        )
    if cfg is not None:
        backbone = cfg.model.backbone
        from_scratch = not (backbone.pretrained or backbone.weights_path)
        if from_scratch and num_train_images is not None and num_train_images < FEW_IMAGES_FROM_SCRATCH:
            causes.append(
                "the backbone starts from random weights (model.backbone.pretrained: false, no "
                f"weights_path) and the training set has only {num_train_images} images: use pretrained "
                "weights or train much longer"
            )
        if cfg.optim.lr > HIGH_LR:
            causes.append(f"'optim.lr' is {cfg.optim.lr:g}, above {HIGH_LR:g} (DETR recipes: 1e-4 to 2e-4)")
        if cfg.optim.lr_backbone > HIGH_LR:
            causes.append(f"'optim.lr_backbone' is {cfg.optim.lr_backbone:g}, above {HIGH_LR:g}")
    return causes


def _annotations(dataset: Any) -> list[dict]:
    coco = getattr(dataset, "coco", None)
    data = getattr(coco, "dataset", None)
    return list(data.get("annotations", [])) if isinstance(data, dict) else []


class StalledAPMonitor(Callback):
    """Warn once when the best val/AP of the first `rounds` validation rounds is <= `threshold`.

    The warning lists `find_stalled_ap_causes` for the run (config from `pl_module.cfg`, data from
    `trainer.datamodule.train_dataset` / `val_dataset`, COCO-format). Sanity-check rounds do not count.

    Args:
        rounds: validation rounds to wait (>= 1).
        threshold: AP at or below this counts as "no better than chance" (COCO AP in [0, 1]).
    """

    def __init__(self, rounds: int = 3, threshold: float = 0.01) -> None:
        if rounds < 1:
            raise ValueError(f"StalledAPMonitor: rounds must be >= 1, got {rounds}")
        self.rounds = rounds
        self.threshold = threshold
        self.rounds_seen = 0
        self.best_ap = -math.inf
        self.warned = False

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or "val/AP" not in trainer.callback_metrics:
            return
        self.rounds_seen += 1
        self.best_ap = max(self.best_ap, float(trainer.callback_metrics["val/AP"]))
        if self.warned or self.rounds_seen < self.rounds or self.best_ap > self.threshold:
            return
        self.warned = True
        if not trainer.is_global_zero:
            return
        datamodule = getattr(trainer, "datamodule", None)
        train_dataset = getattr(datamodule, "train_dataset", None)
        causes = find_stalled_ap_causes(
            getattr(pl_module, "cfg", None),
            num_train_images=len(train_dataset) if train_dataset is not None else None,
            train_annotations=_annotations(train_dataset),
            val_annotations=_annotations(getattr(datamodule, "val_dataset", None)),
            category_ids=getattr(pl_module, "category_ids", ()),
        )
        found = "; ".join(causes) if causes else "none found in the config or the annotations"
        _warn(
            trainer,
            f"val/AP is still {self.best_ap:.4f} (<= {self.threshold:g}) after {self.rounds_seen} validation "
            f"rounds (step {trainer.global_step}). Likely causes: {found}",
        )

    def state_dict(self) -> dict[str, Any]:
        return {"rounds_seen": self.rounds_seen, "best_ap": self.best_ap, "warned": self.warned}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.rounds_seen = int(state_dict["rounds_seen"])
        self.best_ap = float(state_dict["best_ap"])
        self.warned = bool(state_dict["warned"])


# ------------------------------------------------------------------------------------ non-finite
class NonFiniteGuard(Callback):
    """Check the loss and the gradients of every optimizer step for NaN / inf.

    Args:
        policy: "error" raises `NonFiniteTrainingError` naming the optimizer step (`trainer.global_step`,
            0-based), epoch, batch and the image ids of the batches since the last step; "skip" drops
            the step (every gradient is set to None, so the optimizer leaves weights and its state
            untouched), counts it in `skipped_steps` and logs `train/skipped_steps`.
    The gradients are checked after the backward pass (all-reduced under DDP, so every rank agrees) and
    before clipping, together with the losses of the step's backward passes: one flag computed on the
    device and read on the host once per optimizer step (the step's one synchronization besides the
    matcher's). Under "16-mixed" precision the gradient scaler already skips steps with inf
    gradients, so only the loss is checked there. A training step that returns None (the
    `DetectionModule` does so for non-finite predictions under "skip") is counted as skipped too.
    """

    def __init__(self, policy: str = "error") -> None:
        if policy not in ("error", "skip"):
            raise ValueError(f"NonFiniteGuard: policy must be 'error' or 'skip', got {policy!r}")
        self.policy = policy
        self.skipped_steps = 0
        self._batches: list[Any] = []  # the batches since the last optimizer step
        self._batch_idx = 0
        self._losses: list[Tensor] = []  # the detached losses of the backward passes since the last step

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        self._batches.append(batch)  # its image ids are read only if the step is reported
        self._batch_idx = batch_idx

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self.policy == "skip" and not outputs:  # the training step returned None: Lightning skipped it
            self._batches = []
            self.skipped_steps += 1
            pl_module.log("train/skipped_steps", float(self.skipped_steps), on_step=True, on_epoch=False)

    def on_before_backward(self, trainer: L.Trainer, pl_module: L.LightningModule, loss: Tensor) -> None:
        # Decided at the optimizer step, so that under DDP every rank raises or skips together.
        self._losses.append(loss.detach())

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer) -> None:
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        check_grads = bool(params) and "16-mixed" not in str(trainer.precision)
        losses, batches = self._losses, self._batches
        self._losses, self._batches = [], []
        flags = [torch.isfinite(loss).all() for loss in losses]  # on the device, nothing read yet
        if check_grads:
            flags += [torch.isfinite(p.grad).all() for p in params]
        if not flags:
            return
        finite = torch.stack([flag.to(flags[0].device) for flag in flags])
        if bool(finite.all()):  # the one host read
            return
        # Something is not finite: the rest reads values on the host freely.
        finite = finite.tolist()
        bad_loss = next((loss for loss, ok in zip(losses, finite, strict=False) if not ok), None)
        bad_grads: list[str] = []
        if check_grads:
            names = {id(p): name for name, p in pl_module.named_parameters()}
            grads_ok = finite[len(losses):]
            bad_grads = [names.get(id(p), "?") for p, ok in zip(params, grads_ok, strict=True) if not ok]
        if bad_loss is not None:
            bad_loss = float(bad_loss.float().flatten()[0])
        image_ids = [image_id for batch in batches for image_id in _batch_image_ids(batch)]
        what = f"non-finite loss ({bad_loss})" if bad_loss is not None else "non-finite gradients"
        if bad_grads:
            more = f" and {len(bad_grads) - 3} more" if len(bad_grads) > 3 else ""
            shown = ", ".join(bad_grads[:3]) + more
            what += f" in {shown}" if bad_loss is None else f" (gradients of {shown})"
        where = (f"at optimizer step {trainer.global_step} (epoch {trainer.current_epoch}, batch "
                 f"{self._batch_idx}); image ids of the batch: {image_ids or 'unknown'}")
        if self.policy == "error":
            raise NonFiniteTrainingError(
                f"{what} {where}; set trainer.monitors.non_finite=skip to skip such steps"
            )
        for p in params:
            p.grad = None
        self.skipped_steps += 1
        _warn(trainer, f"skipped a step: {what} {where} ({self.skipped_steps} skipped so far)")
        pl_module.log("train/skipped_steps", float(self.skipped_steps), on_step=True, on_epoch=False)

    def state_dict(self) -> dict[str, Any]:
        return {"skipped_steps": self.skipped_steps}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.skipped_steps = int(state_dict["skipped_steps"])


# ----------------------------------------------------------------------------------- query usage
def query_concentration(counts: Tensor, top_fraction: float) -> tuple[int, float]:
    """(k, share): the busiest k = ceil(top_fraction * Q) of Q query slots and their share of all matches.

    counts: int `[Q]`, matches per query slot; share is 0 when there are no matches.
    """
    num_slots = counts.numel()
    k = max(1, math.ceil(top_fraction * num_slots))
    total = int(counts.sum())
    if total == 0:
        return k, 0.0
    return k, float(counts.sort(descending=True).values[:k].sum()) / total


class QueryUsageMonitor(Callback):
    """Watch which query slots the final decoder layer's Hungarian matching uses, per training epoch.

    Forward hooks on `pl_module.criterion` and `pl_module.criterion.matcher` (a `HungarianMatcher`
    whose first call in each criterion call matches the final layer) record, during training
    batches, the matched query index of every target and each image's object count. At the end of
    each training epoch it warns when the busiest `ceil(top_fraction * Q)` slots took more than
    `max_share` of the matches (judged once an epoch has at least `min_matches_per_query * Q`
    matches), and when images had more objects than the Q queries. Each warning is issued once.
    A module without `criterion.matcher` is not monitored. With `ranked_slots` (two-stage or mixed
    query selection: slot i holds the i-th best encoder proposal) the busiest slots are the best
    proposals by design, so only the object count is checked.
    """

    def __init__(self, top_fraction: float = 0.1, max_share: float = 0.5, *, min_matches_per_query: int = 4,
                 ranked_slots: bool = False) -> None:
        if not 0 < top_fraction < 1 or not 0 < max_share < 1:
            raise ValueError(
                f"QueryUsageMonitor: top_fraction ({top_fraction}) and max_share ({max_share}) must be "
                "in (0, 1)"
            )
        self.top_fraction = top_fraction
        self.max_share = max_share
        self.min_matches_per_query = min_matches_per_query
        self.ranked_slots = ranked_slots
        self.counts: Tensor | None = None  # int64 [Q], this epoch
        self.overfull: dict[int, int] = {}  # image id -> object count, this epoch
        self.warned_concentration = False
        self.warned_overfull = False
        self._handles: list[Any] = []
        self._in_training_batch = False
        self._final_layer_next = False

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Registered once every callback's setup has run (so that e.g. the EMA's copy of the module,
        # made in its setup, carries no hooks of this monitor).
        criterion = getattr(pl_module, "criterion", None)
        matcher = getattr(criterion, "matcher", None)
        if matcher is None or self._handles:
            return
        self._handles = [
            criterion.register_forward_pre_hook(self._criterion_called),
            matcher.register_forward_hook(self._matched),
        ]

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._remove_hooks()

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._remove_hooks()  # also after an exception

    def _remove_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _criterion_called(self, module, args) -> None:
        self._final_layer_next = True

    def _matched(self, module, args, indices) -> None:
        if not (self._in_training_batch and self._final_layer_next):
            return
        self._final_layer_next = False
        outputs, targets = args[0], args[1]
        num_queries = outputs["pred_logits"].shape[1]
        if self.counts is None or self.counts.numel() != num_queries:
            self.counts = torch.zeros(num_queries, dtype=torch.int64)
        for target, (queries, _) in zip(targets, indices, strict=True):
            self.counts += torch.bincount(queries.cpu(), minlength=num_queries)
            num_objects = len(target["boxes"])
            if num_objects > num_queries:
                self.overfull[int(target.get("image_id", -1))] = num_objects

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._in_training_batch = True
        self._final_layer_next = False

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._in_training_batch = False

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        counts, overfull = self.counts, self.overfull
        self.counts, self.overfull = None, {}
        if counts is None:
            return
        num_queries = counts.numel()
        if overfull and not self.warned_overfull:
            self.warned_overfull = True
            worst = max(overfull, key=overfull.get)
            _warn(
                trainer,
                f"{len(overfull)} training images in epoch {trainer.current_epoch} have more objects than "
                f"the {num_queries} queries (up to {overfull[worst]}, image id {worst}): their extra objects "
                "are never matched; raise model.num_queries",
            )
        total = int(counts.sum())
        if self.ranked_slots or self.warned_concentration or total < self.min_matches_per_query * num_queries:
            return
        k, share = query_concentration(counts, self.top_fraction)
        if share > self.max_share:
            self.warned_concentration = True
            busiest = counts.sort(descending=True).indices[:k].tolist()
            unused = int((counts == 0).sum())
            _warn(
                trainer,
                f"query usage in epoch {trainer.current_epoch}: {share:.0%} of {total} matches went to {k} "
                f"of {num_queries} query slots ({busiest}); {unused} slots were never matched. The other "
                "queries hardly learn: check the learning rate, the matching costs (loss.cost_*) and the "
                "query initialisation",
            )
