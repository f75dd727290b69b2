"""RT-DETR's parts as switches other members use, and their behaviour beyond the official fixture:
training steps of the combinations, anchors and valid mask for odd sizes, denoising at inference, the
discrete and default sampling methods, per-level points."""

from __future__ import annotations

import pytest
import torch

from detr_lab.config import ConfigError, load_config
from detr_lab.models.attention.deformable_v2 import MultiScaleDeformableAttentionV2
from detr_lab.models.build import build_criterion, build_model
from detr_lab.models.two_stage import encoder_proposals

from factories import tiny_batch, tiny_overrides

NECK = (
    "model.neck.type=hybrid_encoder",
    "model.neck.options.ffn_dim=32",
    "model.neck.options.expansion=0.5",
    "model.neck.options.output_proj=true",
)
RTDETR = (
    "model.query_source=iou_aware", "model.box_refine=true", "model.look_forward_twice=true",
    "model.encoder.num_layers=0", "model.decoder.cross_attention=deformable_v2",
    "model.num_feature_levels=3", "model.backbone.type=resnet_vd", "model.backbone.name=resnet18",
    "loss.terms=[vfl,boxes]",
)  # fmt: skip


def _config(*extra: str, neck: tuple[str, ...] = NECK):
    return load_config(
        overrides=tiny_overrides(*neck, *RTDETR, *extra, classification="sigmoid", num_heads=4, num_classes=5)
    )


def _train_step(cfg, height: int = 96, width: int = 128) -> dict:
    torch.manual_seed(0)
    model = build_model(cfg.model).train()
    criterion = build_criterion(cfg.model, cfg.loss)
    images, padding_mask, targets = tiny_batch(height=height, width=width)
    losses = criterion(model(images, padding_mask, targets=targets), targets)
    total = criterion.total_loss(losses)
    total.backward()
    assert torch.isfinite(total)
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None for g in grads), "every trainable parameter takes part in the step"
    return losses


@pytest.mark.parametrize(
    "extra",
    [
        pytest.param(("model.denoising.enabled=true", "model.denoising.dn_number=4"), id="rtdetrv2"),
        pytest.param(("model.decoder.cross_attention=deformable",), id="rtdetr-v1-attention"),
        pytest.param(("model.decoder.level_points=[4,3,2]",), id="per-level-points"),
        # IoU-aware selection on Deformable DETR's side: projection neck, deformable encoder layers
        pytest.param(
            ("model.encoder.num_layers=1", "model.encoder.attention=deformable",
             "model.backbone.type=resnet"),
            id="iou-aware-on-deformable",
        ),
    ],
)  # fmt: skip
def test_rtdetr_combinations_train_a_step(extra):
    losses = _train_step(_config(*extra, neck=() if "model.encoder.num_layers=1" in extra else NECK))
    assert {"loss_vfl", "loss_bbox", "loss_giou", "loss_vfl_enc"} <= set(losses)


def test_vfl_is_a_loss_term_of_dino():
    overrides = tiny_overrides(
        "model.query_source=mixed_selection", "model.box_refine=true", "model.look_forward_twice=true",
        "model.decoder.cross_attention=deformable", "model.encoder.attention=deformable",
        "model.num_feature_levels=2", "loss.terms=[vfl,boxes]", "model.denoising.enabled=true",
        "model.denoising.dn_number=4", classification="sigmoid", num_heads=4, num_classes=5,
    )  # fmt: skip
    losses = _train_step(load_config(overrides=overrides))
    assert {"loss_vfl", "loss_vfl_dn", "loss_vfl_enc"} <= set(losses) and "loss_ce" not in losses


def test_discrete_sampling_trains_with_frozen_offsets():
    cfg = _config("model.decoder.sampling=discrete")
    torch.manual_seed(0)
    model = build_model(cfg.model).train()
    attention = model.transformer.decoder.layers[0].cross_attn
    assert attention.sampling == "discrete" and not attention.sampling_offsets.weight.requires_grad
    criterion = build_criterion(cfg.model, cfg.loss)
    images, padding_mask, targets = tiny_batch(height=96, width=96)
    criterion.total_loss(criterion(model(images, padding_mask, targets=targets), targets)).backward()
    assert (
        attention.sampling_offsets.weight.grad is None and attention.attention_weights.weight.grad is not None
    )


def test_odd_input_sizes_run_and_anchors_follow_each_level():
    """An input whose sides are no multiple of 32 (the official hybrid encoder cannot take it)."""
    cfg = _config()
    model = build_model(cfg.model).eval()
    images = torch.randn(1, 3, 75, 101)
    with torch.no_grad():
        outputs = model(images, torch.zeros(1, 75, 101, dtype=torch.bool), return_memory=True)
    assert outputs["pred_boxes"].shape == (1, cfg.model.num_queries, 4)
    # strides 8 / 16 / 32 of 75 x 101 with 'same' convolutions: 10 x 13, 5 x 7, 3 x 4
    assert outputs["memory"].shape[1] == 10 * 13 + 5 * 7 + 3 * 4


