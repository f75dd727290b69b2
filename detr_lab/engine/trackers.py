"""Experiment trackers: Lightning's own loggers, chosen by `trainer.loggers`, and what a run reports to them.

    trainer:
      loggers: [csv, tensorboard, mlflow, wandb]
      tracking: {experiment: detr_lab, run_name: "", mlflow_uri: "", wandb_mode: auto}

csv          `<output_dir>/csv/version_N/metrics.csv` (+ hparams.yaml)          CSVLogger
tensorboard  `<output_dir>/tensorboard/version_N/`                              TensorBoardLogger
mlflow       a local SQLite store `<output_dir>/mlflow.db` unless `tracking.mlflow_uri` names another
             (artifacts under `<output_dir>/mlflow-artifacts/`)                   MLFlowLogger
wandb        offline under `<output_dir>/wandb/` unless logged in (`wandb_mode: auto`); `wandb sync`
             uploads an offline run later                                         WandbLogger

Each one receives the metrics Lightning logs, and from `TrackerReport`: the resolved config (flattened
dotted keys, as hyperparameters / params / run config) when fit starts; the final metrics
(`final/AP`, `final/AP50`, ... of the last validation, the run summary's AP when it evaluated the last
weights itself) and the best checkpoint's path when fit ends (MLflow: a tag and `config.yaml` as an
artifact; W&B: the run summary; TensorBoard: a text entry; CSV: hparams.yaml).

mlflow and wandb are optional extras, found with `importlib.util.find_spec` (not imported here: the
Lightning loggers import them when built); a missing one is a `MissingExtraError` naming the extra.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
import netrc
import os
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger, Logger, MLFlowLogger, TensorBoardLogger, WandbLogger
from lightning.pytorch.utilities import rank_zero_only

from detr_lab.config import Config
from detr_lab.engine.summary import RunSummary
from detr_lab.errors import MissingExtraError

__all__ = [
    "TrackerReport", "build_loggers", "flat_config", "mlflow_uri", "require_tracker", "wandb_logged_in",
]

# tracker -> (python module, extra)
OPTIONAL = {"mlflow": ("mlflow", "mlflow"), "wandb": ("wandb", "wandb")}
WANDB_HOST = "api.wandb.ai"


def require_tracker(name: str) -> None:
    """Raise `MissingExtraError` (naming the extra) when tracker `name`'s package is not installed."""
    if name in OPTIONAL:
        module, extra = OPTIONAL[name]
        if importlib.util.find_spec(module) is None:
            raise MissingExtraError(
                f"trainer.loggers lists {name}, but '{module}' is not installed; install the {extra} extra: "
                f'pip install -e ".[{extra}]"'
            )


def mlflow_uri(cfg: Config) -> str:
    """`trainer.tracking.mlflow_uri`, or the local SQLite store `sqlite:///<output_dir>/mlflow.db`."""
    if cfg.trainer.tracking.mlflow_uri:
        return cfg.trainer.tracking.mlflow_uri
    return f"sqlite:///{(Path(cfg.trainer.output_dir) / 'mlflow.db').resolve()}"


def wandb_logged_in(environ: dict[str, str] | None = None) -> bool:
    """Whether W&B has credentials: `WANDB_API_KEY`, or an entry for its host (`WANDB_BASE_URL`'s, by
    default api.wandb.ai) in the netrc file `wandb login` writes (`NETRC`, else ~/.netrc)."""
    environ = os.environ if environ is None else environ
    if environ.get("WANDB_API_KEY"):
        return True
    host = environ.get("WANDB_BASE_URL", f"https://{WANDB_HOST}").split("://")[-1].split("/")[0].split(":")[0]
    path = Path(environ.get("NETRC") or Path(environ.get("HOME", str(Path.home()))) / ".netrc")
    try:
        return netrc.netrc(str(path)).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def _run_name(cfg: Config) -> str:
    return cfg.trainer.tracking.run_name or Path(cfg.trainer.output_dir).resolve().name


