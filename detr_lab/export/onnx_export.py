"""Export a detector to ONNX: `images` + `padding_mask` in, final-layer `pred_logits` + `pred_boxes` out.

    path = export_onnx(loaded.model, "model.onnx", metadata=ExportMetadata.from_loaded(loaded),
                       height=800, width=1066, dynamic=True)

The graph is traced with the TorchScript-based `torch.onnx.export` (dynamo=False): the model runs once
on an example batch, so the export path avoids host-side reads of tensor values. Deformable attention
is exported through a core of standard ONNX operators: "gather" (bilinear gathers, valid for every
input size, TensorRT-safe) or "grid_sample" (ONNX `GridSample`, opset >= 16; the per-level split
sizes are traced as constants, so only for a fixed input size). "auto" (the default) takes
"grid_sample" for a fixed-size export at opset >= 16 and "gather" otherwise: on onnxruntime's CPU
kernels GridSample was the faster of the two at every shape measured (README, "Deformable attention
in ONNX"). TensorRT miscompiles `grid_sample` (NVIDIA/TensorRT#4813): export for it with "gather".
RepVGG blocks (RT-DETR's hybrid encoder) are fused into one convolution each, as the official RT-DETR
export does, and HGNetv2's learnable affine blocks fold into the batch norm and a clamp
(`detr_lab.models.fusion`). Any detector whose forward returns
`pred_logits` and `pred_boxes` exports unchanged; ACT's adaptive clustering attention is refused (its
cluster counts are data-dependent).
"""

from __future__ import annotations

import copy
import io
import os
import warnings
from pathlib import Path

import torch
from torch import Tensor, nn

from detr_lab.export.dependencies import require
from detr_lab.export.metadata import ExportMetadata
from detr_lab.files import atomic_write
from detr_lab.models.attention.clustering import AdaptiveClusteringAttention
from detr_lab.models.attention.deformable import MultiScaleDeformableAttention, set_deformable_core
from detr_lab.models.backbones.vit import ViTBackbone
from detr_lab.models.fusion import fold_learnable_affine_blocks, fuse_repvgg_blocks

INPUT_NAMES = ("images", "padding_mask")
OUTPUT_NAMES = ("pred_logits", "pred_boxes")
DEFORMABLE_CORES = {"gather": "gather", "grid_sample": "reference"}  # export name -> core_impl
CORE_CHOICES = ("auto", *DEFORMABLE_CORES)
DEFAULT_OPSET = 17
MIN_OPSET = {"gather": 13, "grid_sample": 16}


class ExportError(ValueError):
    """A model or an export setting that cannot be exported; the message says why and what to do."""


