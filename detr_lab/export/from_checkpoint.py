"""Checkpoint -> ONNX file or OpenVINO IR (+ accuracy proof): what `tools/export.py` runs.

    result = export_checkpoint("last.ckpt", "model.onnx", dynamic=True, verify=True,
                               config_path="configs/demo.yaml")
    result = export_checkpoint("last.ckpt", "model.xml", format="openvino", verify=True)

An OpenVINO IR is converted from the ONNX graph (`openvino_runtime.convert_to_openvino`); the ONNX
file is kept only where `onnx_output` names it. An FP16 IR is written only when its proof passes.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from detr_lab.checkpoints import load_checkpoint, split_model_overrides
from detr_lab.config import load_config
from detr_lab.errors import InputNotFoundError
from detr_lab.export.dependencies import require
from detr_lab.export.metadata import ExportMetadata
from detr_lab.export.onnx_export import DEFAULT_OPSET, ExportError, export_onnx
from detr_lab.export.openvino_runtime import (
    PRECISIONS,
    OpenVinoDetector,
    OpenVinoRepeatError,
    convert_to_openvino,
)
from detr_lab.export.verify import DEFAULT_TOLERANCE, VerifyReport, verify_onnx, verify_runtime

FORMATS = ("onnx", "openvino")


@dataclass
class ExportResult:
    path: Path | None  # the written .onnx or .xml file (None: an FP16 IR that failed its proof)
    report: VerifyReport | None  # with verify
    onnx_path: Path | None = None  # the ONNX graph (for "openvino": only if `onnx_output` was given)


DEFAULT_SIZE = (800, 1066)  # (height, width) traced for the DETR family's aspect-preserving inputs


def traced_size(config, height: int | None, width: int | None) -> tuple[int, int]:
    """(height, width) to trace: the given sides, else the model's square input size for the rtdetr
    policy (its images are never another size), else `DEFAULT_SIZE`."""
    augment = config.data.augment
    default = (augment.square_size,) * 2 if augment.policy == "rtdetr" else DEFAULT_SIZE
    return (height or default[0], width or default[1])


def export_checkpoint(
    checkpoint: str | os.PathLike,
    output: str | os.PathLike,
    *,
    overrides: Sequence[str] = (),
    height: int | None = None,
    width: int | None = None,
    batch: int | None = None,
    dynamic: bool = False,
    opset: int = DEFAULT_OPSET,
    deformable_core: str = "auto",
    verify: bool = False,
    config_path: str | os.PathLike | None = None,
    num_random: int = 3,
    num_val_batches: int = 2,
    tolerance: float = DEFAULT_TOLERANCE,
    format: str = "onnx",
    precision: str = "f32",
    onnx_output: str | os.PathLike | None = None,
) -> ExportResult:
    """Load any checkpoint `load_checkpoint` reads, export it, optionally verify it with onnxruntime.

    Args:
        overrides: `model.*=...` ones change the checkpoint's model (e.g. `model.encoder.attention=plain`
            for an ACT checkpoint); others apply to `config_path`'s data settings.
        height, width, batch: traced input size (batch default: 2 with `dynamic`, else 1). None: the
            size the checkpoint's own evaluation feeds for a square-input policy (`data.augment.policy:
            rtdetr`: `square_size` x `square_size`), else 800 x 1066.
        dynamic: dynamic batch size, height and width.
        verify: run `verify_onnx`: random batches (a dynamic export: image sides from half the smaller
            traced side to the larger one) and, with `config_path`, validation batches; with "openvino"
            the IR is verified (run by OpenVINO).
        format: "onnx" (default) or "openvino" (`output` is then the .xml; its .bin beside it).
        precision: OpenVINO only: "f32" (default) or "f16", which needs `verify` and is written only
            when the proof passes.
        onnx_output: "openvino": where to keep the intermediate ONNX file (default: not kept).
    Raises:
        InputNotFoundError: a missing checkpoint or config. ExportError: a model that cannot be exported,
        a bad format / precision combination. MissingExtraError: onnx / onnxruntime / openvino missing.
        CheckpointError / ConfigError: an unreadable checkpoint or a bad override.
    """
    if format not in FORMATS:
        raise ExportError(f"export format must be one of {FORMATS}, got {format!r}")
    if precision not in PRECISIONS or (precision != "f32" and format != "openvino"):
        raise ExportError(f"precision {precision!r}: the ONNX export is FP32; OpenVINO takes {PRECISIONS}")
    if precision == "f16" and not verify:
        raise ExportError("an FP16 OpenVINO model is written only after its proof: add --verify")
    require("onnx")
    if format == "openvino":
        require("openvino")  # before the export's work
    checkpoint = Path(checkpoint)
    if not checkpoint.is_file():
        raise InputNotFoundError(f"checkpoint not found: {checkpoint}")
    if config_path is not None and not Path(config_path).is_file():
        raise InputNotFoundError(f"config not found: {config_path}")
    model_overrides, data_overrides = split_model_overrides(list(overrides))
    loaded = load_checkpoint(checkpoint, overrides=model_overrides)
    height, width = traced_size(loaded.config, height, width)
    output = Path(output)
    if format == "openvino" and output.suffix != ".xml":
        raise ExportError(f"an OpenVINO model is written as a .xml file (with its .bin); got {output}")
    with tempfile.TemporaryDirectory(prefix=".export_", dir=_existing_parent(output)) as scratch:
        onnx_path = output if format == "onnx" else Path(onnx_output or Path(scratch) / "model.onnx")
        onnx_path = export_onnx(
            loaded.model,
            onnx_path,
            metadata=ExportMetadata.from_loaded(loaded),
            height=height,
            width=width,
            batch=batch if batch is not None else (2 if dynamic else 1),
            dynamic=dynamic,
            opset=opset,
            deformable_core=deformable_core,
        )
        path = onnx_path
        if format == "openvino":
            staged = Path(scratch) / output.name
            convert_to_openvino(onnx_path, staged, precision=precision)
            path = staged
        report = None
        if verify:
            config = load_config(config_path, data_overrides) if config_path is not None else None
            size_range = (max(32, min(height, width) // 2), max(height, width))
            options = dict(config=config, num_random=num_random, num_val_batches=num_val_batches,
                           size_range=size_range, tolerance=tolerance)
            if format == "onnx":
                report = verify_onnx(loaded.model, path, **options)
            else:
                report = verify_runtime(loaded.model, OpenVinoDetector(path), **options)
        if format == "openvino":
            if report is None:  # the repeat check only (`verify` built a detector, so it ran there)
                try:
                    OpenVinoDetector(path)
                except OpenVinoRepeatError as err:  # nothing written; name the file asked for
                    raise OpenVinoRepeatError(str(err).replace(str(staged), str(output))) from None
            if precision == "f16" and not report.passed:
                return ExportResult(None, report, Path(onnx_output) if onnx_output else None)
            os.replace(staged.with_suffix(".bin"), output.with_suffix(".bin"))
            os.replace(staged, output)
            path = output
    return ExportResult(path, report, onnx_path if format == "onnx" or onnx_output else None)


def _existing_parent(output: Path) -> Path:
    """`output`'s folder, created (the scratch folder lives there so that files move by rename)."""
    output.parent.mkdir(parents=True, exist_ok=True)
    return output.parent
