"""Trainer construction from the config, resume path resolution, atomic checkpoint files, CLI errors."""

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from detr_lab.checkpoints import split_model_overrides
from detr_lab.config import ConfigError, load_config
from detr_lab.engine.checkpoint_io import AtomicCheckpointIO
from detr_lab.engine.cli import one_line, run_tool
from detr_lab.engine.trainer import build_trainer, parse_devices, resolve_resume
from detr_lab.io import CheckpointError


def test_parse_devices():
    assert parse_devices("auto") == "auto"
    assert parse_devices("8") == 8
    assert parse_devices("0,1") == [0, 1]
    with pytest.raises(ConfigError, match="trainer.devices"):
        parse_devices("two")


def test_trainer_follows_the_config(tmp_path):
    cfg = load_config(overrides=[
        f"trainer.output_dir={tmp_path}", "trainer.accelerator=cpu", "trainer.devices=1",
        "trainer.max_epochs=7",
        "trainer.accumulate_grad_batches=3", "optim.clip_grad_norm=0.25", "trainer.save_every_n_steps=50",
    ])
    trainer = build_trainer(cfg, progress_bar=False)
    assert trainer.max_epochs == 7 and trainer.accumulate_grad_batches == 3
    assert trainer.gradient_clip_val == 0.25 and trainer.gradient_clip_algorithm == "norm"
    assert isinstance(trainer.strategy.checkpoint_io, AtomicCheckpointIO)
    checkpoints = [c for c in trainer.callbacks if isinstance(c, ModelCheckpoint)]
    assert {c.monitor for c in checkpoints} == {"val/AP", None}
    assert all(c.save_last and c.dirpath == str(tmp_path / "checkpoints") for c in checkpoints)
    assert [c._every_n_train_steps for c in checkpoints if c.monitor is None] == [50]
    assert {type(logger).__name__ for logger in trainer.loggers} == {"TensorBoardLogger", "CSVLogger"}
    no_clip = build_trainer(load_config(overrides=["optim.clip_grad_norm=0", "trainer.accelerator=cpu"]),
                            progress_bar=False, loggers=False)
    assert no_clip.gradient_clip_val is None


def test_resolve_resume(tmp_path):
    cfg = load_config(overrides=[f"trainer.output_dir={tmp_path}"])
    assert resolve_resume(cfg, None) is None
    assert resolve_resume(cfg, "auto") is None  # nothing to resume yet: a fresh start
    last = tmp_path / "checkpoints" / "last.ckpt"
    last.parent.mkdir()
    last.write_bytes(b"x")
    assert resolve_resume(cfg, "auto") == last
    with pytest.raises(FileNotFoundError, match="missing.ckpt"):
        resolve_resume(cfg, str(tmp_path / "missing.ckpt"))


class Opaque:
    pass


def test_atomic_checkpoint_io_round_trip_and_refuses_code(tmp_path):
    io = AtomicCheckpointIO()
    path = tmp_path / "sub" / "a.ckpt"
    io.save_checkpoint({"state_dict": {"w": torch.arange(3)}, "epoch": 2}, path)
    assert [p.name for p in path.parent.iterdir()] == ["a.ckpt"]  # no temporary file left
    assert torch.equal(io.load_checkpoint(path)["state_dict"]["w"], torch.arange(3))
    io.save_checkpoint({"object": Opaque()}, tmp_path / "b.ckpt")
    with pytest.raises(CheckpointError, match=r"b\.ckpt: refused: .*unsafe global .*Opaque") as refused:
        io.load_checkpoint(tmp_path / "b.ckpt", weights_only=False)  # forced to weights_only=True
    assert "weights_only" not in str(refused.value)


def test_cli_error_handling(capsys):
    def bad_config():
        raise ConfigError("x.yaml: unknown key 'optim.lrr'; did you mean 'lr'?")

    assert run_tool("tool", bad_config, debug=False) == 2
    assert capsys.readouterr().err == "tool: error: x.yaml: unknown key 'optim.lrr'; did you mean 'lr'?\n"

    def crash():
        raise RuntimeError("size mismatch\nline two")

    assert run_tool("tool", crash, debug=False) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "RuntimeError: size mismatch [...]" in err and "--debug" in err
    with pytest.raises(RuntimeError):
        run_tool("tool", crash, debug=True)
    assert one_line(ValueError("")) == "ValueError"
    assert split_model_overrides(["model.a=1", "data.b=2", "model.c.d=x"]) == (["model.a=1", "model.c.d=x"],
                                                                                ["data.b=2"])


def test_stale_partial_checkpoints_of_dead_processes_are_removed(tmp_path):
    import os
    import subprocess
    import sys

    from detr_lab.engine.checkpoint_io import remove_stale_temporaries

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f"last.ckpt.tmp-{dead.pid}"
    live = tmp_path / f"last.ckpt.tmp-{os.getpid()}"
    left = tmp_path / ".last.ckpt.k3j9x1.tmp"  # atomic_write's name, nobody writing it
    writing = tmp_path / ".last.ckpt.a8d2zq.tmp"  # held open, as during a write
    other = tmp_path / "last.ckpt"
    for path in (stale, live, left, writing, other):
        path.write_bytes(b"partial")
    with open(writing, "ab"):
        assert remove_stale_temporaries(tmp_path) == sorted([stale, left])
    assert not stale.exists() and not left.exists()
    assert live.exists() and writing.exists() and other.exists()
    assert remove_stale_temporaries(tmp_path / "missing") == []
