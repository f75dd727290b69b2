"""Config -> Lightning Trainer, and the training entry point behind `tools/train.py`.

    from detr_lab.engine.trainer import train              # in a notebook, or any Python program
    trainer = train("configs/demo.yaml", ["trainer.max_time_minutes=5"], resume="auto")
    trainer.callback_metrics["val/AP"]

The console stays quiet (`detr_lab.engine.console`): no Lightning banner, tips or model table, one line
per validation round (`trainer.coco_table: true` for COCOeval's table), the progress bar.

Run directory (`cfg.trainer.output_dir`; one run at a time, and a new run refuses a folder that holds
an earlier run's checkpoints, see `detr_lab.engine.run_folder`):
    .run.lock                   locked while the run lasts (pid, host, start time inside)
    config.yaml                 the fully resolved config, written before training starts
    checkpoints/last.ckpt       the latest state: end of each training epoch (before validation, and
                                again after it), every `save_every_n_steps` steps, the last step of a
                                run stopped by max_steps, and on SIGINT / SIGTERM
                                (`detr_lab.engine.callbacks.PreserveTrainingState`)
    checkpoints/best-*.ckpt     the best validation round by val/AP (with EMA on: the EMA weights' AP)
    summary/                    example.png, ap_over_time.png / .csv (see detr_lab.engine.summary)
    tensorboard/version_N/      TensorBoard events;  csv/version_N/metrics.csv  the same as CSV
    mlflow.db, wandb/           with `trainer.loggers` listing mlflow / wandb (see detr_lab.engine.trackers)

Multi-GPU and multi-node training use Lightning's DDP strategy: set `trainer.devices` and
`trainer.num_nodes` and launch one process per GPU with torchrun or srun (Lightning reads the
rank from their environment variables).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import (
    Callback,
    EarlyStopping,
    LearningRateMonitor,
    ModelCheckpoint,
    TQDMProgressBar,
)
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only, rank_zero_warn
from lightning.pytorch.utilities.exceptions import SIGTERMException
from torch import nn

from detr_lab.checkpoints import LIGHTNING_META_KEY, apply_overrides, load_checkpoint
from detr_lab.config import Config, ConfigError, TrainerConfig, load_config, save_config
from detr_lab.data.datamodule import DetectionDataModule
from detr_lab.data.doctor import check_at_training_start
from detr_lab.engine.callbacks import ConfiguredLearningRates, PreserveTrainingState
from detr_lab.engine.checkpoint_io import AtomicCheckpointIO, remove_stale_temporaries
from detr_lab.engine.console import quiet_console
from detr_lab.engine.ema import WarmupEMA
from detr_lab.engine.health import NonFiniteGuard, QueryUsageMonitor, StalledAPMonitor
from detr_lab.engine.module import DetectionModule
from detr_lab.engine.resume_checks import RefuseInexactResume, StepSeeds
from detr_lab.engine.run_folder import claim_run_folder
from detr_lab.engine.run_messages import StopReport, check_resume_weights
from detr_lab.engine.summary import RunSummary
from detr_lab.engine.trackers import TrackerReport, build_loggers, require_tracker
from detr_lab.errors import InputError
from detr_lab.io import diff_state_dicts, safe_load
from detr_lab.models.build import query_spec

LAST_CHECKPOINT = "last.ckpt"


def checkpoint_dir(cfg: Config) -> Path:
    return Path(cfg.trainer.output_dir) / "checkpoints"


def parse_devices(value: str) -> int | str | list[int]:
    """`trainer.devices` -> Lightning's argument: "auto", a count ("8" -> 8) or a list ("0,1" -> [0, 1])."""
    text = str(value).strip()
    try:
        if text == "auto":
            return "auto"
        if "," in text:
            return [int(item) for item in text.split(",") if item.strip()]
        return int(text)
    except ValueError:
        raise ConfigError(
            f"'trainer.devices' is {value!r}; expected 'auto', a count such as '8' or a list such as '0,1'"
        ) from None


def process_count(t: TrainerConfig) -> int | None:
    """Processes the run will have (`trainer.devices` x `trainer.num_nodes`), or None where only
    Lightning knows it (`devices: auto` on an accelerator other than the CPU, or -1: every GPU)."""
    devices = parse_devices(t.devices)
    if devices == "auto":
        on_cpu = t.accelerator == "cpu" or (t.accelerator == "auto" and not torch.cuda.is_available())
        return t.num_nodes if on_cpu else None
    count = len(devices) if isinstance(devices, list) else devices
    return count * t.num_nodes if count > 0 else None


