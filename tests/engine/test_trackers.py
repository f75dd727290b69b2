"""Experiment trackers (`trainer.loggers`): MLflow to a local store and W&B offline receive the resolved
config, the metrics, the final metrics and the best checkpoint of a tiny run; missing extras and wrong
names are one-line errors. Offline: no network, no credentials."""

import importlib.util

import pytest
import torch
import yaml
from lightning.pytorch.loggers import WandbLogger

from detr_lab.config import ConfigError, load_config
from detr_lab.engine import trackers
from detr_lab.engine.trainer import train
from detr_lab.errors import MissingExtraError

from factories import TINY_RUN_YAML, load_tool

HAS_MLFLOW = importlib.util.find_spec("mlflow") is not None
HAS_WANDB = importlib.util.find_spec("wandb") is not None
if HAS_MLFLOW:
    from mlflow.tracking import MlflowClient
if HAS_WANDB:
    import wandb


@pytest.fixture
def offline_wandb(tmp_path, monkeypatch):
    """No W&B credentials anywhere this test can see; W&B's own files under tmp_path."""
    for name in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_BASE_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "wandb-cache"))
    monkeypatch.setenv("WANDB_SILENT", "true")


@pytest.mark.slow  # a tiny Lightning run (2 steps) with all four trackers
@pytest.mark.skipif(not (HAS_MLFLOW and HAS_WANDB), reason="the mlflow and wandb extras are not installed")
def test_every_tracker_gets_config_metrics_and_best_checkpoint(tmp_path, offline_wandb):
    config = tmp_path / "tiny.yaml"
    config.write_text(TINY_RUN_YAML.format(root=tmp_path))
    cfg = load_config(config, ["trainer.max_steps=2", "trainer.max_epochs=1", "trainer.summary=false",
                               "trainer.loggers=[csv,tensorboard,mlflow,wandb]",
                               "trainer.tracking.run_name=tiny"])
    torch.manual_seed(0)
    trainer = train(cfg, progress_bar=False)
    (wandb_logger,) = [logger for logger in trainer.loggers if isinstance(logger, WandbLogger)]
    wandb_run = wandb_logger.experiment
    try:
        wandb_offline = wandb_run.offline
        wandb_config, wandb_summary = dict(wandb_run.config), dict(wandb_run.summary)
    finally:
        wandb.finish()
    run_dir = tmp_path / "run"
    best = trainer.checkpoint_callback.best_model_path
    assert best.endswith(".ckpt") and (run_dir / "checkpoints").samefile(best.rsplit("/", 1)[0])
    ap = float(trainer.callback_metrics["val/AP"])

    # MLflow: a local SQLite store in the run folder
    client = MlflowClient(f"sqlite:///{run_dir / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("detr_lab")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.run_name == "tiny" and run.info.status == "FINISHED"
    assert run.data.params["model.hidden_dim"] == "32" and run.data.params["trainer.max_steps"] == "2"
    assert run.data.metrics["final/AP"] == pytest.approx(ap) and "final/AP50" in run.data.metrics
    assert "train/loss_step" in run.data.metrics and "val/AP" in run.data.metrics
    assert run.data.tags["best_checkpoint"] == best
    artifacts = [item.path for item in client.list_artifacts(run.info.run_id)]
    assert artifacts == ["config.yaml"]

    # W&B: an offline run (nothing sent) under the run folder
    assert wandb_offline and len(list((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))) == 1
    assert wandb_summary["best_checkpoint"] == best and wandb_summary["final/AP"] == pytest.approx(ap)
    assert wandb_config["model.hidden_dim"] == 32 and wandb_config["trainer.tracking.run_name"] == "tiny"

    # CSV and TensorBoard
    (hparams,) = (run_dir / "csv").glob("version_*/hparams.yaml")
    stored = yaml.safe_load(hparams.read_text())
    assert stored["best_checkpoint"] == best and stored["model.num_queries"] == 5
    (metrics,) = (run_dir / "csv").glob("version_*/metrics.csv")
    assert "final/AP" in metrics.read_text().splitlines()[0]
    assert list((run_dir / "tensorboard").glob("version_*/events.out.tfevents.*"))


def test_a_missing_extra_is_named(tmp_path, monkeypatch):
    monkeypatch.setitem(trackers.OPTIONAL, "mlflow", ("detr_lab_no_such_module", "mlflow"))
    cfg = load_config(overrides=[f"trainer.output_dir={tmp_path}", "trainer.loggers=[csv,mlflow]"])
    with pytest.raises(MissingExtraError) as error:
        trackers.build_loggers(cfg)
    assert str(error.value) == (
        "trainer.loggers lists mlflow, but 'detr_lab_no_such_module' is not installed; "
        "install the mlflow extra: pip install -e \".[mlflow]\"")
    assert not list(tmp_path.iterdir())  # nothing built before the check


def test_train_tool_stops_at_once_on_a_missing_extra(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(trackers.OPTIONAL, "wandb", ("detr_lab_no_such_module", "wandb"))
    config = tmp_path / "tiny.yaml"
    config.write_text(TINY_RUN_YAML.format(root=tmp_path))
    code = load_tool("train").main(["--config", str(config), "--set", "trainer.loggers=[csv,wandb]"])
    assert code == 1
    assert capsys.readouterr().err == (
        "train.py: error: trainer.loggers lists wandb, but 'detr_lab_no_such_module' is not installed; "
        "install the wandb extra: pip install -e \".[wandb]\"\n")
    assert not (tmp_path / "run").exists() and not (tmp_path / "data").exists()  # nothing done


def test_unknown_tracker_is_a_config_error():
    with pytest.raises(ConfigError, match=r"'trainer.loggers' contains 'mlfow'; .* did you mean 'mlflow'\?"):
        load_config(overrides=["trainer.loggers=[csv,mlfow]"])


def test_default_mlflow_store_is_local_sqlite(tmp_path):
    cfg = load_config(overrides=[f"trainer.output_dir={tmp_path}/run"])
    assert trackers.mlflow_uri(cfg) == f"sqlite:///{tmp_path}/run/mlflow.db"
    remote = load_config(overrides=["trainer.tracking.mlflow_uri=http://localhost:5000"])
    assert trackers.mlflow_uri(remote) == "http://localhost:5000"


def test_wandb_credentials(tmp_path):
    netrc = tmp_path / "netrc"
    home = {"HOME": str(tmp_path), "NETRC": str(netrc)}
    assert not trackers.wandb_logged_in(home)  # no file
    netrc.write_text("machine example.com login user password secret\n")
    assert not trackers.wandb_logged_in(home)
    netrc.write_text("machine api.wandb.ai login user password 0123456789\n")
    assert trackers.wandb_logged_in(home)
    assert not trackers.wandb_logged_in({**home, "WANDB_BASE_URL": "https://wandb.example.org:8080"})
    assert trackers.wandb_logged_in({"NETRC": str(tmp_path / "none"), "WANDB_API_KEY": "abc"})
