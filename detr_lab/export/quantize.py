"""INT8 post-training quantization of an exported detector with the runtimes' own quantizers:
onnxruntime's static QDQ quantization (`onnxruntime.quantization.quantize_static`) and NNCF's
post-training quantization of an OpenVINO IR (`nncf.quantize`). No quantizer is written here.

    batches, used = calibration_batches(cfg, metadata, count=32)   # numpy feeds, images in them
    quantize_onnxruntime("fp32.onnx", "int8.onnx", batches, float_groups=["box_heads"])
    quantize_openvino("fp32.xml", "int8.xml", batches, float_groups=["box_heads"])

Parts of the graph can stay in float: the candidate groups (`CANDIDATE_GROUPS`) are named by patterns
on the exported node names (`/model/.../sampling_offsets/MatMul`); which of them stay float is decided
by a measured sensitivity analysis (`detr_lab.predict.int8_proof`), never here.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from detr_lab.config import Config
from detr_lab.data.datamodule import DetectionDataModule
from detr_lab.export.dependencies import require
from detr_lab.export.metadata import PREFIX, ExportMetadata
from detr_lab.export.openvino_runtime import RT_SECTION, read_metadata, save_ir, set_metadata
from detr_lab.files import atomic_write

# group -> regular expression searched in node names; the precision-sensitive candidates
CANDIDATE_GROUPS = {
    "box_heads": r"/(bbox_embed|box_head|bbox_head|reg_head|enc_bbox_head|dec_bbox_head)\b",
    "sampling_offsets": r"/sampling_offsets/",
    "attention_weights": r"/attention_weights/",
    "distribution_heads": r"/(lqe|lqe_layers|integral|pre_bbox_head|distribution)\b",
    "score_heads": r"/(class_embed|class_head|score_head|enc_score_head|dec_score_head)\b",
}
QUANTIZED_OPS = ("Conv", "MatMul", "Gemm")  # what the quantizers turn into INT8 kernels
OPENVINO_OPS = ("Convolution", "MatMul")  # the same kernels in an OpenVINO IR
CALIBRATION_SPLITS = ("train", "val")


def group_nodes(node_names: Sequence[str], groups: Sequence[str]) -> list[str]:
    """The names among `node_names` that belong to any of `groups` (keys of `CANDIDATE_GROUPS`).

    Raises:
        ValueError: an unknown group name.
    """
    unknown = sorted(set(groups) - set(CANDIDATE_GROUPS))
    if unknown:
        raise ValueError(f"unknown quantization groups {unknown}; known: {sorted(CANDIDATE_GROUPS)}")
    patterns = [re.compile(CANDIDATE_GROUPS[group]) for group in groups]
    return [name for name in node_names if any(pattern.search(name) for pattern in patterns)]


def onnx_quantizable_nodes(onnx_path: str | os.PathLike) -> list[str]:
    """Names of the Conv / MatMul / Gemm nodes of an ONNX file (the ones INT8 changes)."""
    onnx = require("onnx")
    proto = onnx.load(str(onnx_path), load_external_data=False)
    return [node.name for node in proto.graph.node if node.op_type in QUANTIZED_OPS]


def present_groups(onnx_path: str | os.PathLike) -> dict[str, int]:
    """Candidate group -> number of its quantizable nodes in the file (groups without nodes left out)."""
    names = onnx_quantizable_nodes(onnx_path)
    counts = {group: len(group_nodes(names, [group])) for group in CANDIDATE_GROUPS}
    return {group: count for group, count in counts.items() if count}


def calibration_batches(
    config: Config, metadata: ExportMetadata, count: int, *, split: str = "train"
) -> tuple[list[dict[str, np.ndarray]], int]:
    """`count` images of the config's `split` ("train" or "val") through the evaluation transform, as
    feeds `{"images": float32 [B, 3, H, W], "padding_mask": bool [B, H, W]}` (batches of
    `data.batch_size`; a fixed-size export: padded to its traced size, batches of its traced batch),
    and the number of images in them (fewer than `count` when the split has fewer).

    Raises:
        ValueError: `count` < 1 or an unknown split. DatasetError: an unreadable dataset.
    """
    if count < 1:
        raise ValueError(f"--calibration-images must be >= 1, got {count}")
    if split not in CALIBRATION_SPLITS:
        raise ValueError(f"calibration split must be one of {CALIBRATION_SPLITS}, got {split!r}")
    data = config.data
    if split == "train":  # the training images, read the way validation images are (no augmentation)
        data = dataclasses.replace(data, val_images=data.train_images, val_annotations=data.train_annotations)
    traced = metadata.traced_size
    if traced is not None:
        data = dataclasses.replace(data, batch_size=traced[0])
    cfg = dataclasses.replace(config, data=data, model=metadata.config.model)
    datamodule = DetectionDataModule(cfg, category_ids=metadata.category_ids)
    datamodule.prepare_data()
    datamodule.setup("validate")
    feeds, seen = [], 0
    for images, padding_mask, _ in datamodule.val_dataloader():
        images, padding_mask = images.numpy(), padding_mask.numpy().astype(bool)
        real = min(count - seen, images.shape[0])
        images, padding_mask = images[:real], padding_mask[:real]
        if traced is not None:  # the rest of the traced batch: blank images, as the runtimes fill it
            images, padding_mask = _pad_to(images, padding_mask, traced)
        feeds.append({"images": np.ascontiguousarray(images, np.float32), "padding_mask": padding_mask})
        seen += real
        if seen >= count:
            break
    return feeds, seen


def _pad_to(images: np.ndarray, padding_mask: np.ndarray, traced: tuple[int, int, int]):
    batch, height, width = traced
    count, _, in_height, in_width = images.shape
    padded = np.zeros((batch, 3, height, width), np.float32)
    mask = np.ones((batch, height, width), bool)
    mask[count:] = False  # extra blank images, unpadded (as the runtimes fill a short batch)
    padded[:count, :, : min(in_height, height), : min(in_width, width)] = images[:, :, :height, :width]
    mask[:count, : min(in_height, height), : min(in_width, width)] = padding_mask[:, :height, :width]
    return padded, mask


class _Feeds:
    """onnxruntime's calibration data reader protocol (`get_next` until None) over a list of feeds."""

    def __init__(self, feeds: Sequence[dict[str, np.ndarray]]) -> None:
        self.feeds = list(feeds)
        self.position = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self.position >= len(self.feeds):
            return None
        self.position += 1
        return self.feeds[self.position - 1]

    def rewind(self) -> None:
        self.position = 0


