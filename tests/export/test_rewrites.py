"""The export's rewrites: RepVGG blocks fused into one convolution, same function, trained model untouched."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from detr_lab.config import load_config
from detr_lab.export.onnx_export import prepare_for_export
from detr_lab.models.build import build_model
from detr_lab.models.fusion import FusedRepVggBlock, fuse_repvgg_block, fuse_repvgg_blocks
from detr_lab.models.necks.hybrid_encoder import CSPRepBlock, RepVggBlock

from factories import tiny_overrides

# A small RT-DETR: ResNet-18-vd, hybrid encoder (CSP blocks of RepVGG blocks), IoU-aware selection,
# RT-DETRv2 deformable cross-attention.
RTDETR = tiny_overrides(
    "model.neck.type=hybrid_encoder", "model.neck.options.ffn_dim=32", "model.neck.options.expansion=0.5",
    "model.neck.options.output_proj=true", "model.query_source=iou_aware", "model.box_refine=true",
    "model.look_forward_twice=true", "model.encoder.num_layers=0",
    "model.decoder.cross_attention=deformable_v2", "model.num_feature_levels=3",
    "model.backbone.type=resnet_vd", "model.backbone.name=resnet18", "loss.terms=[vfl,boxes]",
    classification="sigmoid", num_heads=4, num_classes=5, num_queries=10,
)  # fmt: skip


def randomize_norms(module: nn.Module, seed: int = 0) -> None:
    """Batch-norm statistics and affine parameters away from their initial values."""
    generator = torch.Generator().manual_seed(seed)
    for norm in module.modules():
        if isinstance(norm, nn.BatchNorm2d):
            shape = norm.running_mean.shape
            norm.running_mean.copy_(0.3 * torch.randn(shape, generator=generator))
            norm.running_var.copy_(0.5 + torch.rand(shape, generator=generator))
            with torch.no_grad():
                norm.weight.copy_(1 + 0.2 * torch.randn(shape, generator=generator))
                norm.bias.copy_(0.2 * torch.randn(shape, generator=generator))


@pytest.mark.parametrize("act", ["silu", "relu"])
def test_fused_block_computes_the_block(act):
    torch.manual_seed(0)
    block = RepVggBlock(8, act)
    randomize_norms(block)
    block.eval()
    x = torch.randn(2, 8, 9, 7)
    fused = fuse_repvgg_block(block)
    assert isinstance(fused, FusedRepVggBlock) and fused.conv.kernel_size == (3, 3)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), block(x), rtol=0, atol=1e-5)
        block64, x64 = block.double(), x.double()
        torch.testing.assert_close(fuse_repvgg_block(block64)(x64), block64(x64), rtol=0, atol=1e-12)


def test_fuse_every_block_of_a_csp_block_in_place():
    torch.manual_seed(1)
    csp = CSPRepBlock(6, 8, num_blocks=3, expansion=0.5, act="silu")
    randomize_norms(csp)
    csp.eval()
    x = torch.randn(1, 6, 10, 10)
    with torch.no_grad():
        expected = csp(x)
        assert fuse_repvgg_blocks(csp) == 3
        got = csp(x)
    assert not any(isinstance(m, RepVggBlock) for m in csp.modules())
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    assert fuse_repvgg_blocks(csp) == 0  # nothing left to fuse


def test_a_branch_that_is_not_a_plain_conv_norm_is_refused():
    block = RepVggBlock(4, "silu")
    block.conv2.conv = nn.Conv2d(4, 4, 1, groups=2, bias=False)
    with pytest.raises(ValueError, match="cannot fuse a RepVGG branch"):
        fuse_repvgg_block(block)


def test_prepare_for_export_fuses_a_copy_and_keeps_the_outputs():
    torch.manual_seed(0)
    model = build_model(load_config(overrides=RTDETR).model)
    randomize_norms(model)
    model.eval()
    blocks = sum(isinstance(m, RepVggBlock) for m in model.modules())
    assert blocks > 0
    wrapper = prepare_for_export(model)
    assert sum(isinstance(m, RepVggBlock) for m in model.modules()) == blocks  # the model is untouched
    assert not any(isinstance(m, RepVggBlock) for m in wrapper.modules())
    assert sum(isinstance(m, FusedRepVggBlock) for m in wrapper.modules()) == blocks
    images = torch.randn(2, 3, 96, 128)
    padding_mask = torch.zeros(2, 96, 128, dtype=torch.bool)
    padding_mask[1, 64:] = True
    with torch.no_grad():
        expected = model(images, padding_mask)
        logits, boxes = wrapper(images, padding_mask)
    torch.testing.assert_close(logits, expected["pred_logits"], rtol=0, atol=1e-4)
    torch.testing.assert_close(boxes, expected["pred_boxes"], rtol=0, atol=1e-4)


@pytest.mark.slow  # export + onnxruntime
def test_rtdetr_exports_with_fused_blocks_and_passes_verify(tmp_path):
    pytest.importorskip("onnxruntime")
    onnx = pytest.importorskip("onnx")
    from detr_lab.export.metadata import ExportMetadata
    from detr_lab.export.onnx_export import export_onnx
    from detr_lab.export.verify import verify_onnx

    cfg = load_config(overrides=RTDETR)
    torch.manual_seed(0)
    model = build_model(cfg.model)
    randomize_norms(model)
    model.eval()
    metadata = ExportMetadata(list(range(5)), [f"c{i}" for i in range(5)], cfg)
    path = export_onnx(model, tmp_path / "rtdetr.onnx", metadata=metadata, height=96, width=128, batch=2)
    graph = onnx.load(str(path)).graph
    csp_blocks = sum(isinstance(m, CSPRepBlock) for m in model.modules())
    blocks = sum(isinstance(m, RepVggBlock) for m in model.modules())
    conv_names = [node.name for node in graph.node if node.op_type == "Conv"]
    # one convolution per RepVGG block, none for the 1x1 branches
    assert not any("/bottlenecks." in name and "/conv2/" in name for name in conv_names)
    assert sum("/bottlenecks." in name for name in conv_names) == blocks > csp_blocks
    report = verify_onnx(model, path, num_random=3, tolerance=1e-4)
    assert report.passed, report.text()


@pytest.mark.slow  # export + onnxruntime
@pytest.mark.parametrize(
    "variant",
    [
        pytest.param((), id="rtdetrv2"),
        pytest.param(("model.decoder.cross_attention=deformable",), id="rtdetr-v1"),
        # Discrete sampling reads the pixel at int(location * size + 0.5): a location within float
        # rounding of a pixel boundary reads the neighbour in one runtime and not in the other, so
        # its logits move by up to ~2e-2 between runs of the same model (PyTorch float32 against
        # float64 on these weights: 2.2e-2, the official code likewise); its tolerance says so.
        pytest.param(("model.decoder.sampling=discrete",), id="discrete"),
        pytest.param(("model.decoder.level_points=[4,3,2]",), id="level-points"),
    ],
)
def test_rtdetr_variants_export_dynamic_and_verify(variant, tmp_path):
    """Each RT-DETR variant exports with --dynamic and matches PyTorch at other sizes than the traced
    96 x 128 (the AIFI position embedding and the anchors follow each input's grid)."""
    pytest.importorskip("onnxruntime")
    from detr_lab.export.metadata import ExportMetadata
    from detr_lab.export.onnx_export import export_onnx
    from detr_lab.export.verify import verify_onnx

    cfg = load_config(overrides=[*RTDETR, *variant])
    torch.manual_seed(0)
    model = build_model(cfg.model)
    randomize_norms(model)
    model.eval()
    metadata = ExportMetadata(list(range(5)), [f"c{i}" for i in range(5)], cfg)
    path = export_onnx(model, tmp_path / "rtdetr.onnx", metadata=metadata, height=96, width=128, batch=2,
                       dynamic=True)  # fmt: skip
    tolerance = 5e-2 if cfg.model.decoder.sampling == "discrete" else 1e-4
    report = verify_onnx(model, path, num_random=3, size_range=(64, 160), tolerance=tolerance)
    assert report.passed, report.text()
    assert report.boxes_diff < 1e-4, report.text()
    sizes = {case.description.split(" x ", 1)[1] for case in report.cases}  # "random B x 3 x H x W"
    assert len(sizes) > 1 and "3 x 96 x 128" not in sizes, sizes