def effective_strategy(t: TrainerConfig) -> str:
    """`trainer.strategy`, except that a DDP strategy for a single process becomes "auto" (Lightning's
    single-device strategy): DDP would still wrap the model in DistributedDataParallel and all-reduce
    every gradient with itself at every step (DETR-R50 on the CPU, 2 x 512 x 683, Lightning steps of two
    fits each way, alternating: median 3.47 s with DDP against 3.10 s without, with a wide spread).
    The COCO recipes name `ddp` for their multi-GPU runs."""
    if t.strategy.startswith("ddp") and process_count(t) == 1:
        return "auto"
    return t.strategy


def build_callbacks(cfg: Config, *, progress_bar: bool = True) -> list[Callback]:
    """Checkpointing (best by val/AP, last, optional every-N-steps last), LR monitor, the run callbacks
    of `build_run_callbacks` (EMA, early stopping, health monitors, summary), progress bar."""
    directory = checkpoint_dir(cfg)
    callbacks: list[Callback] = [
        ModelCheckpoint(
            dirpath=directory,
            filename="best-epoch{epoch:03d}-ap{val/AP:.4f}",
            auto_insert_metric_name=False,
            monitor="val/AP",
            mode="max",
            save_top_k=1,
            save_last=True,
            enable_version_counter=False,  # both callbacks refresh the same last.ckpt
        ),
        LearningRateMonitor(),  # per epoch, or per logged step for a step-wise schedule
    ]
    if cfg.trainer.save_every_n_steps > 0:
        # Refreshes last.ckpt mid-epoch so that an interrupted run loses at most N steps.
        callbacks.append(
            ModelCheckpoint(
                dirpath=directory,
                every_n_train_steps=cfg.trainer.save_every_n_steps,
                save_top_k=0,
                save_last=True,
                enable_version_counter=False,
            )
        )
    callbacks.extend(build_run_callbacks(cfg))
    if progress_bar:
        callbacks.append(TQDMProgressBar(refresh_rate=1))
    return callbacks


def build_run_callbacks(cfg: Config) -> list[Callback]:
    """EMA, early stopping, the training-health monitors and the end-of-run summary, from `cfg.trainer`."""
    t = cfg.trainer
    callbacks: list[Callback] = []
    if t.ema.enabled:
        callbacks.append(WarmupEMA.from_config(t.ema))
    if t.early_stopping.enabled:
        callbacks.append(
            EarlyStopping(
                monitor="val/AP",
                mode="max",
                patience=t.early_stopping.patience,
                min_delta=t.early_stopping.min_delta,
                check_on_train_epoch_end=False,  # val/AP exists after validation only
            )
        )
    monitors = t.monitors
    callbacks.append(NonFiniteGuard(monitors.non_finite))
    if monitors.stalled_ap_rounds > 0:
        callbacks.append(StalledAPMonitor(monitors.stalled_ap_rounds, monitors.stalled_ap_threshold))
    if monitors.query_usage:
        ranked = query_spec(cfg.model)[1].ranked_slots  # slots = proposals by score
        callbacks.append(
            QueryUsageMonitor(monitors.query_top_fraction, monitors.query_max_share, ranked_slots=ranked)
        )
    if t.summary:
        callbacks.append(RunSummary(t.output_dir))
    callbacks.append(StopReport())  # says why training ended early (early stopping, time, max_steps)
    return callbacks


def build_trainer(
    cfg: Config,
    *,
    callbacks: Sequence[Callback] = (),
    progress_bar: bool = True,
    loggers: bool = True,
) -> L.Trainer:
    """A Lightning Trainer configured from `cfg.trainer` and `cfg.optim.clip_grad_norm`.

    Args:
        callbacks: extra callbacks, added after the standard ones (see `build_callbacks`).
        progress_bar: show the TQDM progress bar.
        loggers: the experiment trackers of `trainer.loggers` (see `detr_lab.engine.trackers`) and the
            `TrackerReport` callback that gives them the config, final metrics and best checkpoint.
    Raises:
        MissingExtraError: mlflow or wandb listed in `trainer.loggers` and not installed.
    """
    quiet_console()
    t = cfg.trainer
    output_dir = Path(t.output_dir)
    logger: list | bool = False
    tracking: list[Callback] = []
    if loggers and t.loggers:
        logger = build_loggers(cfg)
        tracking = [TrackerReport(cfg)]
    clip = cfg.optim.clip_grad_norm
    return L.Trainer(
        accelerator=t.accelerator,
        devices=parse_devices(t.devices),
        num_nodes=t.num_nodes,
        strategy=effective_strategy(t),
        precision=t.precision,
        max_epochs=t.max_epochs,
        max_steps=t.max_steps,
        max_time=timedelta(minutes=t.max_time_minutes) if t.max_time_minutes > 0 else None,
        accumulate_grad_batches=t.accumulate_grad_batches,
        gradient_clip_val=clip if clip > 0 else None,
        gradient_clip_algorithm="norm",
        check_val_every_n_epoch=t.check_val_every_n_epoch,
        log_every_n_steps=t.log_every_n_steps,
        limit_train_batches=_limit(t.limit_train_batches),
        limit_val_batches=_limit(t.limit_val_batches),
        default_root_dir=output_dir,
        logger=logger,
        callbacks=[*build_callbacks(cfg, progress_bar=progress_bar), *tracking, *callbacks],
        enable_progress_bar=progress_bar,
        enable_model_summary=False,  # one line instead (`train`)
        plugins=[AtomicCheckpointIO()],
    )