def quantize_onnxruntime(
    onnx_path: str | os.PathLike,
    output: str | os.PathLike,
    feeds: Sequence[dict[str, np.ndarray]],
    *,
    float_groups: Sequence[str] = (),
    quantize_groups: Sequence[str] | None = None,
) -> Path:
    """Static INT8 quantization (QDQ format, symmetric int8 weights per channel, asymmetric uint8
    activations, MinMax calibration on `feeds`) of a detr_lab ONNX file with
    `onnxruntime.quantization.quantize_static`, after onnxruntime's own pre-processing
    (`quant_pre_process`: its graph optimizations fold the constant subgraphs, so that every
    convolution's folded weight and bias are initializers the quantizer can quantize).

    Why these settings (measured, DETR-R50 at 512 x 683, one thread, 2-core Xeon with AVX-512 VNNI;
    FP32 566 ms): int8 activations without pre-processing 668 ms (slower than FP32: weights left in
    float behind dequantize nodes), uint8 activations 430 ms, uint8 after pre-processing 269 ms
    (onnxruntime's x86 kernels are built for uint8 activations with int8 weights).

    Args:
        float_groups: candidate groups whose nodes stay float.
        quantize_groups: when given, only the nodes of these groups are quantized (the sensitivity
            analysis quantizes one group at a time this way); `float_groups` still applies.
    Returns:
        `output`, written atomically, with the FP32 file's metadata.
    Raises:
        MissingExtraError: onnxruntime or onnx missing. ValueError: no feeds, or an unknown group.
    """
    onnx = require("onnx")
    quantization = require("onnxruntime.quantization")
    if not feeds:
        raise ValueError("INT8 calibration needs at least one batch of images")
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = output.with_name(f".{output.name}.quantizing")
    prepared = output.with_name(f".{output.name}.prepared.onnx")
    try:
        quantization.quant_pre_process(str(onnx_path), str(prepared), skip_symbolic_shape=True)
        names = onnx_quantizable_nodes(prepared)  # the node names survive the pre-processing
        excluded = group_nodes(names, float_groups)
        included = None if quantize_groups is None else group_nodes(names, quantize_groups)
        quantization.quantize_static(
            str(prepared), str(staging), _Feeds(feeds), quant_format=quantization.QuantFormat.QDQ,
            op_types_to_quantize=list(QUANTIZED_OPS), per_channel=True,
            activation_type=quantization.QuantType.QUInt8, weight_type=quantization.QuantType.QInt8,
            nodes_to_quantize=included, nodes_to_exclude=excluded,
            calibrate_method=quantization.CalibrationMethod.MinMax,
            extra_options={"ActivationSymmetric": False, "WeightSymmetric": True},
        )
        proto = onnx.load(str(staging))
    finally:
        for leftover in (staging, prepared):
            if leftover.exists():
                leftover.unlink()
    source = onnx.load(str(onnx_path), load_external_data=False)
    del proto.metadata_props[:]
    proto.metadata_props.extend(source.metadata_props)
    with atomic_write(output, "wb") as handle:
        handle.write(proto.SerializeToString())
    return output


