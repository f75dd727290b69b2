"""LR drops and warm-ups given as fractions of the run (`optim.lr_drop_at`, `warmup_fraction`,
`flat_fraction`, `no_aug_fraction`): of its steps (max_epochs x steps per epoch, or max_steps) or of its
time budget, whichever is further along. Expected factors are written out by hand.
"""

import math
import time
import warnings
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace

import pytest
from lightning.pytorch.callbacks import Callback, Timer
from torch import nn

from detr_lab.config import ConfigError, OptimConfig, load_config, uses_relative_schedule
from detr_lab.engine.callbacks import TimedEvaluation
from detr_lab.engine.optim import (
    MULTISTEP_WARMUP,
    StepwiseLR,
    build_lr_scheduler,
    build_optimizer,
    schedule_kind,
    update_time_fraction,
)
from detr_lab.engine.trainer import train

from factories import TINY_RUN_YAML

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def scheduler_for(optim: OptimConfig, steps_per_epoch: int, max_epochs: int, max_steps: int = -1
                  ) -> StepwiseLR:
    optimizer = build_optimizer(nn.Linear(2, 2), optim)  # one group at optim.lr
    scheduler = build_lr_scheduler(optimizer, optim)
    assert isinstance(scheduler, StepwiseLR)
    scheduler.bind(steps_per_epoch, max_epochs, max_steps)
    return scheduler


def factors(optim: OptimConfig, steps: int, **bind) -> list[float]:
    scheduler = scheduler_for(optim, **bind)
    seen = []
    for _ in range(steps):
        seen.append(scheduler.optimizer.param_groups[0]["lr"] / optim.lr)
        scheduler.optimizer.step()
        scheduler.step()
    return seen


def test_drops_and_warmup_in_fractions_of_the_run_steps():
    # 5 steps x 4 epochs = 20 steps; warm-up over 10% (2 steps): (s + 1) / 2; drops at steps 10 and 15.
    optim = OptimConfig(lr=1.0, lr_drop_epochs=[], lr_drop_at=[0.75, 0.5], lr_drop_factor=0.1,
                        warmup_fraction=0.1)
    assert uses_relative_schedule(optim) and schedule_kind(optim) == MULTISTEP_WARMUP
    seen = factors(optim, 20, steps_per_epoch=5, max_epochs=4)
    expected = [0.5] + [1.0] * 9 + [0.1] * 5 + [0.01] * 5
    assert seen == pytest.approx(expected, rel=1e-12)


def test_max_steps_shortens_the_run_and_the_schedule_follows():
    # max_steps 8 ends the run before its 20 epoch steps: the drop at 0.5 comes at step 4.
    optim = OptimConfig(lr=1.0, lr_drop_epochs=[], lr_drop_at=[0.5], lr_drop_factor=0.1)
    seen = factors(optim, 8, steps_per_epoch=5, max_epochs=4, max_steps=8)
    assert seen == pytest.approx([1, 1, 1, 1, 0.1, 0.1, 0.1, 0.1], rel=1e-12)


@pytest.mark.parametrize("steps_per_epoch", [200, 1000])  # the built-in set and a set 5x larger
def test_time_budget_places_the_drop_whatever_the_dataset_size(steps_per_epoch):
    # 50 epochs are never reached in a 13.5-minute budget: the time used drives the schedule.
    optim = OptimConfig(lr=1.0, lr_drop_epochs=[], lr_drop_at=[0.6], lr_drop_factor=0.1)
    scheduler = scheduler_for(optim, steps_per_epoch, 50)
    for fraction, step, expected in ((0.59, 700, 1.0), (0.61, 710, 0.1)):
        scheduler.schedule.time_fraction = fraction
        scheduler.last_epoch = step
        scheduler.refresh()
        assert scheduler.optimizer.param_groups[0]["lr"] == pytest.approx(expected)


def test_relative_flat_cosine_in_units_of_the_run():
    # T = 10 steps; warm-up (p / 0.2) ** 2, flat to 0.4, cosine to r = 0.5 at 0.8, then flat at r.
    optim = OptimConfig(lr=1.0, schedule="flat_cosine", warmup_fraction=0.2, flat_fraction=0.4,
                        no_aug_fraction=0.2, min_lr_ratio=0.5)
    seen = factors(optim, 10, steps_per_epoch=5, max_epochs=2)
    cosine = [0.5 + 0.25 * (1 + math.cos(math.pi * k / 4)) for k in (1, 2, 3)]
    assert seen == pytest.approx([0.0, 0.25, 1.0, 1.0, 1.0, *cosine, 0.5, 0.5], rel=1e-12)