def _limit(value: float) -> float | int | None:
    # Lightning reads a float as a fraction and an int as a number of batches: 1.0 is "all", 5.0 is 5 batches.
    if value == 1.0:
        return None  # Lightning's default (all batches), without its notice about the explicit value
    return int(value) if value > 1 and float(value).is_integer() else value


def resolve_resume(cfg: Config, resume: str | None) -> Path | None:
    """`--resume` -> checkpoint: None, "auto" (`<output_dir>/checkpoints/last.ckpt` if present) or a path.

    Raises:
        FileNotFoundError: an explicit path that does not exist.
    """
    if not resume:
        return None
    if resume == "auto":
        last = checkpoint_dir(cfg) / LAST_CHECKPOINT
        return last if last.is_file() else None
    path = Path(resume)
    if not path.is_file():
        raise FileNotFoundError(f"--resume: checkpoint not found: {path}")
    return path


def check_resume_classes(path: Path, category_ids: Sequence[int]) -> None:
    """Refuse to resume a checkpoint trained on other classes, naming both class lists.

    Checkpoints without detr_lab metadata are left to Lightning. Raises:
        InputError: the class lists differ; CheckpointError: the file cannot be read (see `safe_load`).
    """
    meta = safe_load(path).get(LIGHTNING_META_KEY) or {}
    saved = meta.get("category_ids")
    if saved is None or [int(c) for c in saved] == [int(c) for c in category_ids]:
        return
    raise InputError(
        f"--resume {path}: checkpoint has {len(saved)} classes ({list(saved)}), this run {len(category_ids)} "
        f"({list(category_ids)}); use --init-from to fine-tune on other classes"
    )


# ------------------------------------------------------------------------------ fine-tuning init
@dataclass
class WeightTransfer:
    """What `load_matching_weights` copied: by parameter/buffer name, and why the rest was not."""

    source: str
    loaded: list[str] = field(default_factory=list)
    # name, shape in the source, shape in the model: kept at the model's fresh initialisation.
    reinitialised: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # in the model, not in the source
    unused: list[str] = field(default_factory=list)  # in the source, not in the model
    # (class index, category id here, name in the source, name here) where a class head of the same
    # size was reused for classes of other names
    renamed: list[tuple[int, int, str, str]] = field(default_factory=list)

    def class_warning(self) -> str:
        """A line when the source's classes have other names at the same class indices; "" otherwise."""
        if not self.renamed:
            return ""
        shown = "; ".join(f"class {index} (id {cid}): {old!r} in the checkpoint, {new!r} here"
                          for index, cid, old, new in self.renamed[:4])
        more = f"; and {len(self.renamed) - 4} more" if len(self.renamed) > 4 else ""
        return (f"init from {self.source}: the class head is reused, but {len(self.renamed)} classes have "
                f"other names in this dataset ({shown}{more}); it starts out predicting the checkpoint's "
                "classes under this dataset's names")

    def report(self) -> str:
        total = len(self.loaded) + len(self.reinitialised) + len(self.missing)
        count = f"loaded {len(self.loaded)} of {total} model tensors (matched by name and shape)"
        lines = [f"init from {self.source}: {count}"]
        for name, source_shape, model_shape in self.reinitialised:
            shapes = f"shape {list(source_shape)} in checkpoint, {list(model_shape)} here"
            lines.append(f"  re-initialised ({shapes}): {name}")
        for name in self.missing:
            lines.append(f"  not in checkpoint (kept fresh initialisation): {name}")
        for name in self.unused:
            lines.append(f"  in checkpoint, not in this model (ignored): {name}")
        if self.renamed:
            lines.append(f"  {self.class_warning()}")
        return "\n".join(lines)


