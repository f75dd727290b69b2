"""RT-DETR's hybrid encoder (AIFI + CCFM) as a neck, against the official module: the fixture holds
its outputs for synthetic weights (tests/fixtures/hybrid_encoder/make_fixture.py says how)."""

from __future__ import annotations

import torch

from detr_lab.config import load_config
from detr_lab.models.build import build_criterion, build_model
from detr_lab.models.necks.hybrid_encoder import HybridEncoder, sincos_position_embedding

from factories import FIXTURES, load_synth_weights, tiny_batch, tiny_overrides

FIXTURE = torch.load(FIXTURES / "hybrid_encoder" / "hybrid_encoder.pt", weights_only=True)


def test_outputs_match_the_official_hybrid_encoder():
    s = FIXTURE["settings"]
    neck = HybridEncoder(s["in_channels"], s["hidden_dim"], num_heads=s["nhead"],
                         ffn_dim=s["dim_feedforward"], expansion=s["expansion"],
                         depth_mult=s["depth_mult"])  # fmt: skip
    spec = dict(FIXTURE["state_dict_spec"])
    assert list(neck.state_dict()) == list(spec)  # the official key layout, in its order
    neck.load_state_dict(load_synth_weights().synth_state_dict(spec, FIXTURE["seed"]))
    with torch.no_grad():
        outputs = neck.eval().fuse(FIXTURE["inputs"])
    for ours, official in zip(outputs, FIXTURE["outputs"], strict=True):
        assert ours.shape == official.shape
        torch.testing.assert_close(ours, official, rtol=1e-4, atol=1e-4)


def test_sincos_embedding_by_hand():
    pos = sincos_position_embedding(2, 3, 8, temperature=100.0)  # 2 rows, 3 columns, 2 frequencies
    assert pos.shape == (1, 6, 8)
    omega = torch.tensor([1.0, 0.1])  # 100 ** -(i / 2)
    # Token order as the official grid: x outer, y inner; token 3 is x = 1, y = 1.
    x, y = 1.0, 1.0
    expected = torch.cat([(x * omega).sin(), (x * omega).cos(), (y * omega).sin(), (y * omega).cos()])
    torch.testing.assert_close(pos[0, 3], expected)


def test_the_hybrid_encoder_neck_under_a_dino_decoder_trains_a_step():
    """The neck is a part any member can use: here the DINO decoder on top of it."""
    overrides = tiny_overrides(
        "model.neck.type=hybrid_encoder", "model.neck.options.ffn_dim=32", "model.neck.options.expansion=0.5",
        "model.query_source=mixed_selection", "model.box_refine=true", "model.look_forward_twice=true",
        "model.denoising.enabled=true", "model.denoising.dn_number=4", "model.encoder.num_layers=0",
        "model.decoder.cross_attention=deformable", "model.num_feature_levels=3",
        classification="sigmoid", num_heads=4, num_classes=5,
    )  # fmt: skip
    cfg = load_config(overrides=overrides)
    torch.manual_seed(0)
    model = build_model(cfg.model).train()
    assert isinstance(model.neck, HybridEncoder) and model.neck.num_levels == 3
    criterion = build_criterion(cfg.model, cfg.loss)
    images, padding_mask, targets = tiny_batch(height=96, width=128, padded_from_row=64, padded_from_col=96)
    losses = criterion(model(images, padding_mask, targets=targets), targets)
    total = criterion.total_loss(losses)
    total.backward()
    assert "loss_bbox_dn" in losses and torch.isfinite(total)
    assert model.neck.encoder[0].layers[0].self_attn.in_proj_weight.grad.abs().sum() > 0