def test_time_fraction_comes_from_lightnings_timer():
    # 60 s of a 100 s budget used (the Timer's restored offset): a drop at 0.5 applies at step 1.
    optim = OptimConfig(lr=1.0, lr_drop_epochs=[], lr_drop_at=[0.5], lr_drop_factor=0.1)
    scheduler = scheduler_for(optim, 100, 50)
    timer = Timer(duration=timedelta(seconds=100))
    timer.load_state_dict({"time_elapsed": {"train": 60.0}})
    strategy = SimpleNamespace(broadcast=lambda value, src=0: value)
    trainer = SimpleNamespace(callbacks=[timer], strategy=strategy)
    scheduler.last_epoch = 1
    update_time_fraction(scheduler, trainer)
    assert scheduler.schedule.time_fraction == pytest.approx(0.6)
    assert scheduler.optimizer.param_groups[0]["lr"] == pytest.approx(0.1)


@pytest.mark.parametrize("override, named", [
    (["optim.lr_drop_at=[0.8]"], "'optim.lr_drop_epochs'"),  # the default [200] is still set
    (["optim.lr_drop_epochs=[]", "optim.lr_drop_at=[1.5]"], r"'optim.lr_drop_at\[0\]'"),
    (["optim.warmup_steps=10", "optim.warmup_fraction=0.1"], "'optim.warmup_fraction'"),
    (["optim.flat_fraction=0.5"], "'optim.flat_fraction'"),  # flat_cosine only
    (["optim.schedule=flat_cosine", "optim.flat_fraction=0.7", "optim.no_aug_fraction=0.4"],
     "'optim.flat_fraction'"),
])
def test_bad_relative_values_are_named(override, named):
    with pytest.raises(ConfigError, match=named):
        load_config(None, override)


@pytest.mark.parametrize("name, drops", [("demo", [0.8]), ("demo_dino", [0.6]), ("demo_deformable", [0.8]),
                                         ("demo_rtdetr", [0.75]), ("demo_detr", [0.75])])
def test_demo_recipes_use_the_relative_form(name, drops):
    cfg = load_config(CONFIGS / f"{name}.yaml")
    assert (cfg.optim.lr_drop_at, cfg.optim.lr_drop_epochs) == (drops, [])


class Rates(Callback):
    def __init__(self):
        self.by_step = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.by_step[trainer.global_step] = trainer.optimizers[0].param_groups[0]["lr"]


@pytest.mark.slow
def test_training_drops_at_the_fraction_of_max_steps(tmp_path):
    # 2 steps an epoch, max_epochs 100 never reached: max_steps 4 is the run, the drop at 0.5 is step 2.
    config_path = tmp_path / "tiny.yaml"
    config_path.write_text(TINY_RUN_YAML.format(root=tmp_path))
    cfg = load_config(config_path, ["trainer.max_epochs=100", "trainer.max_steps=4",
                                    "optim.lr_drop_epochs=[]", "optim.lr_drop_at=[0.5]",
                                    "trainer.save_every_n_steps=0",
                                    "trainer.check_val_every_n_epoch=100", "trainer.summary=false"])
    rates = Rates()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        train(cfg, progress_bar=False, callbacks=[rates])
    assert rates.by_step == pytest.approx({0: 1e-4, 1: 1e-4, 2: 1e-5, 3: 1e-5})


def test_timed_evaluation_gives_the_schedule_its_training_minutes():
    # tools/bench_demo_ap.py: 5 of 10 schedule minutes of training time used -> the drop at 0.4 applies.
    optim = OptimConfig(lr=1.0, lr_drop_epochs=[], lr_drop_at=[0.4], lr_drop_factor=0.1)
    scheduler = scheduler_for(optim, 100, 100000)
    timed = TimedEvaluation([100.0], schedule_minutes=10.0)
    timed._start = time.monotonic() - 300.0
    trainer = SimpleNamespace(lr_scheduler_configs=[SimpleNamespace(scheduler=scheduler)])
    timed.on_train_batch_end(trainer, None, None, None, 0)
    assert scheduler.schedule.time_fraction == pytest.approx(0.5, abs=0.01)
    assert scheduler.optimizer.param_groups[0]["lr"] == pytest.approx(0.1)
    assert timed.records == []  # the 100-minute mark is far
