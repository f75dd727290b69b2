"""Training keeps its work: a checkpoint before validation, and on SIGINT / SIGTERM (exit 130, resumable).

Tiny synthetic runs (resnet18, hidden 32, 64-pixel images); the signal tests run tools/train.py in a
real subprocess.
"""

import io
import os
import re
import signal
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import pytest
import torch
from PIL import Image

from detr_lab.config import load_config
from detr_lab.data.errors import DatasetError
from detr_lab.data.synthetic import ensure_synthetic_dataset
from detr_lab.engine.trainer import train

from factories import TINY_RUN_YAML

REPO = Path(__file__).resolve().parents[2]


def truncate_jpeg(path: Path) -> None:
    """Replace `path` by a noise JPEG of the same size cut in half: the header reads, the pixels do not."""
    with Image.open(path) as image:
        size = image.size
    noise = Image.fromarray(torch.randint(0, 255, (size[1], size[0], 3), dtype=torch.uint8).numpy())
    buffer = io.BytesIO()
    noise.save(buffer, format="JPEG", quality=95)
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])


def test_validation_failure_after_an_epoch_keeps_the_trained_epoch(tmp_path):
    config_path = tmp_path / "tiny.yaml"
    config_path.write_text(TINY_RUN_YAML.format(root=tmp_path))
    # 6 validation images in batches of 2: the sanity check reads the first two batches, not the third.
    cfg = load_config(config_path, ["data.synthetic.num_val=6", "trainer.save_every_n_steps=0",
                                    "trainer.max_steps=-1", "trainer.max_epochs=1"])
    ensure_synthetic_dataset(cfg.data)
    val_images = sorted((tmp_path / "data" / "val2017").iterdir())
    truncate_jpeg(val_images[-1])
    with warnings.catch_warnings(), pytest.raises(DatasetError, match=re.escape(val_images[-1].name)):
        warnings.simplefilter("ignore")
        train(cfg, progress_bar=False)
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    assert last.is_file(), "the trained epoch was lost"
    checkpoint = torch.load(last, weights_only=True)
    assert checkpoint["global_step"] == 2  # 4 training images, batch 2: the whole epoch


def _start_training(config_path: Path, *extra: str) -> tuple[subprocess.Popen, list[str], list[str]]:
    """tools/train.py in a subprocess; (process, stdout chunks, stderr chunks), read as they come."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, str(REPO / "tools" / "train.py"), "--config", str(config_path), *extra]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    out: list[str] = []
    err: list[str] = []

    def read(stream, chunks) -> None:  # the progress bar rewrites one line with \r: read bytes, not lines
        while block := os.read(stream.fileno(), 4096):
            chunks.append(block.decode(errors="replace"))

    for stream, chunks in ((proc.stdout, out), (proc.stderr, err)):
        threading.Thread(target=read, args=(stream, chunks), daemon=True).start()
    return proc, out, err


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_saves_state_exits_130_and_resume_auto_continues(tmp_path, signum):
    config_path = tmp_path / "tiny.yaml"
    config_path.write_text(TINY_RUN_YAML.format(root=tmp_path).replace("max_steps: 3", "max_steps: 100000")
                           .replace("save_every_n_steps: 1", "save_every_n_steps: 0")
                           .replace("max_epochs: 2", "max_epochs: 100000"))
    proc, out, err = _start_training(config_path)
    deadline = time.monotonic() + 240
    try:
        while not re.search(r"Epoch 0:[^\r\n]*?\b[1-9]\d*/\d+", "".join(out)):  # a first step is logged
            assert proc.poll() is None, "".join(err)
            assert time.monotonic() < deadline, "".join(err)
            time.sleep(0.2)
        proc.send_signal(signum)
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    time.sleep(0.5)
    stderr = "".join(err)
    assert proc.returncode == 130, stderr
    last_line = stderr.strip().splitlines()[-1]
    assert last_line.startswith(f"train.py: interrupted: {signum.name} received"), stderr
    assert "--resume auto" in last_line and "Traceback" not in stderr
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    saved_step = torch.load(last, weights_only=True)["global_step"]
    assert saved_step >= 1

    if signum == signal.SIGINT:  # resume continues from the interrupted step
        resume, _, err = _start_training(config_path, "--resume", "auto", "--set",
                                         f"trainer.max_steps={saved_step + 1}")
        resume.wait(timeout=240)
        assert resume.returncode == 0, "".join(err)
        assert "resuming from" in "".join(err)
        assert torch.load(last, weights_only=True)["global_step"] == saved_step + 1
