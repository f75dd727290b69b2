"""The training system: a LightningModule that trains and validates a detector built from the config.

The detector, criterion and post-processor stay plain `nn.Module`s built by `detr_lab.models.build`;
this module adds what training needs around them: loss logging, the optimizer and LR schedule, COCO
evaluation of the validation set, and the run metadata stored in every checkpoint.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.warnings import PossibleUserWarning
from pycocotools.coco import COCO

from detr_lab.checkpoints.formats import LIGHTNING_META_KEY, WEIGHTS_VERSION_KEY
from detr_lab.checkpoints.migrate import WEIGHTS_VERSION, migrate_lightning_checkpoint
from detr_lab.config import Config, ConfigError, config_to_dict
from detr_lab.engine.distill import build_distiller, init_student
from detr_lab.engine.evaluator import CocoEvaluator
from detr_lab.engine.health import NonFiniteTrainingError, TrainingHealthWarning
from detr_lab.engine.optim import (
    StepwiseLR,
    bind_to_trainer,
    build_lr_scheduler,
    build_optimizer,
    freeze_backbone,
    scheduler_interval,
    update_time_fraction,
)
from detr_lab.engine.resume_checks import WORLD_SIZE_KEY
from detr_lab.models.backbones.frozen_norm_conv import fold_frozen_norms_for_training
from detr_lab.models.build import build_criterion, build_model, build_postprocess
from detr_lab.models.criterion import per_image_losses
from detr_lab.models.matcher import NonFiniteCostError

LOGGED_STATS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR100")
# The terms logged every training step besides the total `loss`: the final decoder layer's main terms.
# Every other term (auxiliary layers `_0`, `_1`, ..., encoder proposals `_enc`, denoising `_dn`, `_dn_i`,
# cardinality, distillation) is logged once per epoch.
STEP_TERMS = ("loss_ce", "loss_bbox", "loss_giou", "class_error")

# The training values are averaged over processes before `self.log` (one reduction per step or epoch), so
# Lightning's advice to log epoch values with sync_dist=True does not apply to them.
warnings.filterwarnings(
    "ignore", message=r"It is recommended to use `self\.log\('train/", category=PossibleUserWarning
)


def validation_line(epoch: int, step: int, stats: dict[str, float]) -> str:
    """One line of a validation round's COCO numbers (`trainer.coco_table: false`)."""
    sizes = "/".join(f"{stats[name]:.3f}" for name in ("APs", "APm", "APl"))
    return (f"validation, epoch {epoch}, step {step}: AP {stats['AP']:.4f}  AP50 {stats['AP50']:.4f}  "
            f"AP75 {stats['AP75']:.4f}  APs/m/l {sizes}  AR100 {stats['AR100']:.4f}")