def build_loggers(cfg: Config) -> list[Logger]:
    """Lightning loggers for `cfg.trainer.loggers`, in that order, writing under `trainer.output_dir`.

    Raises:
        MissingExtraError: mlflow or wandb listed and not installed (the message names the extra).
    """
    t = cfg.trainer
    output_dir = Path(t.output_dir)
    for name in t.loggers:
        require_tracker(name)
    loggers: list[Logger] = []
    for name in t.loggers:
        if name == "csv":
            loggers.append(CSVLogger(save_dir=output_dir, name="csv"))
        elif name == "tensorboard":
            loggers.append(TensorBoardLogger(save_dir=output_dir, name="tensorboard",
                                             default_hp_metric=False))
        elif name == "mlflow":
            for noisy in ("alembic", "mlflow.store.db.utils"):  # schema migrations at INFO on first use
                logging.getLogger(noisy).setLevel(logging.WARNING)
            loggers.append(MLFlowLogger(
                experiment_name=t.tracking.experiment,
                run_name=_run_name(cfg),
                tracking_uri=mlflow_uri(cfg),
                artifact_location=str((output_dir / "mlflow-artifacts").resolve()),
            ))
        elif name == "wandb":
            mode = t.tracking.wandb_mode
            offline = mode == "offline" or (mode == "auto" and not wandb_logged_in())
            loggers.append(WandbLogger(project=t.tracking.experiment, name=_run_name(cfg),
                                       save_dir=output_dir, offline=offline))
    return loggers


def flat_config(cfg: Config) -> dict[str, Any]:
    """The config as dotted keys -> values (lists and None as text), what trackers store as params."""

    def walk(value: Any, prefix: str) -> dict[str, Any]:
        if dataclasses.is_dataclass(value):
            out: dict[str, Any] = {}
            for f in dataclasses.fields(value):
                out.update(walk(getattr(value, f.name), f"{prefix}{f.name}."))
            return out
        if isinstance(value, dict):
            out = {}
            for key, item in value.items():
                out.update(walk(item, f"{prefix}{key}."))
            return out or {prefix.rstrip("."): "{}"}
        if value is None or isinstance(value, list | tuple):
            return {prefix.rstrip("."): str(value)}
        return {prefix.rstrip("."): value}

    return walk(cfg, "")


class TrackerReport(Callback):
    """Logs the resolved config when fit starts, the final metrics and the best checkpoint when it ends,
    to every logger of the trainer (rank 0 only). Place it after `RunSummary`, whose final AP it uses."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.final_metrics: dict[str, float] = {}
        self.best_checkpoint = ""

    @rank_zero_only
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        params = flat_config(self.cfg)
        for logger in trainer.loggers:
            logger.log_hyperparams(params)
        config_file = Path(self.cfg.trainer.output_dir) / "config.yaml"
        for logger in trainer.loggers:
            if isinstance(logger, MLFlowLogger) and config_file.is_file():
                logger.experiment.log_artifact(logger.run_id, str(config_file))

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.interrupted or not trainer.is_global_zero:
            return
        metrics = {f"final/{key[len('val/'):]}": float(value)
                   for key, value in trainer.callback_metrics.items() if key.startswith("val/")}
        summary = next((c for c in trainer.callbacks if isinstance(c, RunSummary)), None)
        if summary is not None and summary.result is not None and summary.history:
            metrics["final/AP"] = float(summary.history[-1]["AP"])
            metrics["final/AP50"] = float(summary.history[-1]["AP50"])
        checkpoint = trainer.checkpoint_callback
        self.best_checkpoint = str(getattr(checkpoint, "best_model_path", "") or "")
        self.final_metrics = metrics
        for logger in trainer.loggers:
            if metrics:
                logger.log_metrics(metrics, step=trainer.global_step)
            self._log_best_checkpoint(logger, trainer.global_step)

    def _log_best_checkpoint(self, logger: Logger, step: int) -> None:
        path = self.best_checkpoint
        if isinstance(logger, MLFlowLogger):
            logger.experiment.set_tag(logger.run_id, "best_checkpoint", path)
        elif isinstance(logger, WandbLogger):
            logger.experiment.summary["best_checkpoint"] = path
        elif isinstance(logger, TensorBoardLogger):
            logger.experiment.add_text("best_checkpoint", path or "none written", step)
        else:
            logger.log_hyperparams({"best_checkpoint": path})
