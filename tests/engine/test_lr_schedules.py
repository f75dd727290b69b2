"""Step-wise LR schedules: RT-DETR's linear warm-up before the step decay, DEIM's flat-cosine.

The expected rates are written out by hand from the official formulas (RT-DETR's LinearWarmup factor
min(1, (s + 1) / N); DEIM's flat_cosine_schedule), not computed by the code under test. Also: the default
schedule stays the epoch-stepped MultiStepLR, bad values are named, and a run resumed mid-schedule sets
the same rate at every step as the uninterrupted run (and the same weights, bit for bit).
"""

import shutil
import warnings
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn

from detr_lab.config import ConfigError, OptimConfig, load_config
from detr_lab.engine.module import DetectionModule
from detr_lab.engine.optim import StepwiseLR, build_lr_scheduler, build_optimizer
from detr_lab.engine.trainer import train

from factories import TINY_RUN_YAML, tiny_config


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone = nn.Linear(3, 4)
        self.encoder = nn.ModuleDict({"sampling_offsets": nn.Linear(4, 4), "norm": nn.LayerNorm(4)})
        self.class_embed = nn.Linear(4, 3)


# Four groups with four rates: the flat-cosine and warm-up factors must scale each one.
GROUP_RATES = {"backbone": 2e-5, "default*sampling_offsets": 1e-4, "default*no_decay": 2e-4, "default": 2e-4}


def toy_optim(**schedule) -> OptimConfig:
    return OptimConfig(lr=2e-4, lr_backbone=2e-5, lr_multipliers={"sampling_offsets": 0.5},
                       no_decay_keys=["norm"], **schedule)


def rates_per_step(optim: OptimConfig, steps: int, steps_per_epoch: int, max_epochs: int) -> list[dict]:
    """The rate of every group at optimizer steps 0 .. steps-1 (the rate each step runs at)."""
    optimizer = build_optimizer(Toy(), optim)
    scheduler = build_lr_scheduler(optimizer, optim, steps_per_epoch=steps_per_epoch, max_epochs=max_epochs)
    seen = []
    for _ in range(steps):
        seen.append({group["name"]: group["lr"] for group in optimizer.param_groups})
        optimizer.step()
        scheduler.step()
    return seen


def assert_factors(seen: list[dict], factors: dict[int, float]) -> None:
    for step, factor in factors.items():
        for name, rate in GROUP_RATES.items():
            assert seen[step][name] == pytest.approx(rate * factor, rel=1e-9, abs=1e-15), (step, name)


def test_linear_warmup_then_step_decay():
    # N = 4 warm-up steps, 3 steps per epoch, drop x0.1 at epoch 2 (step 6).
    optim = toy_optim(warmup_steps=4, lr_drop_epochs=[2], lr_drop_factor=0.1)
    seen = rates_per_step(optim, 10, steps_per_epoch=3, max_epochs=4)
    # RT-DETR's LinearWarmup: step s runs at (s + 1) / N, the last warm-up step at the full rate.
    assert_factors(seen, {0: 0.25, 1: 0.5, 2: 0.75, 3: 1.0, 4: 1.0, 5: 1.0, 6: 0.1, 7: 0.1, 9: 0.1})
    assert seen[0]["default"] == pytest.approx(5e-5) and seen[6]["backbone"] == pytest.approx(2e-6)