class DetectionModule(L.LightningModule):
    """Trains `build_model(cfg.model)` with `build_criterion(cfg.model, cfg.loss)`.

    Batches are `(images, padding_mask, targets)` as the data pipeline collates them: images float
    `[B, 3, H, W]`, padding_mask bool `[B, H, W]` (True = padding), targets a list of B dicts with
    normalized cxcywh `boxes`, class-index `labels`, `image_id` and `orig_size` (h, w).

    Args:
        cfg: the run's full config.
        category_ids: class index -> original dataset category id (length `cfg.model.num_classes`).
        class_names: class index -> name (same length).
    Logged: the weighted sum `train/loss` and the final layer's main terms (`STEP_TERMS`) per step and
    per epoch (`train/<term>_step`, `train/<term>_epoch`), averaged over processes in one reduction per
    step; every other training term per epoch only (`train/<term>_epoch`, one reduction per epoch);
    `val/<term>` and `val/loss` per epoch, each the mean over the validation images of that image's
    loss alone (`per_image_losses`: the same at any batch size with same-size validation batches); and
    after each validation epoch `val/AP`, `val/AP50`, `val/AP75`, `val/APs`, `val/APm`, `val/APl`,
    `val/AR100` (COCOeval, bbox).

    With `cfg.distill.enabled`, training adds the distillation terms of a frozen teacher
    (`detr_lab.engine.distill`: `train/loss_feat`, `train/loss_kd_*`) to the loss and the logs; the
    teacher is not part of this module's state, and a new run starts the student from its weights
    (`distill.init_student`).
    """

    def __init__(self, cfg: Config, category_ids: Sequence[int], class_names: Sequence[str]):
        super().__init__()
        if len(category_ids) != cfg.model.num_classes or len(class_names) != cfg.model.num_classes:
            raise ConfigError(
                f"'model.num_classes' is {cfg.model.num_classes} but the dataset has {len(category_ids)} "
                f"category ids and {len(class_names)} class names; set model.num_classes={len(category_ids)}"
            )
        self.cfg = cfg
        self.category_ids = [int(c) for c in category_ids]
        self.class_names = [str(n) for n in class_names]
        self.model = build_model(cfg.model)
        if cfg.model.channels_last:
            self.model.to(memory_format=torch.channels_last)  # the 4-D tensors: convolution weights
        if cfg.model.fold_frozen_norms:
            fold_frozen_norms_for_training(self.model)  # same parameters and state dict keys
        if cfg.model.compile:
            self.model.compile()  # in place: the state_dict keys stay those of the eager model
        self.criterion = build_criterion(cfg.model, cfg.loss)
        self.postprocess = build_postprocess(cfg.model)
        # Multi-task knowledge distillation: a frozen teacher held outside the module tree.
        self.distiller = build_distiller(cfg)
        if self.distiller is not None and cfg.distill.init_student:
            init_student(self.model, self.distiller.teacher, str(cfg.distill.teacher_checkpoint))
        if cfg.optim.lr_backbone == 0:
            freeze_backbone(self.model)
        # Ground truth of the validation set; taken from `trainer.datamodule.val_dataset.coco` unless set.
        self.coco_gt: COCO | None = None
        self.evaluator: CocoEvaluator | None = None
        self._epoch_terms = EpochMeans()  # the training terms logged per epoch only

    def forward(self, images: torch.Tensor, padding_mask: torch.Tensor) -> dict:
        """images `[B, 3, H, W]`, padding_mask bool `[B, H, W]` (True = padding) -> the model outputs."""
        return self.model(images, padding_mask)

    def training_step(self, batch, batch_idx: int) -> torch.Tensor | None:
        """The weighted loss of one batch; None (Lightning skips the step) when the predictions are
        non-finite and `trainer.monitors.non_finite` is "skip" (single device: under DDP every rank
        must skip together). With "error" that raises `NonFiniteTrainingError` naming the step and the
        batch's image ids, instead of the matcher's error without them.

        No value is read on the host here but the matcher's cost matrix: non-finite predictions show up
        there (and are then diagnosed), and in the loss and gradients, which `NonFiniteGuard` checks in
        one combined read per optimizer step."""
        images, padding_mask, targets = batch
        # Extra query sources (denoising) make queries from the ground truth; distillation reads the memory.
        outputs = self.model(images, padding_mask, targets=targets, return_memory=self.distiller is not None)
        try:
            losses = self.criterion(outputs, targets)
        except NonFiniteCostError:
            if self._finite_predictions(outputs, targets, batch_idx):
                raise  # the targets are at fault: the matcher's message names them
            return None
        total = self.criterion.total_loss(losses)
        if self.distiller is not None:
            distillation = self.distiller(outputs, images, padding_mask)
            total = total + self.distiller.total_loss(distillation)
            losses.update(distillation)
        self._log_training_losses(losses, total, batch_size=len(targets))
        return total

    def validation_step(self, batch, batch_idx: int) -> None:
        images, padding_mask, targets = batch
        outputs = self(images, padding_mask)
        # Each image's loss alone, averaged: the epoch's values do not depend on the batch size.
        losses = per_image_losses(self.criterion, outputs, targets)
        total = self.criterion.total_loss(losses)
        self._log_validation_losses(losses, total, batch_size=len(targets))
        orig_sizes = torch.stack([target["orig_size"] for target in targets])  # [B, 2] (h, w)
        detections = self.postprocess(outputs, orig_sizes)
        if self.evaluator is not None:
            by_image = zip(targets, detections, strict=True)
            self.evaluator.update({int(target["image_id"]): detection for target, detection in by_image})

    def on_train_epoch_start(self) -> None:
        self._epoch_terms = EpochMeans()

    def on_train_epoch_end(self) -> None:
        # One reduction of every per-epoch term (all processes reach this point with the same names).
        means = self._epoch_terms.compute(lambda sums: self.trainer.strategy.reduce(sums, reduce_op="sum"))
        for name, value in means.items():
            self.log(f"train/{name}_epoch", value, on_step=False, on_epoch=True, sync_dist=False)
        self._epoch_terms = EpochMeans()

    def on_validation_epoch_start(self) -> None:
        self.evaluator = CocoEvaluator(self._validation_coco(), self.category_ids)

    def on_validation_epoch_end(self) -> None:
        evaluator, self.evaluator = self.evaluator, None
        if evaluator is None or self.trainer.sanity_checking:
            return  # the sanity check sees a couple of batches only: no COCO numbers from it
        evaluator.gather()
        stats = None
        if self.trainer.is_global_zero:
            stats = evaluator.compute()
            if self.cfg.trainer.coco_table:
                table = evaluator.summary_text()
                rank_zero_info(f"COCO bbox evaluation, epoch {self.current_epoch}:\n{table}")
            else:
                rank_zero_info(validation_line(self.current_epoch, self.global_step, stats))
        stats = self.trainer.strategy.broadcast(stats, src=0)
        # Every rank holds the same values now, so averaging over ranks leaves them unchanged.
        for name in LOGGED_STATS:
            self.log(f"val/{name}", stats[name], prog_bar=name == "AP", sync_dist=True)

    def configure_optimizers(self):
        """AdamW and the schedule of `optim.schedule`, stepped per epoch or per optimizer step. A step-wise
        schedule learns the epoch length in `on_train_start`: asking Lightning for it here would set up the
        training loader before a resumed run's loader position is restored."""
        precision = str(getattr(self._trainer, "precision", "32-true"))
        # Lightning's mixed-precision plugins refuse gradient clipping with a fused optimizer
        optimizer = build_optimizer(self.model, self.cfg.optim, fused=not precision.endswith("-mixed"))
        scheduler = build_lr_scheduler(optimizer, self.cfg.optim)
        interval = scheduler_interval(scheduler)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": interval}}

    def on_train_start(self) -> None:
        # A resumed run's ConfiguredLearningRates has bound its configured schedule already.
        scheduler = self.lr_schedulers()
        if isinstance(scheduler, StepwiseLR) and not scheduler.schedule.bound:
            bind_to_trainer(scheduler, self.trainer)

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        # A schedule relative to a time budget reads the time used before its next step.
        update_time_fraction(self.lr_schedulers(), self.trainer)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint[LIGHTNING_META_KEY] = {
            "config": config_to_dict(self.cfg),
            "category_ids": list(self.category_ids),
            "class_names": list(self.class_names),
            WEIGHTS_VERSION_KEY: WEIGHTS_VERSION,
            WORLD_SIZE_KEY: self._trainer.world_size if self._trainer is not None else 1,  # resume checks
        }

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """Resuming a run saved by an earlier release: rename its weights (and the raw weights kept
        beside an EMA average) to today's layout before Lightning loads them (`checkpoints.migrate`)."""
        meta = checkpoint.get(LIGHTNING_META_KEY)
        version = meta.get(WEIGHTS_VERSION_KEY, 1) if isinstance(meta, dict) else WEIGHTS_VERSION
        migrate_lightning_checkpoint(checkpoint, version)
        if isinstance(meta, dict):
            meta[WEIGHTS_VERSION_KEY] = WEIGHTS_VERSION

    # ---------------------------------------------------------------------------------------- helpers
    def _finite_predictions(self, outputs: dict, targets: list[dict], batch_idx: int) -> bool:
        # Only after the matcher found a non-finite cost (it reads the values on the host).
        finite = torch.isfinite(outputs["pred_logits"]).all() & torch.isfinite(outputs["pred_boxes"]).all()
        if bool(finite):
            return True
        image_ids = [int(t["image_id"]) for t in targets if "image_id" in t]
        where = (f"non-finite predictions (pred_logits / pred_boxes) at optimizer step {self.global_step} "
                 f"(epoch {self.current_epoch}, batch {batch_idx}); image ids of the batch: {image_ids}")
        if self.cfg.trainer.monitors.non_finite == "skip":
            rank_zero_warn(f"skipped a step: {where}", category=TrainingHealthWarning)
            return False
        raise NonFiniteTrainingError(f"{where}; set trainer.monitors.non_finite=skip to skip such steps")

    def _log_training_losses(self, losses: dict, total: torch.Tensor, batch_size: int) -> None:
        # The total and STEP_TERMS: stacked, averaged over processes in one reduction, logged per step
        # and epoch without a further sync. The rest: accumulated here, logged in on_train_epoch_end.
        names = ["loss", *(name for name in STEP_TERMS if name in losses)]
        values = torch.stack([total.detach().float(), *(losses[name].detach().float() for name in names[1:])])
        reduced = self.trainer.strategy.reduce(values, reduce_op="mean")  # [len(names)]
        for name, value in zip(names, reduced, strict=True):
            self.log(f"train/{name}", value, on_step=True, on_epoch=True, prog_bar=name == "loss",
                     batch_size=batch_size, sync_dist=False)
        per_epoch = {name: value for name, value in losses.items() if name not in STEP_TERMS}
        self._epoch_terms.add(per_epoch, batch_size)

    def _log_validation_losses(self, losses: dict, total: torch.Tensor, batch_size: int) -> None:
        # Per epoch, averaged over processes by Lightning at the end of the validation epoch.
        options = {"on_step": False, "on_epoch": True, "batch_size": batch_size, "sync_dist": True}
        for name, value in losses.items():
            self.log(f"val/{name}", value, **options)
        self.log("val/loss", total, prog_bar=True, **options)

    def _validation_coco(self) -> COCO:
        if self.coco_gt is not None:
            return self.coco_gt
        datamodule = getattr(self.trainer, "datamodule", None)
        dataset = getattr(datamodule, "val_dataset", None)
        coco = getattr(dataset, "coco", None)
        if coco is None:
            raise RuntimeError(
                "DetectionModule needs the validation ground truth: fit with a datamodule whose "
                "'val_dataset.coco' is a pycocotools COCO, or set module.coco_gt"
            )
        return coco


