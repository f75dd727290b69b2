"""Parameter groups: backbone rate, name-matched multipliers, frozen backbone, step decay per epoch."""

import pytest
import torch
from torch import nn

from detr_lab.config import ConfigError, OptimConfig
from detr_lab.engine.optim import build_lr_scheduler, build_optimizer, build_param_groups, freeze_backbone


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 4))
        self.backbone[0].weight.requires_grad_(False)  # as a frozen stage would be
        self.encoder = nn.ModuleDict({"sampling_offsets": nn.Linear(4, 4), "value_proj": nn.Linear(4, 4)})
        self.reference_points = nn.Linear(4, 2)
        self.class_embed = nn.Linear(4, 3)


def lr_of(optimizer: torch.optim.Optimizer, parameter: torch.Tensor) -> float:
    matches = [g["lr"] for g in optimizer.param_groups if any(p is parameter for p in g["params"])]
    assert len(matches) == 1
    return matches[0]


def test_rates_per_parameter():
    model = Toy()
    optim = OptimConfig(lr=2e-4, lr_backbone=2e-5, weight_decay=1e-4,
                        lr_multipliers={"sampling_offsets": 0.1, "reference_points": 0.5})
    optimizer = build_optimizer(model, optim)
    assert isinstance(optimizer, torch.optim.AdamW)
    assert lr_of(optimizer, model.backbone[1].weight) == pytest.approx(2e-5)
    assert lr_of(optimizer, model.backbone[0].bias) == pytest.approx(2e-5)
    assert lr_of(optimizer, model.encoder["sampling_offsets"].weight) == pytest.approx(2e-5)
    assert lr_of(optimizer, model.reference_points.bias) == pytest.approx(1e-4)
    assert lr_of(optimizer, model.encoder["value_proj"].weight) == pytest.approx(2e-4)
    assert lr_of(optimizer, model.class_embed.weight) == pytest.approx(2e-4)
    # The parameter left frozen is not optimized at all.
    assert all(p is not model.backbone[0].weight for g in optimizer.param_groups for p in g["params"])
    assert all(g["weight_decay"] == 1e-4 for g in optimizer.param_groups)
    names = {g["name"] for g in optimizer.param_groups}
    assert names == {"backbone", "default*sampling_offsets", "default*reference_points", "default"}


def test_zero_backbone_rate_freezes_backbone():
    model = Toy()
    assert freeze_backbone(model) == 4
    groups = build_param_groups(model, OptimConfig(lr_backbone=0.0))
    optimized = {name for g in groups for name in g["param_names"]}
    assert not any("backbone" in name for name in optimized)
    assert "class_embed.weight" in optimized


def test_unknown_multiplier_key_is_named():
    with pytest.raises(ConfigError, match="'sampling_offset_typo'"):
        build_param_groups(Toy(), OptimConfig(lr_multipliers={"sampling_offset_typo": 0.1}))


def test_step_decay_per_epoch():
    model = Toy()
    optim = OptimConfig(lr=1e-4, lr_backbone=1e-5, lr_drop_epochs=[3, 1], lr_drop_factor=0.5)
    optimizer = build_optimizer(model, optim)
    scheduler = build_lr_scheduler(optimizer, optim)
    seen = []
    for _epoch in range(5):
        seen.append(lr_of(optimizer, model.class_embed.weight))
        optimizer.step()
        scheduler.step()
    assert seen == pytest.approx([1e-4, 5e-5, 5e-5, 2.5e-5, 2.5e-5])
    assert lr_of(optimizer, model.backbone[1].weight) == pytest.approx(2.5e-6)


def test_fused_adamw_where_possible_and_the_same_update():
    optim = OptimConfig(lr=1e-3, lr_backbone=1e-4, weight_decay=1e-2)
    torch.manual_seed(0)
    fused_model = Toy()
    plain_model = Toy()
    plain_model.load_state_dict(fused_model.state_dict())
    initial = fused_model.class_embed.weight.detach().clone()
    fused = build_optimizer(fused_model, optim)
    plain = build_optimizer(plain_model, optim, fused=False)
    assert all(g["fused"] for g in fused.param_groups)
    assert not any(g["fused"] for g in plain.param_groups)
    inputs = torch.randn(5, 3)
    for _ in range(3):
        for model, optimizer in ((fused_model, fused), (plain_model, plain)):
            optimizer.zero_grad()
            model.class_embed(model.encoder["value_proj"](model.backbone(inputs))).square().sum().backward()
            optimizer.step()
    for (name, a), b in zip(fused_model.state_dict().items(), plain_model.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=name)
    assert not torch.equal(fused_model.class_embed.weight.detach(), initial)  # the steps moved it
    # a parameter on a device without fused kernels keeps the default implementation
    meta = Toy().to("meta")
    assert not any(g["fused"] for g in build_optimizer(meta, optim).param_groups)