def test_flat_cosine_with_several_groups():
    # 4 steps per epoch, 6 epochs: T = 24; warm-up W = 4 steps; flat to F = 2 * 4 = 8; tail A = 1 * 4 = 4
    # (from step 20 on); r = 0.5. Cosine phase: r + (1 - r) * (1 + cos(pi * (s - 8) / 12)) / 2.
    optim = toy_optim(schedule="flat_cosine", warmup_steps=4, flat_epochs=2, no_aug_epochs=1,
                      min_lr_ratio=0.5)
    seen = rates_per_step(optim, 24, steps_per_epoch=4, max_epochs=6)
    assert_factors(seen, {
        0: 0.0,  # (0 / 4) ** 2
        1: 0.0625,  # (1 / 4) ** 2
        2: 0.25,  # (2 / 4) ** 2
        4: 1.0,  # (4 / 4) ** 2, the warm-up's last step
        5: 1.0, 8: 1.0,  # flat up to and including step F
        11: 0.9267766952966369,  # 0.5 + 0.25 * (1 + cos(pi / 4))
        14: 0.75,  # 0.5 + 0.25 * (1 + cos(pi / 2))
        17: 0.5732233047033631,  # 0.5 + 0.25 * (1 + cos(3 pi / 4))
        19: 0.5085185434,  # 0.5 + 0.25 * (1 + cos(11 pi / 12)), cos = -0.9659258263
        20: 0.5, 23: 0.5,  # the no-augmentation tail: r
    })
    assert seen[14]["backbone"] == pytest.approx(1.5e-5)
    assert seen[14]["default*sampling_offsets"] == pytest.approx(7.5e-5)


def test_flat_phase_past_the_run_means_no_decay():
    # D-FINE trained under DEIM's scheduler with flat_epoch 4000000: warm-up, then the full rate to the end.
    optim = toy_optim(schedule="flat_cosine", warmup_steps=2, flat_epochs=1000, no_aug_epochs=1,
                      min_lr_ratio=0.5)
    seen = rates_per_step(optim, 8, steps_per_epoch=2, max_epochs=4)
    assert_factors(seen, {0: 0.0, 1: 0.25, 2: 1.0, 6: 1.0, 7: 1.0})


def test_default_schedule_is_the_epoch_multistep():
    cfg = tiny_config("optim.lr_drop_epochs=[3]")
    assert (cfg.optim.schedule, cfg.optim.warmup_steps) == ("multistep", 0)
    config = DetectionModule(cfg, [1, 2, 3], ["a", "b", "c"]).configure_optimizers()
    scheduler = config["lr_scheduler"]["scheduler"]
    assert type(scheduler) is torch.optim.lr_scheduler.MultiStepLR
    assert config["lr_scheduler"]["interval"] == "epoch"
    assert list(scheduler.milestones) == [3] and scheduler.gamma == pytest.approx(0.1)
    for extra in (["optim.warmup_steps=10"], ["optim.schedule=flat_cosine"]):
        config = DetectionModule(tiny_config(*extra), [1, 2, 3], ["a", "b", "c"]).configure_optimizers()
        assert isinstance(config["lr_scheduler"]["scheduler"], StepwiseLR)
        assert config["lr_scheduler"]["interval"] == "step"


@pytest.mark.parametrize("override, named", [
    ("optim.schedule=flat_cosin", r"'optim.schedule' is 'flat_cosin'.*did you mean 'flat_cosine'"),
    ("optim.warmup_steps=-1", r"'optim.warmup_steps' is -1; it must be >= 0"),
    ("optim.min_lr_ratio=1.5", r"'optim.min_lr_ratio' is 1.5; it must be <= 1"),
    ("optim.flat_epochs=-2", r"'optim.flat_epochs' is -2; it must be >= 0"),
    ("optim.flat_epochs=29", r"'optim.flat_epochs' applies to 'optim.schedule: flat_cosine' only"),
    ("optim.min_lr_ratio=0.2", r"'optim.min_lr_ratio' applies to 'optim.schedule: flat_cosine' only"),
])
def test_bad_values_are_named(override, named):
    with pytest.raises(ConfigError, match=named):
        load_config(overrides=[override])


def test_tail_longer_than_the_run_is_named():
    with pytest.raises(ConfigError, match=r"'optim.no_aug_epochs' \(9\) exceeds 'trainer.max_epochs' \(8\)"):
        load_config(overrides=["optim.schedule=flat_cosine", "optim.no_aug_epochs=9", "trainer.max_epochs=8"])