def load_matching_weights(
    model: nn.Module, source: dict[str, torch.Tensor], source_name: str
) -> WeightTransfer:
    """Copy every tensor of `source` whose name and shape match one of `model`'s state; report the rest.

    The typical use is fine-tuning on a dataset with another class count: the class head differs in
    shape, stays freshly initialised, and everything else is loaded.
    """
    diff = diff_state_dicts(model.state_dict(), source)
    transfer = WeightTransfer(
        source=source_name,
        loaded=diff.matched,
        reinitialised=diff.mismatched,
        missing=diff.missing,
        unused=diff.unexpected,
    )
    model.load_state_dict({name: source[name] for name in diff.matched}, strict=False)
    return transfer


def init_from_checkpoint(
    model: nn.Module, path: str | Path, *, category_ids: Sequence[int] | None = None,
    class_names: Sequence[str] | None = None,
) -> WeightTransfer:
    """Load the weights of any checkpoint `load_checkpoint` reads (detr_lab, Lightning, official DETR).

    With this run's `category_ids` and `class_names`, a checkpoint with as many classes whose names
    differ at some class index is recorded in `WeightTransfer.renamed` (see `class_warning`).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--init-from: checkpoint not found: {path}")
    loaded = load_checkpoint(path)
    transfer = load_matching_weights(model, loaded.model.state_dict(), str(path))
    if class_names is not None and len(loaded.class_names) == len(class_names):
        ids = list(category_ids) if category_ids is not None else list(loaded.category_ids)
        pairs = enumerate(zip(loaded.class_names, class_names, strict=True))
        transfer.renamed = [(index, int(ids[index]), str(old), str(new))
                            for index, (old, new) in pairs if str(old) != str(new)]
    return transfer


def without_backbone_download(cfg: Config) -> Config:
    """`cfg` with `model.backbone.pretrained` and `weights_path` off: for a model whose weights a
    checkpoint replaces (resume, --init-from), so that an offline run does not fetch ImageNet weights."""
    backbone = dataclasses.replace(cfg.model.backbone, pretrained=False, weights_path=None)
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, backbone=backbone))


def _backbone_not_initialised(cfg: Config, transfer: WeightTransfer) -> str:
    """A line when ImageNet weights were skipped for --init-from but the checkpoint lacks backbone tensors."""
    if not (cfg.model.backbone.pretrained or cfg.model.backbone.weights_path):
        return ""
    fresh = [name for name in transfer.missing if name.startswith("backbone.")]
    fresh += [name for name, _, _ in transfer.reinitialised if name.startswith("backbone.")]
    if not fresh:
        return ""
    return (f"init from {transfer.source}: {len(fresh)} backbone tensors are not in the checkpoint and keep "
            "their random initialisation (the ImageNet weights of model.backbone are not fetched with "
            "--init-from)")


# ------------------------------------------------------------------------------------- training
def train(
    cfg: Config | str | os.PathLike,
    overrides: Sequence[str] = (),
    *,
    resume: str | None = None,
    init_from: str | None = None,
    callbacks: Sequence[Callback] = (),
    progress_bar: bool = True,
) -> L.Trainer:
    """Train `cfg` from scratch, from `init_from` weights, or resume an interrupted run.

    The Python form of `tools/train.py` (for notebooks: `from detr_lab.engine.trainer import train`).

    Args:
        cfg: a `Config`, or the path of a YAML config (loaded with `load_config`).
        overrides: dotted `key=value` changes, as `--set` takes them (e.g. "optim.lr=2e-4").
        resume: None, "auto" (resume from `<output_dir>/checkpoints/last.ckpt` when it exists, else
            start) or a checkpoint path. Resuming restores weights, optimizer state, epoch and global
            step; `init_from` is then ignored. The learning rates, weight decay and LR drops of `cfg.optim`
            are applied after the restore (`ConfiguredLearningRates`), so config.yaml says what runs.
        init_from: a checkpoint whose weights initialise the model where names and shapes match
            (see `load_matching_weights`); a report of what was loaded is printed.
    Returns:
        The Trainer after `fit` (its `callback_metrics`, `global_step`, `checkpoint_callback`). With
        `trainer.summary` on, the final val AP, the best checkpoint and the paths of the example image
        and the AP plot are printed when fit ends (`RunSummary.result` holds them). With EMA on, the
        module then holds the averaged weights.
    Raises:
        MissingExtraError: a tracker of `trainer.loggers` whose package is not installed (checked first).
        ConfigError: an invalid config file, key or override; a resume that could not continue exactly:
            other parameter groups, another batch size in mid-epoch, another kind of LR schedule
            (`detr_lab.engine.resume_checks`).
        NonFiniteTrainingError: a non-finite loss, gradient or prediction under
            `trainer.monitors.non_finite: error` (the message names the step and the image ids).
        InputError: another run holds `trainer.output_dir`, or the folder holds an earlier run's
            checkpoints and this run would write over them (`detr_lab.engine.run_folder`).
    """
    if not isinstance(cfg, Config):
        cfg = load_config(cfg, list(overrides))
    elif overrides:
        cfg = apply_overrides(cfg, overrides, "train() override")
    for tracker in cfg.trainer.loggers:
        require_tracker(tracker)  # a missing mlflow / wandb extra stops the run before any work
    L.seed_everything(cfg.trainer.seed, workers=True, verbose=False)
    check_at_training_start(cfg)  # the dataset doctor, briefly (data.doctor); raises on blocking problems
    ckpt_path = resolve_resume(cfg, resume)
    # The run owns its folder from here on: a lock, and no writing over an earlier run's checkpoints.
    with claim_run_folder(cfg.trainer.output_dir, checkpoint_dir(cfg), ckpt_path):
        return _train_in_owned_folder(cfg, ckpt_path, resume, init_from, callbacks, progress_bar)


def _train_in_owned_folder(
    cfg: Config, ckpt_path: Path | None, resume: str | None, init_from: str | None,
    callbacks: Sequence[Callback], progress_bar: bool,
) -> L.Trainer:
    datamodule = DetectionDataModule(cfg)
    # A checkpoint replaces the weights: the backbone's ImageNet weights are not fetched first.
    model_cfg = cfg if ckpt_path is None and not init_from else without_backbone_download(cfg)
    module = DetectionModule(model_cfg, datamodule.category_ids, datamodule.class_names)
    if ckpt_path is not None:
        check_resume_classes(ckpt_path, datamodule.category_ids)
        check_resume_weights(ckpt_path, module)
        rank_zero_info(f"resuming from {ckpt_path}")
        if init_from:
            rank_zero_info(f"--init-from {init_from} ignored: the resumed checkpoint holds the weights")
    elif init_from:
        transfer = init_from_checkpoint(module.model, init_from, category_ids=datamodule.category_ids,
                                        class_names=datamodule.class_names)
        rank_zero_info(transfer.report())
        for line in (transfer.class_warning(), _backbone_not_initialised(cfg, transfer)):
            if line:
                rank_zero_warn(line)
    elif resume == "auto":
        rank_zero_info(f"no {checkpoint_dir(cfg) / LAST_CHECKPOINT} yet: starting a new run")
    _save_run_config(cfg)
    _remove_stale_temporaries(cfg)
    rank_zero_info(parameter_line(module.model))
    preserve = PreserveTrainingState(checkpoint_dir(cfg) / LAST_CHECKPOINT)
    # StepSeeds: dropout, denoising and any other draw of a training step come from (seed, epoch, batch).
    own: list[Callback] = [preserve, StepSeeds(cfg.trainer.seed)]
    if ckpt_path is not None:
        own.extend([RefuseInexactResume(), ConfiguredLearningRates()])
    trainer = build_trainer(cfg, callbacks=[*own, *callbacks], progress_bar=progress_bar)
    _fit_saving_on_signals(trainer, preserve, module, datamodule, ckpt_path)
    return trainer


def _fit_saving_on_signals(
    trainer: L.Trainer, preserve: PreserveTrainingState, module: L.LightningModule, datamodule, ckpt_path
) -> None:
    """`trainer.fit`, with SIGINT / SIGTERM stopping at the next batch with the state saved (raises
    `Interrupted`); Lightning's own SIGTERM stop (raised where our callback did not see it first)
    becomes `Interrupted` too."""
    with preserve.handle_signals():
        try:
            trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
        except SIGTERMException:
            preserve.received = preserve.received or "SIGTERM"
            preserve.raise_interrupted(saved=False)


def parameter_line(model: nn.Module) -> str:
    """One line in place of Lightning's model table: the parameters, and how many are trained."""
    total = sum(p.numel() for p in model.parameters())
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return f"model: {total / 1e6:.2f} M parameters, {trained / 1e6:.2f} M trained"


@rank_zero_only
def _remove_stale_temporaries(cfg: Config) -> None:
    for path in remove_stale_temporaries(checkpoint_dir(cfg)):
        rank_zero_info(f"removed {path}, a partial checkpoint of a process that no longer runs")


@rank_zero_only
def _save_run_config(cfg: Config) -> None:
    path = save_config(cfg, Path(cfg.trainer.output_dir) / "config.yaml")
    rank_zero_info(f"config written to {path}")