def test_anchors_and_valid_mask_by_hand():
    """Level sizes (H, W) = (3, 5) and (2, 3), no padding: anchor (x + 0.5) / W, (y + 0.5) / H, size 0.05
    and 0.1 (0.05 * 2^level), in logit space; valid where every coordinate lies in (0.01, 0.99)."""
    shapes = torch.tensor([[3, 5], [2, 3]])
    padding = torch.zeros(1, 3 * 5 + 2 * 3, dtype=torch.bool)
    sizes = torch.tensor([[[5, 3], [3, 2]]])  # (width, height) per level
    proposals, valid = encoder_proposals(padding, shapes, sizes)
    assert valid.all()
    boxes = proposals.sigmoid()[0]
    expected_first = torch.tensor([0.1, 1 / 6, 0.05, 0.05])  # level 0, pixel (0, 0)
    expected_last = torch.tensor([2.5 / 3, 0.75, 0.1, 0.1])  # level 1, pixel (x 2, y 1)
    torch.testing.assert_close(boxes[0], expected_first, rtol=0, atol=1e-6)
    torch.testing.assert_close(boxes[-1], expected_last, rtol=0, atol=1e-6)
    # A level of 1 x 200: x = (i + 0.5) / 200 lies in (0.01, 0.99) for pixels 2..197 only; the anchors of
    # pixels 0, 1, 198, 199 are invalid (their logits +inf).
    proposals, valid = encoder_proposals(torch.zeros(1, 200, dtype=torch.bool), torch.tensor([[1, 200]]),
                                         torch.tensor([[[200, 1]]]))  # fmt: skip
    assert valid[0, :, 0].nonzero().flatten().tolist() == list(range(2, 198))
    assert torch.isinf(proposals[0, [0, 1, 198, 199]]).all() and torch.isfinite(proposals[0, 2:198]).all()


def test_denoising_off_changes_nothing_at_inference():
    with_dn = _config("model.denoising.enabled=true", "model.denoising.dn_number=4")
    without = _config()
    torch.manual_seed(0)
    model = build_model(with_dn.model).eval()
    plain = build_model(without.model).eval()
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("denoising.")}
    plain.load_state_dict(state)
    images, padding_mask, targets = tiny_batch(height=96, width=96)
    with torch.no_grad():
        a = model(images, padding_mask, targets=targets)
        b = plain(images, padding_mask)
    assert "dn_outputs" not in a
    assert torch.equal(a["pred_logits"], b["pred_logits"]) and torch.equal(a["pred_boxes"], b["pred_boxes"])


def _attention(sampling: str, points=4) -> MultiScaleDeformableAttentionV2:
    torch.manual_seed(0)
    attention = MultiScaleDeformableAttentionV2(16, 2, 2, points, sampling=sampling)
    with torch.no_grad():
        attention.sampling_offsets.weight.normal_(0, 0.1)
        attention.attention_weights.weight.normal_(0, 0.1)
    return attention


def test_discrete_and_default_sampling_agree_on_constant_maps():
    """Inside a map whose values are the same at every pixel of a level, bilinear and nearest sampling
    read the same value; so with locations well inside the maps both methods give the same output."""
    default, discrete = _attention("default"), _attention("discrete")
    discrete.load_state_dict(default.state_dict())
    shapes = torch.tensor([[8, 8], [4, 4]])
    level_values = torch.randn(2, 16)
    value = torch.cat([level_values[0].expand(64, 16), level_values[1].expand(16, 16)])[None]
    query = torch.randn(1, 5, 16)
    boxes = torch.tensor([0.5, 0.5, 0.1, 0.1]).expand(1, 5, 2, 4)  # small boxes at the centre
    outputs = [
        module(query, None, value, reference_points=boxes, spatial_shapes=shapes)
        for module in (default, discrete)
    ]
    torch.testing.assert_close(outputs[0], outputs[1], rtol=0, atol=1e-5)


def test_discrete_sampling_reads_the_official_pixel():
    """Point locations (x, y) read pixel int(x * W + 0.5), int(y * H + 0.5) clamped into the map."""
    attention = _attention("discrete", points=1)
    shapes = torch.tensor([[2, 4], [1, 2]])
    value = torch.arange(10, dtype=torch.float32)[:, None, None].expand(1, 10, 2, 8)[0][None]  # (1, 10, 2, 8)
    locations = torch.tensor([0.30, 0.60, 1.30, -0.20]).view(1, 1, 1, 2, 2).expand(1, 1, 2, 2, 2)
    weights = torch.tensor([0.25, 0.75]).expand(1, 1, 2, 2)
    output = attention.discrete_core(value, shapes, torch.tensor([0, 8]), locations.contiguous(), weights)
    # level 0 (W 4, H 2): x 0.3 * 4 + 0.5 = 1.7 -> 1, y 0.6 * 2 + 0.5 = 1.7 -> 1: flat index 1 * 4 + 1 = 5
    # level 1 (W 2, H 1): x 1.3 * 2 + 0.5 -> 3, clamped to 1; y -0.2 + 0.5 = 0.3 -> 0: index 8 + 1 = 9
    torch.testing.assert_close(output, torch.full((1, 1, 16), 0.25 * 5 + 0.75 * 9))