# ------------------------------------------------------------------------------ training and resume
class Rates(Callback):
    """Per global step: the rate of every parameter group that step runs at."""

    def __init__(self):
        self.by_step = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        groups = trainer.optimizers[0].param_groups
        self.by_step[trainer.global_step] = {group["name"]: group["lr"] for group in groups}


class SnapshotAt(Callback):
    def __init__(self, step: int, path: Path):
        self.step, self.path = step, path

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            trainer.save_checkpoint(self.path)


# The tiny run with 8 training images: 4 steps per epoch, 3 epochs, T = 12; a trained backbone, a
# multiplied group and no-decay groups. Flat-cosine: W = 3, F = 4, tail from step 8, r = 0.25; warm-up
# with step decay: N = 8, drop x0.1 at epoch 2 (step 8). Resumed at step 6: in the cosine phase, and
# inside the warm-up.
# No validation (not needed here, and the cheapest).
SHORT_RUN = ["data.synthetic.num_train=8", "trainer.max_steps=-1", "trainer.save_every_n_steps=0",
             "trainer.check_val_every_n_epoch=5", "trainer.summary=false"]
RUN = [*SHORT_RUN, "trainer.max_epochs=3", "optim.lr_backbone=2e-5", "optim.lr_multipliers.query_embed=0.5",
       "optim.no_decay_keys=[norm]"]
FLAT_COSINE = ["optim.schedule=flat_cosine", "optim.warmup_steps=3", "optim.flat_epochs=1",
               "optim.no_aug_epochs=1", "optim.min_lr_ratio=0.25"]
WARMUP = ["optim.warmup_steps=8", "optim.lr_drop_epochs=[2]", "optim.lr_drop_factor=0.1"]
FACTORS = {
    "flat_cosine": [0.0, 1 / 9, 4 / 9, 1.0, 1.0,  # (s / 3) ** 2, then flat to step 4
                    0.8901650429449553,  # 0.25 + 0.375 * (1 + cos(pi / 4))
                    0.625,  # 0.25 + 0.375 * (1 + cos(pi / 2))
                    0.3598349570550447,  # 0.25 + 0.375 * (1 + cos(3 pi / 4))
                    0.25, 0.25, 0.25, 0.25],
    "warmup": [1 / 8, 2 / 8, 3 / 8, 4 / 8, 5 / 8, 6 / 8, 7 / 8, 1.0, 0.1, 0.1, 0.1, 0.1],  # (s + 1) / 8
}
SCHEDULES = {"flat_cosine": FLAT_COSINE, "warmup": WARMUP}
BASE = {"default": 1e-4, "default*query_embed": 5e-5, "default*no_decay": 1e-4, "backbone": 2e-5}


def quiet_train(cfg, **options):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return train(cfg, progress_bar=False, **options)


_WHOLE: dict = {}


def whole_run(tmp_path_factory, schedule: str):
    """The uninterrupted run (cached per schedule): its config file, the step-6 checkpoint, the rates
    per step and the final weights."""
    if schedule not in _WHOLE:
        root = tmp_path_factory.mktemp(f"whole_{schedule}")
        config_path = root / "tiny.yaml"
        config_path.write_text(TINY_RUN_YAML.format(root=root))
        rates = Rates()
        cfg = load_config(config_path, [*RUN, *SCHEDULES[schedule], f"trainer.output_dir={root / 'whole'}"])
        trainer = quiet_train(cfg, callbacks=[rates, SnapshotAt(6, root / "step6.ckpt")])
        weights = {k: v.clone() for k, v in trainer.lightning_module.state_dict().items()}
        _WHOLE[schedule] = (config_path, root / "step6.ckpt", rates.by_step, weights)
    return _WHOLE[schedule]


