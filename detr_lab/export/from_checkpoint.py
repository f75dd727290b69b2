"""Checkpoint -> ONNX file (+ accuracy proof): what `tools/export.py` runs.

    result = export_checkpoint("last.ckpt", "model.onnx", dynamic=True, verify=True,
                               config_path="configs/demo.yaml")
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from detr_lab.checkpoints import load_checkpoint, split_model_overrides
from detr_lab.config import load_config
from detr_lab.errors import InputNotFoundError
from detr_lab.export.metadata import ExportMetadata
from detr_lab.export.onnx_export import DEFAULT_OPSET, export_onnx
from detr_lab.export.verify import DEFAULT_TOLERANCE, VerifyReport, verify_onnx


@dataclass
class ExportResult:
    path: Path  # the written .onnx file
    report: VerifyReport | None  # with verify


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
    deformable_core: str = "gather",
    verify: bool = False,
    config_path: str | os.PathLike | None = None,
    num_random: int = 3,
    num_val_batches: int = 2,
    tolerance: float = DEFAULT_TOLERANCE,
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
            traced side to the larger one) and, with `config_path`, validation batches.
    Raises:
        InputNotFoundError: a missing checkpoint or config. ExportError: a model that cannot be exported.
        CheckpointError / ConfigError: an unreadable checkpoint or a bad override.
    """
    checkpoint = Path(checkpoint)
    if not checkpoint.is_file():
        raise InputNotFoundError(f"checkpoint not found: {checkpoint}")
    if config_path is not None and not Path(config_path).is_file():
        raise InputNotFoundError(f"config not found: {config_path}")
    model_overrides, data_overrides = split_model_overrides(list(overrides))
    loaded = load_checkpoint(checkpoint, overrides=model_overrides)
    height, width = traced_size(loaded.config, height, width)
    path = export_onnx(
        loaded.model,
        output,
        metadata=ExportMetadata.from_loaded(loaded),
        height=height,
        width=width,
        batch=batch if batch is not None else (2 if dynamic else 1),
        dynamic=dynamic,
        opset=opset,
        deformable_core=deformable_core,
    )
    report = None
    if verify:
        config = load_config(config_path, data_overrides) if config_path is not None else None
        report = verify_onnx(
            loaded.model,
            path,
            config=config,
            num_random=num_random,
            num_val_batches=num_val_batches,
            size_range=(max(32, min(height, width) // 2), max(height, width)),
            tolerance=tolerance,
        )
    return ExportResult(path, report)
