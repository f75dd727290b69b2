"""train.py's one-line errors for files it cannot read or write: the file and the reason.

`--resume` with a refused payload (it names a forbidden global) or a corrupt one (random bytes):
neither message may suggest `weights_only=False` (that would run the file's pickled code). A full
disk while a checkpoint is written is simulated by an `os.fsync` that fails with ENOSPC for
checkpoint files (the tests run as root on one filesystem: no tiny tmpfs to fill).
"""

from __future__ import annotations

import errno
import os

import pytest
import torch

from factories import load_tool, synthetic_data_yaml, tiny_model_yaml

TINY_YAML = tiny_model_yaml(
    num_classes=6, num_heads=2, num_queries=4, backbone__frozen_stages=0, decoder__num_layers=1
) + synthetic_data_yaml(2, 2) + """
trainer:
  output_dir: {root}/run
  accelerator: cpu
  devices: "1"
  max_steps: 1
"""


class Payload:
    pass


def _train_tool():
    return load_tool("train")


@pytest.mark.parametrize("kind", ["refused", "corrupt"])
def test_resume_error_names_checkpoint_and_cause(tmp_path, capsys, kind):
    config = tmp_path / "tiny.yaml"
    config.write_text(TINY_YAML.format(root=tmp_path))
    checkpoint = tmp_path / f"{kind}.ckpt"
    if kind == "refused":
        torch.save({"state_dict": {}, "extra": Payload()}, checkpoint)
        expected = f"{checkpoint}: refused: loading it would run pickled code (unsafe global {__name__}."
    else:
        checkpoint.write_bytes(os.urandom(256))
        expected = f"{checkpoint}: not a readable PyTorch checkpoint"
    code = _train_tool().main(["--config", str(config), "--resume", str(checkpoint)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1
    assert err[-1].startswith(f"train.py: error: {expected}")
    assert "weights_only" not in "\n".join(err)


def test_disk_full_while_checkpointing_names_checkpoint_and_cause(tmp_path, capsys, monkeypatch):
    config = tmp_path / "tiny.yaml"
    config.write_text(TINY_YAML.format(root=tmp_path))
    tool = _train_tool()
    real_fsync = os.fsync

    def fsync(fd):
        if ".ckpt." in os.readlink(f"/proc/self/fd/{fd}"):  # the temporary file of a checkpoint
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    code = tool.main(["--config", str(config)])
    err = capsys.readouterr().err.strip().splitlines()
    checkpoints = tmp_path / "run" / "checkpoints"
    assert code == 1
    assert err[-1].startswith(f"train.py: error: FileWriteError: cannot write {checkpoints}/")
    assert ".ckpt: No space left on device" in err[-1] and "inline_container" not in err[-1]
    assert not [p for p in checkpoints.iterdir() if p.name.endswith(".tmp")]