def resumed_run(tmp_path_factory, schedule: str, *extra: str, callbacks=()):
    config_path, snapshot, _, _ = whole_run(tmp_path_factory, schedule)
    run = tmp_path_factory.mktemp(f"resumed_{schedule}")
    (run / "checkpoints").mkdir()
    shutil.copy(snapshot, run / "checkpoints" / "last.ckpt")
    cfg = load_config(config_path, [*RUN, *SCHEDULES[schedule], f"trainer.output_dir={run}", *extra])
    return quiet_train(cfg, resume="auto", callbacks=list(callbacks))


@pytest.mark.slow
@pytest.mark.parametrize("schedule", ["flat_cosine", "warmup"])
def test_training_follows_the_schedule_and_resume_continues_it(tmp_path_factory, schedule):
    _, _, whole_rates, whole_weights = whole_run(tmp_path_factory, schedule)
    assert sorted(whole_rates) == list(range(12))
    for step, factor in enumerate(FACTORS[schedule]):
        assert set(whole_rates[step]) >= set(BASE), step
        for name, base in BASE.items():
            assert whole_rates[step][name] == pytest.approx(base * factor, rel=1e-9, abs=1e-15), (step, name)
    rates = Rates()
    trainer = resumed_run(tmp_path_factory, schedule, callbacks=[rates])
    assert trainer.global_step == 12 and sorted(rates.by_step) == list(range(6, 12))
    for step, seen in rates.by_step.items():
        assert seen == whole_rates[step], step  # the same floats
    weights = trainer.lightning_module.state_dict()
    for name, value in whole_weights.items():
        assert torch.equal(weights[name], value), name


@pytest.mark.slow
def test_resume_applies_changed_flat_cosine_values_at_its_step(tmp_path_factory):
    # Resumed at step 6 with r = 0.5 instead of 0.25: step 6 runs at 0.5 + 0.25 * (1 + cos(pi / 2)).
    rates = Rates()
    resumed_run(tmp_path_factory, "flat_cosine", "optim.min_lr_ratio=0.5", "trainer.max_steps=8",
                callbacks=[rates])
    assert rates.by_step[6]["default"] == pytest.approx(1e-4 * 0.75)
    assert rates.by_step[7]["backbone"] == pytest.approx(2e-5 * 0.5732233047033631)  # cos(3 pi / 4)


@pytest.mark.slow
@pytest.mark.parametrize("schedule, extra, named", [
    ("flat_cosine", ["optim.schedule=multistep", "optim.flat_epochs=0", "optim.no_aug_epochs=0",
                     "optim.min_lr_ratio=0.5"], "'optim.schedule: multistep'"),
    ("warmup", ["optim.warmup_steps=0"], "'optim.warmup_steps: 0'"),
])
def test_resume_refuses_another_kind_of_schedule(tmp_path_factory, schedule, extra, named):
    with pytest.raises(ConfigError, match=f"cannot resume with {named}"):
        resumed_run(tmp_path_factory, schedule, *extra)


@pytest.mark.slow
def test_optimizer_steps_per_epoch_count_gradient_accumulation(tmp_path):
    # 4 batches per epoch, 2 accumulated per step: 2 optimizer steps per epoch, T = 4, F = 2. W = 1,
    # r = 0.2: factors 0, 1, 1 (flat), 0.2 + 0.4 * (1 + cos(pi / 2)) = 0.6. With 4 steps per epoch, step
    # 3 would still be flat.
    config_path = tmp_path / "tiny.yaml"
    config_path.write_text(TINY_RUN_YAML.format(root=tmp_path))
    rates = Rates()
    cfg = load_config(config_path, [
        *SHORT_RUN, "trainer.max_epochs=2", "trainer.accumulate_grad_batches=2", "optim.schedule=flat_cosine",
        "optim.warmup_steps=1", "optim.flat_epochs=1", "optim.min_lr_ratio=0.2"])
    quiet_train(cfg, callbacks=[rates])
    assert sorted(rates.by_step) == [0, 1, 2, 3]
    assert [rates.by_step[s]["default"] for s in range(4)] == pytest.approx([0.0, 1e-4, 1e-4, 6e-5])