class ExportedDetector(nn.Module):
    """The traced interface: `(images [B, 3, H, W] float, padding_mask [B, H, W] bool, True = padding)`
    -> `(pred_logits [B, Q, C], pred_boxes [B, Q, 4] normalized cxcywh)` of the final decoder layer."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: Tensor, padding_mask: Tensor) -> tuple[Tensor, Tensor]:
        outputs = self.model(images, padding_mask)
        return outputs["pred_logits"], outputs["pred_boxes"]


def check_exportable(model: nn.Module) -> None:
    """Raise `ExportError` for a model holding a module ONNX cannot express: ACT's clustering, or a
    ViT backbone (its position embeddings are resampled per image to a grid read from the padding
    mask, with timm's antialiased bicubic resize, which has no ONNX operator)."""
    modules = list(model.modules())
    if any(isinstance(module, AdaptiveClusteringAttention) for module in modules):
        raise ExportError(
            "ACT (adaptive clustering attention) cannot be exported: its number of clusters depends on "
            "the image content, which a static ONNX graph cannot express; export the plain-attention "
            "model instead with --set model.encoder.attention=plain (same weights)"
        )
    if any(isinstance(module, ViTBackbone) for module in modules):
        raise ExportError(
            "ViT backbones cannot be exported: each image's position embeddings are resampled to its "
            "own patch grid, read from the padding mask at run time, with an antialiased bicubic resize "
            "that ONNX has no operator for; export a model with a ResNet or ConvNeXt backbone"
        )


def prepare_for_export(model: nn.Module, deformable_core: str = "gather") -> ExportedDetector:
    """A float32 CPU eval-mode copy of `model` with its deformable attention on the export core and
    its RepVGG blocks fused into single convolutions (`fusion.fuse_repvgg_blocks`; `model` itself is
    left as it is).

    Raises:
        ExportError: ACT attention, or an unknown `deformable_core` ("gather" or "grid_sample").
    """
    if deformable_core not in DEFORMABLE_CORES:
        raise ExportError(
            f"deformable core must be one of {sorted(DEFORMABLE_CORES)}, got {deformable_core!r}"
        )
    check_exportable(model)
    copied = copy.deepcopy(model).float().cpu().eval()
    set_deformable_core(copied, DEFORMABLE_CORES[deformable_core])
    fuse_repvgg_blocks(copied)
    fold_learnable_affine_blocks(copied)
    return ExportedDetector(copied).eval()


def resolve_deformable_core(deformable_core: str, *, dynamic: bool, opset: int) -> str:
    """The export core that `deformable_core` names: "gather" or "grid_sample" as given; "auto" ->
    "grid_sample" for a fixed-size export at opset >= 16, else "gather" (see the module docstring).

    Raises:
        ExportError: a name outside `CORE_CHOICES`.
    """
    if deformable_core not in CORE_CHOICES:
        raise ExportError(f"deformable core must be one of {list(CORE_CHOICES)}, got {deformable_core!r}")
    if deformable_core != "auto":
        return deformable_core
    return "grid_sample" if not dynamic and opset >= MIN_OPSET["grid_sample"] else "gather"


def example_inputs(batch: int, height: int, width: int, *, padded: bool = True) -> tuple[Tensor, Tensor]:
    """A random normalized batch `[B, 3, H, W]` and its padding mask `[B, H, W]` (True = padding).

    With `padded` and B > 1, the second image has padding at its bottom and right, so that the traced
    graph contains the masking of padded positions.
    """
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(batch, 3, height, width, generator=generator)
    padding_mask = torch.zeros(batch, height, width, dtype=torch.bool)
    if padded:
        padding_mask[-1, (3 * height) // 4 :, :] = True
        padding_mask[-1, :, (3 * width) // 4 :] = True
        images = images.masked_fill(padding_mask[:, None], 0.0)
    return images, padding_mask


def export_onnx(
    model: nn.Module,
    output: str | os.PathLike,
    *,
    metadata: ExportMetadata,
    height: int = 800,
    width: int = 1066,
    batch: int = 2,
    dynamic: bool = False,
    opset: int = DEFAULT_OPSET,
    deformable_core: str = "auto",
) -> Path:
    """Trace `model` at `[batch, 3, height, width]` and write the ONNX file atomically.

    Args:
        model: a detector (`detr_lab.models.detector.Detector`, or any module with the same forward).
        output: the `.onnx` path (its folder is created).
        metadata: classes, category ids and the model config, stored as ONNX metadata properties.
        height, width, batch: the traced input size; the graph accepts only this size unless `dynamic`.
        dynamic: batch size, height and width become dynamic axes (needs the "gather" core).
        opset: ONNX opset (>= 13; >= 16 for "grid_sample").
        deformable_core: "auto" (default), "gather" or "grid_sample" (see the module docstring).
    Raises:
        ExportError: ACT attention, a bad core/opset/size combination.
        MissingExtraError: onnx is not installed.
    """
    onnx = require("onnx")
    deformable_core = resolve_deformable_core(deformable_core, dynamic=dynamic, opset=opset)
    if min(height, width, batch) < 1:
        raise ExportError(f"export size must be positive, got batch {batch}, height {height}, width {width}")
    if opset < MIN_OPSET.get(deformable_core, 13):
        raise ExportError(
            f"--opset {opset} is too old for the {deformable_core!r} deformable core "
            f"(needs >= {MIN_OPSET[deformable_core]})"
        )
    if dynamic and deformable_core == "grid_sample" and _has_deformable(model):
        raise ExportError(
            "the grid_sample deformable core traces the level sizes as constants: export it without "
            "--dynamic, or use the gather core"
        )
    wrapper = prepare_for_export(model, deformable_core)
    inputs = example_inputs(batch, height, width)
    dynamic_axes = None
    if dynamic:
        dynamic_axes = {
            "images": {0: "batch", 2: "height", 3: "width"},
            "padding_mask": {0: "batch", 1: "height", 2: "width"},
            "pred_logits": {0: "batch"},
            "pred_boxes": {0: "batch"},
        }
    buffer = io.BytesIO()
    with torch.no_grad(), warnings.catch_warnings():
        # Shape arithmetic traced as constants is intended for the fixed parts (level count, head
        # sizes); input-size dependence is checked by `verify_onnx` on other sizes.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", DeprecationWarning)  # the TorchScript exporter is deprecated
        torch.onnx.export(
            wrapper,
            inputs,
            buffer,
            input_names=list(INPUT_NAMES),
            output_names=list(OUTPUT_NAMES),
            dynamic_axes=dynamic_axes,
            opset_version=opset,
            do_constant_folding=True,
            dynamo=False,
        )
    proto = onnx.load_from_string(buffer.getvalue())
    drop_trailing_empty_inputs(proto.graph)
    metadata.store(proto, traced_size=None if dynamic else (batch, height, width))
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(output, "wb") as handle:  # temporary file, fsync, rename
        handle.write(proto.SerializeToString())
    return output


def drop_trailing_empty_inputs(graph, op_types: tuple[str, ...] = ("Pad",)) -> int:
    """Remove the empty names at the end of the input lists of `graph`'s nodes of `op_types` (in
    place; an `onnx.GraphProto`); returns how many were removed.

    An omitted optional input may be written as an empty name or left off the end of the list: the
    ONNX spec gives both the same meaning. The TorchScript exporter writes `F.pad` as
    `Pad(data, pads, "")`, and onnxruntime (1.32) fuses a zero `Pad` into the `Conv` after it only
    when the list ends at `pads`: HGNetv2's stem (D-FINE, DEIM) saved an unfused pad and a layout
    reorder over a 321 x 321 map, about 0.7 ms of D-FINE-N's 100 ms at 1 thread. Only `Pad` by
    default: the one case measured.
    """
    removed = 0
    for node in graph.node:
        if node.op_type not in op_types:
            continue
        names = list(node.input)
        while names and names[-1] == "":
            names.pop()
        if len(names) != len(node.input):
            removed += len(node.input) - len(names)
            del node.input[:]
            node.input.extend(names)
    return removed


def _has_deformable(model: nn.Module) -> bool:
    return any(isinstance(module, MultiScaleDeformableAttention) for module in model.modules())
