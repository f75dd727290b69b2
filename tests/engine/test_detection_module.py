"""DetectionModule wiring: optimizer groups on the real model, class-count check, fine-tuning init."""

import pytest
import torch

from detr_lab.config import ConfigError, load_config
from detr_lab.engine.module import DetectionModule
from detr_lab.engine.trainer import init_from_checkpoint, load_matching_weights
from detr_lab.models.build import build_model

from factories import tiny_overrides

TINY = tiny_overrides(num_heads=2, num_queries=4)
IDS, NAMES = [4, 9, 11], ["a", "b", "c"]


def group_lr(optimizer, parameter):
    (lr,) = [g["lr"] for g in optimizer.param_groups if any(p is parameter for p in g["params"])]
    return lr


def test_optimizer_groups_on_the_detector():
    torch.manual_seed(0)
    cfg = load_config(overrides=[*TINY, "optim.lr=2e-4", "optim.lr_backbone=3e-5",
                                 "optim.lr_multipliers.query_embed=0.5", "optim.lr_drop_epochs=[7]"])
    module = DetectionModule(cfg, IDS, NAMES)
    config = module.configure_optimizers()
    optimizer, scheduler = config["optimizer"], config["lr_scheduler"]["scheduler"]
    assert isinstance(optimizer, torch.optim.AdamW)
    assert config["lr_scheduler"]["interval"] == "epoch" and list(scheduler.milestones) == [7]
    named = dict(module.model.named_parameters())
    backbone = [n for n, p in named.items() if "backbone" in n and p.requires_grad]
    assert backbone, "the backbone has trainable parameters"
    assert all(group_lr(optimizer, named[n]) == pytest.approx(3e-5) for n in backbone)
    assert group_lr(optimizer, named["query_source.query_embed.weight"]) == pytest.approx(1e-4)
    assert group_lr(optimizer, named["class_embed.weight"]) == pytest.approx(2e-4)
    # Frozen stem + layer1 (frozen_stages 1) are not optimized.
    optimized = {id(p) for g in optimizer.param_groups for p in g["params"]}
    frozen = [n for n, p in named.items() if not p.requires_grad]
    assert frozen and all(id(named[n]) not in optimized for n in frozen)
    assert all(g["weight_decay"] == pytest.approx(1e-4) for g in optimizer.param_groups)


def test_zero_backbone_lr_freezes_the_backbone():
    module = DetectionModule(load_config(overrides=[*TINY, "optim.lr_backbone=0"]), IDS, NAMES)
    names = {n for g in module.configure_optimizers()["optimizer"].param_groups for n in g["param_names"]}
    assert names and not any("backbone" in n for n in names)


def test_class_count_must_match_the_dataset():
    with pytest.raises(ConfigError, match="model.num_classes.*3.*2 category ids"):
        DetectionModule(load_config(overrides=TINY), [1, 2], ["x", "y"])


def test_checkpoint_metadata_is_added():
    module = DetectionModule(load_config(overrides=TINY), IDS, NAMES)
    checkpoint = {}
    module.on_save_checkpoint(checkpoint)
    meta = checkpoint["detr_lab"]
    assert meta["category_ids"] == IDS and meta["class_names"] == NAMES
    assert meta["config"]["model"]["num_classes"] == 3


def test_init_from_other_class_count_reinitialises_the_class_head(tmp_path):
    from detr_lab.checkpoints import save_checkpoint

    torch.manual_seed(0)
    source_cfg = load_config(overrides=[*TINY, "model.num_classes=7"])
    source = build_model(source_cfg.model)
    names = [str(i) for i in range(7)]
    path = save_checkpoint(tmp_path / "source.pt", source, source_cfg, list(range(7)), names)
    torch.manual_seed(1)
    target = build_model(load_config(overrides=TINY).model)
    fresh_head = target.class_embed.weight.detach().clone()
    transfer = init_from_checkpoint(target, path)
    assert {name for name, _, _ in transfer.reinitialised} == {"class_embed.weight", "class_embed.bias"}
    assert not transfer.missing and not transfer.unused
    assert len(transfer.loaded) == len(target.state_dict()) - 2
    report = transfer.report()
    assert "re-initialised" in report and "class_embed.weight" in report and "[8, 32]" in report
    source_state = source.state_dict()
    for name in transfer.loaded:
        assert torch.equal(target.state_dict()[name], source_state[name]), name
    assert torch.equal(target.class_embed.weight, fresh_head)


def test_matching_weights_reports_missing_and_unused():
    target = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Linear(3, 1))
    source = {"0.weight": torch.ones(3, 2), "0.bias": torch.ones(2), "extra": torch.zeros(1)}
    transfer = load_matching_weights(target, source, "src")
    assert transfer.loaded == ["0.weight"]
    assert transfer.reinitialised == [("0.bias", (2,), (3,))]
    assert transfer.missing == ["1.weight", "1.bias"] and transfer.unused == ["extra"]
    assert torch.equal(target[0].weight, torch.ones(3, 2))
    with pytest.raises(FileNotFoundError, match="nothing.pt"):
        init_from_checkpoint(target, "nothing.pt")
