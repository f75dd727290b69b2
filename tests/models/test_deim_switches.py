"""DEIM's and D-FINE's training parts as switches of any member: the matchability-aware loss (MAL) on
DINO and RT-DETR, D-FINE's distribution refinement with FGL / DDF on a ResNet RT-DETR; switched off, the
losses are the member's own, value for value."""

from __future__ import annotations

import pytest
import torch

from detr_lab.config import load_config
from detr_lab.errors import InputError
from detr_lab.models.build import build_criterion, build_model

from factories import REPO, tiny_batch

TINY = [
    "model.hidden_dim=32", "model.num_heads=2", "model.ffn_dim=64", "model.num_queries=6",
    "model.decoder.num_layers=2", "model.denoising.dn_number=4", "model.num_classes=5",
]  # fmt: skip
MEMBERS = {
    "dino": ("demo_dino.yaml", []),
    "rtdetr": ("demo_rtdetr.yaml", ["model.neck.options.ffn_dim=64"]),
}


def step(config: str, overrides: list[str]) -> tuple[dict, torch.nn.Module]:
    """One training step's unweighted losses (seeded) and the model after its backward pass."""
    name, extra = MEMBERS[config]
    cfg = load_config(REPO / "configs" / name, overrides=[*TINY, *extra, *overrides])
    torch.manual_seed(0)
    model = build_model(cfg.model).train()
    criterion = build_criterion(cfg.model, cfg.loss)
    images, padding_mask, targets = tiny_batch()
    torch.manual_seed(1)
    losses = criterion(model(images, padding_mask, targets=targets), targets)
    criterion.total_loss(losses).backward()
    return losses, model


@pytest.mark.parametrize("member", sorted(MEMBERS))
def test_mal_trains_dino_and_rtdetr_and_off_restores_the_losses(member):
    own = "labels" if member == "dino" else "vfl"
    before, _ = step(member, [])
    with_mal, model = step(member, ["loss.terms=[mal,boxes]", "loss.term_options={mal: {gamma: 1.5}}"])
    assert "loss_mal" in with_mal and f"loss_{'ce' if own == 'labels' else own}" not in with_mal
    assert all(torch.isfinite(v).all() for v in with_mal.values())
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    # the box terms are untouched by the classification term chosen
    assert with_mal["loss_bbox"] == before["loss_bbox"] and with_mal["loss_giou_0"] == before["loss_giou_0"]
    after, _ = step(member, [])
    assert set(after) == set(before) and all(torch.equal(after[k], before[k]) for k in before)


def test_distribution_refinement_on_a_resnet_rtdetr():
    overrides = [
        "model.distribution.enabled=true", "model.decoder.gate=true", "model.decoder.projections=false",
        "loss.terms=[vfl,boxes,fgl,ddf]", "loss.union_matching=true",
    ]  # fmt: skip
    losses, model = step("rtdetr", overrides)
    assert {"loss_fgl", "loss_ddf_0", "loss_vfl_pre", "loss_fgl_dn"} <= set(losses)
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_distribution_terms_need_a_distribution_head():
    with pytest.raises(InputError, match="model.distribution.enabled"):
        step("rtdetr", ["loss.terms=[vfl,boxes,fgl]"])
