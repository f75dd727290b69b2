"""A resumed run draws and trains exactly what the uninterrupted run would.

Resume points: the epoch-end checkpoint (after validation), the checkpoint after an epoch's last
batch (before validation) and one mid-epoch; with max_steps set (Lightning #19617: the next epoch
used to yield nothing) and without (the resumed epoch used to replay epoch 0's order); augmentation
on (random crops, scales, flips), whose stream used to restart from the initial seed; with the default
orientation-grouped training batches (`data.train_batching: aspect_ratio`) and with `padded` ones.
Compared: the image ids, padded batch shape and pixel sum of every step, and the final weights bit for
bit.
"""

import shutil
import warnings
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import Callback

from detr_lab.config import load_config
from detr_lab.engine.trainer import train

from factories import TINY_RUN_YAML

pytestmark = pytest.mark.slow  # Lightning end to end: uninterrupted and resumed runs compared

EPOCH_END, LAST_BATCH, MID_EPOCH = "epoch_end", "last_batch", "mid_epoch"


class Batches(Callback):
    """Per global step: image ids, padded batch shape and pixel sum (so augmentation is compared too)."""

    def __init__(self):
        self.by_step = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        images, _, targets = batch
        ids = [int(t["image_id"]) for t in targets]
        self.by_step[trainer.global_step] = (ids, tuple(images.shape), float(images.double().sum()))


class Snapshots(Callback):
    """Copies of the run's state at the three resume points (4 steps per epoch)."""

    def __init__(self, directory: Path):
        self.directory = directory

    @staticmethod
    def last(trainer) -> Path:
        return Path(trainer.default_root_dir) / "checkpoints" / "last.ckpt"

    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch == 1:  # last.ckpt now holds the epoch-end state, after validation
            shutil.copy(self.last(trainer), self.directory / EPOCH_END)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == 4:  # written by PreserveTrainingState before validation
            shutil.copy(self.last(trainer), self.directory / LAST_BATCH)
        if trainer.global_step == 6:
            trainer.save_checkpoint(self.directory / MID_EPOCH)


def overrides(max_steps: int, workers: int, batching: str = "aspect_ratio") -> list[str]:
    return [f"data.train_batching={batching}", f"data.num_workers={workers}", "data.synthetic.num_train=8",
            "trainer.max_epochs=3",
            f"trainer.max_steps={max_steps}", "trainer.save_every_n_steps=0", "data.augment.crop_prob=0.5",
            "data.augment.train_scales=[48,64]", "data.augment.crop_resize_scales=[50,60]",
            "data.augment.crop_min_size=30", "data.augment.crop_max_size=50", "data.augment.hflip_prob=0.5"]


_WHOLE: dict = {}


def whole_run(root: Path, max_steps: int, workers: int, batching: str = "aspect_ratio"):
    key = (max_steps, workers, batching)
    if key not in _WHOLE:
        config_path = root / "tiny.yaml"
        config_path.write_text(TINY_RUN_YAML.format(root=root))
        snapshots = root / "snapshots"
        snapshots.mkdir()
        batches = Batches()
        output_dir = f"trainer.output_dir={root / 'whole'}"
        cfg = load_config(config_path, [*overrides(max_steps, workers, batching), output_dir])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer = train(cfg, callbacks=[batches, Snapshots(snapshots)], progress_bar=False)
        weights = {k: v.clone() for k, v in trainer.lightning_module.state_dict().items()}
        _WHOLE[key] = (config_path, snapshots, batches.by_step, weights)
    return _WHOLE[key]


def check_resume(tmp_path_factory, max_steps: int, workers: int, point: str, batching: str = "aspect_ratio"
                 ) -> None:
    new = (max_steps, workers, batching) not in _WHOLE
    root = tmp_path_factory.mktemp(f"whole_{max_steps}_{workers}_{batching}") if new else None
    config_path, snapshots, whole_batches, whole_weights = whole_run(root, max_steps, workers, batching)
    assert sorted(whole_batches) == list(range(12))
    run = tmp_path_factory.mktemp(f"resumed_{point}")
    (run / "checkpoints").mkdir()
    shutil.copy(snapshots / point, run / "checkpoints" / "last.ckpt")
    batches = Batches()
    cfg = load_config(config_path, [*overrides(max_steps, workers, batching), f"trainer.output_dir={run}"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = train(cfg, resume="auto", callbacks=[batches], progress_bar=False)
    first = {EPOCH_END: 4, LAST_BATCH: 4, MID_EPOCH: 6}[point]
    assert trainer.global_step == 12
    assert sorted(batches.by_step) == list(range(first, 12))
    for step, seen in batches.by_step.items():
        assert seen == whole_batches[step], f"step {step}"
    weights = trainer.lightning_module.state_dict()
    for name, value in whole_weights.items():
        assert torch.equal(weights[name], value), name


@pytest.mark.parametrize("max_steps", [12, -1], ids=["max_steps", "no_max_steps"])
@pytest.mark.parametrize("point", [EPOCH_END, LAST_BATCH, MID_EPOCH])
def test_resume_matches_the_uninterrupted_run(tmp_path_factory, max_steps, point):
    check_resume(tmp_path_factory, max_steps, 0, point)


@pytest.mark.parametrize("point", [LAST_BATCH, MID_EPOCH])
def test_resume_with_padded_batches(tmp_path_factory, point):
    check_resume(tmp_path_factory, 12, 0, point, batching="padded")


@pytest.mark.slow
@pytest.mark.parametrize("point", [EPOCH_END, MID_EPOCH])
def test_resume_matches_the_uninterrupted_run_with_two_workers(tmp_path_factory, point):
    check_resume(tmp_path_factory, 12, 2, point)


def test_run_stopped_by_max_steps_mid_epoch_resumes_that_epoch(tmp_path_factory):
    # Lightning saves the cut epoch as processed; resumed with a larger max_steps, the remainder used
    # to be numbered as the next epoch (so every later epoch drew the wrong order).
    config_path, _, whole_batches, whole_weights = whole_run(
        tmp_path_factory.mktemp("whole_12_0") if (12, 0) not in _WHOLE else None, 12, 0)
    run = tmp_path_factory.mktemp("cut_by_max_steps")
    batches = Batches()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        train(load_config(config_path, [*overrides(6, 0), f"trainer.output_dir={run}"]), progress_bar=False)
        cfg = load_config(config_path, [*overrides(12, 0), f"trainer.output_dir={run}"])
        trainer = train(cfg, resume="auto", callbacks=[batches], progress_bar=False)
    assert sorted(batches.by_step) == list(range(6, 12))
    for step, seen in batches.by_step.items():
        assert seen == whole_batches[step], f"step {step}"
    weights = trainer.lightning_module.state_dict()
    assert all(torch.equal(weights[name], value) for name, value in whole_weights.items())
