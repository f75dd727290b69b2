"""A DDP strategy named by a recipe is used only when the run has more than one process: on one
process it would wrap the model in DistributedDataParallel and all-reduce every gradient with itself."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy

from detr_lab.config import load_config
from detr_lab.engine.trainer import build_trainer, effective_strategy, process_count


def trainer_cfg(**changes):
    return dataclasses.replace(load_config().trainer, **changes)


@pytest.mark.parametrize(("changes", "count", "strategy"), [
    ({"strategy": "ddp", "devices": "1", "accelerator": "cpu"}, 1, "auto"),
    ({"strategy": "ddp", "devices": "auto", "accelerator": "cpu"}, 1, "auto"),
    ({"strategy": "ddp_find_unused_parameters_true", "devices": "0", "accelerator": "gpu"}, None, None),
    ({"strategy": "ddp", "devices": "2", "accelerator": "cpu"}, 2, "ddp"),
    ({"strategy": "ddp", "devices": "1", "accelerator": "cpu", "num_nodes": 2}, 2, "ddp"),
    ({"strategy": "ddp", "devices": "0,1", "accelerator": "gpu"}, 2, "ddp"),
    ({"strategy": "ddp", "devices": "auto", "accelerator": "gpu"}, None, "ddp"),
    ({"strategy": "ddp", "devices": "-1", "accelerator": "gpu"}, None, "ddp"),
    ({"strategy": "fsdp", "devices": "1", "accelerator": "cpu"}, 1, "fsdp"),
], ids=["one_cpu", "auto_cpu", "zero_gpus", "two_cpus", "two_nodes", "two_gpus", "auto_gpus", "all_gpus",
        "other_strategy"])
def test_effective_strategy(changes, count, strategy):
    t = trainer_cfg(**changes)
    assert process_count(t) == count
    if strategy is not None:
        assert effective_strategy(t) == strategy


def test_a_recipe_naming_ddp_trains_one_process_without_it(tmp_path):
    recipe = Path(__file__).resolve().parents[2] / "configs" / "detr_r50.yaml"
    cfg = load_config(recipe, ["trainer.devices=1", "trainer.accelerator=cpu",
                               f"trainer.output_dir={tmp_path}"])
    assert cfg.trainer.strategy == "ddp"
    assert isinstance(build_trainer(cfg, progress_bar=False, loggers=False).strategy, SingleDeviceStrategy)
    two = dataclasses.replace(cfg, trainer=dataclasses.replace(cfg.trainer, devices="2"))
    assert isinstance(build_trainer(two, progress_bar=False, loggers=False).strategy, DDPStrategy)