def quantize_openvino(
    xml_path: str | os.PathLike,
    output: str | os.PathLike,
    feeds: Sequence[dict[str, np.ndarray]],
    *,
    float_groups: Sequence[str] = (),
    quantize_groups: Sequence[str] | None = None,
) -> Path:
    """NNCF post-training quantization (`nncf.quantize`, transformer model type) of a detr_lab FP32
    OpenVINO IR, calibrated on `feeds`; nodes of `float_groups` go to NNCF's ignored scope (by name
    pattern). With `quantize_groups`, every quantizable node outside those groups is ignored too.

    Returns:
        the `.xml` written (with its `.bin`), its metadata precision "int8".
    Raises:
        MissingExtraError: openvino or nncf missing. ValueError: no feeds, or an unknown group.
    """
    ov = require("openvino")
    nncf = require("nncf")
    if not feeds:
        raise ValueError("INT8 calibration needs at least one batch of images")
    model = ov.Core().read_model(str(xml_path))
    read_metadata(model, str(xml_path))  # refuse a foreign IR before quantizing
    names = [op.get_friendly_name() for op in model.get_ops() if op.get_type_name() in OPENVINO_OPS]
    ignored = set(group_nodes(names, float_groups))
    if quantize_groups is not None:
        ignored |= set(names) - set(group_nodes(names, quantize_groups))
    dataset = nncf.Dataset(list(feeds))
    quantized = nncf.quantize(
        model, dataset, subset_size=sum(int(feed["images"].shape[0]) for feed in feeds),
        model_type=nncf.ModelType.TRANSFORMER, ignored_scope=nncf.IgnoredScope(names=sorted(ignored)),
    )
    set_metadata(quantized, _rt_properties(model), "int8")
    return save_ir(quantized, output)


def _rt_properties(model) -> dict[str, str]:
    """The detr_lab runtime-info entries of an IR as metadata properties (prefixed keys)."""
    keys = ("format", "version", "category_ids", "class_names", "config", "traced_size")
    return {PREFIX + key: model.get_rt_info([RT_SECTION, key]).astype(str)
            for key in keys if model.has_rt_info([RT_SECTION, key])}