class EpochMeans:
    """Sample-weighted means of named scalar tensors over one epoch, reduced over processes in one call.

    `add` takes a dict of 0-d tensors (any device; detached and cast to float32 here) and the number of
    samples they average; `compute` returns each name's mean over every `add` of every process.
    """

    def __init__(self) -> None:
        self.names: tuple[str, ...] = ()
        self.sums: torch.Tensor | None = None  # [2, len(names)]: weighted sums, then sample counts

    def add(self, values: dict[str, torch.Tensor], weight: int) -> None:
        if not values:
            return
        names = tuple(sorted(values))
        update = torch.stack([torch.stack([values[name].detach().float() for name in names]) * weight,
                              torch.full((len(names),), float(weight), device=values[names[0]].device)])
        if self.sums is None:
            self.names, self.sums = names, update
        elif names == self.names:
            self.sums = self.sums + update
        else:  # a step with other terms: merge by name
            merged = dict(zip(self.names, self.sums.unbind(1), strict=True))
            for name, column in zip(names, update.unbind(1), strict=True):
                merged[name] = merged[name] + column if name in merged else column
            self.names = tuple(sorted(merged))
            self.sums = torch.stack([merged[name] for name in self.names], dim=1)

    def compute(self, reduce_sum: Callable[[torch.Tensor], torch.Tensor]) -> dict[str, torch.Tensor]:
        """name -> mean over every process, `reduce_sum` summing the `[2, K]` tensor over processes
        (identity on one process); {} when nothing was added. Every process must have added the same
        names, since the reduction is elementwise."""
        if self.sums is None:
            return {}
        sums, counts = reduce_sum(self.sums)
        return dict(zip(self.names, (sums / counts).unbind(), strict=True))