def test_per_level_points_pad_with_zero_weights():
    """[3, 1] points: the core's padded slots add nothing, so the output equals a direct weighted sum."""
    attention = _attention("default", points=[3, 1])
    assert attention.sampling_offsets.out_features == 2 * 4 * 2 and attention.num_points_scale.tolist() == [
        pytest.approx(1 / 3)
    ] * 3 + [1.0]
    shapes = torch.tensor([[8, 8], [4, 4]])
    value = torch.randn(1, 80, 16)
    query = torch.randn(1, 3, 16)
    boxes = torch.rand(1, 3, 2, 4) * 0.5 + 0.25
    output = attention(query, None, value, reference_points=boxes, spatial_shapes=shapes)
    assert output.shape == (1, 3, 16) and torch.isfinite(output).all()
    attention.core_impl = "reference"
    torch.testing.assert_close(
        attention(query, None, value, reference_points=boxes, spatial_shapes=shapes),
        output,
        rtol=0,
        atol=1e-5,
    )


def test_attention_without_projections_leaves_the_callers_memory_alone():
    """D-FINE's attention has no value projection, so its value is the decoder's memory, which every
    layer reads: padded positions are zeroed in the sampled copy, never in the caller's tensor."""
    attention = MultiScaleDeformableAttentionV2(16, 2, 2, 2, projections=False)
    shapes = torch.tensor([[4, 4], [2, 2]])
    memory = torch.randn(2, 20, 16)
    before = memory.clone()
    padding = torch.zeros(2, 20, dtype=torch.bool)
    padding[1, 12:16] = padding[1, 19] = True
    query, boxes = torch.randn(2, 3, 16), torch.rand(2, 3, 2, 4) * 0.5 + 0.25
    output = attention(
        query, None, memory, key_padding_mask=padding, reference_points=boxes, spatial_shapes=shapes
    )
    assert torch.equal(memory, before)
    zeroed = attention(query, None, memory.masked_fill(padding[..., None], 0.0), reference_points=boxes,
                       spatial_shapes=shapes)
    torch.testing.assert_close(output, zeroed, rtol=0, atol=0)


def test_decoder_options_need_the_v2_attention():
    with pytest.raises(
        ConfigError, match="'model.decoder.sampling' is read by the cross-attention deformable_v2"
    ):
        _config("model.decoder.cross_attention=deformable", "model.decoder.sampling=discrete")
    with pytest.raises(ConfigError, match="one positive count per feature level"):
        _config("model.decoder.level_points=[4,4]")
    with pytest.raises(ConfigError, match="eval_layers"):
        _config("model.decoder.eval_layers=5")


def test_eval_layers_predict_from_an_earlier_layer():
    cfg = _config("model.decoder.eval_layers=1")
    torch.manual_seed(0)
    model = build_model(cfg.model).eval()
    images, padding_mask, _ = tiny_batch(height=96, width=96)
    with torch.no_grad():
        short = model(images, padding_mask)
        model.eval_layers = None
        full = model(images, padding_mask)
    assert short["aux_outputs"] == [] and len(full["aux_outputs"]) == cfg.model.decoder.num_layers - 1
    assert torch.equal(short["pred_boxes"], full["aux_outputs"][0]["pred_boxes"])


def test_optimize_for_inference_fuses_and_folds_with_the_same_outputs():
    """RepVGG blocks become one convolution and every conv-norm unit's batch norm folds into its
    convolution (ResNet-vd, hybrid encoder), with the outputs of the eval-mode model."""
    from detr_lab.models.fusion import FusedRepVggBlock
    from detr_lab.models.necks.hybrid_encoder import RepVggBlock
    from detr_lab.models.optimize import optimize_for_inference

    cfg = _config()
    torch.manual_seed(0)
    model = build_model(cfg.model)
    generator = torch.Generator().manual_seed(0)
    for norm in model.modules():  # statistics away from their initial values
        if isinstance(norm, torch.nn.BatchNorm2d):
            norm.running_mean.copy_(0.2 * torch.randn(norm.running_mean.shape, generator=generator))
            norm.running_var.copy_(0.5 + torch.rand(norm.running_var.shape, generator=generator))
    model.eval()
    images, padding_mask, _ = tiny_batch(height=96, width=128)
    with torch.no_grad():
        expected = model(images, padding_mask)
        optimize_for_inference(model)
        outputs = model(images, padding_mask)
    assert not any(isinstance(m, (RepVggBlock, torch.nn.BatchNorm2d)) for m in model.modules())
    assert any(isinstance(m, FusedRepVggBlock) for m in model.modules())
    torch.testing.assert_close(outputs["pred_logits"], expected["pred_logits"], rtol=0, atol=1e-4)
    torch.testing.assert_close(outputs["pred_boxes"], expected["pred_boxes"], rtol=0, atol=1e-4)
