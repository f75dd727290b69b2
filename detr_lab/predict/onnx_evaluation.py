"""COCO mAP of an exported model run by onnxruntime or OpenVINO (`tools/eval.py --backend onnxruntime`
or `--backend openvino`).

    result = evaluate_onnx("configs/detr_r50.yaml", "detr-r50.onnx")   # needs the export extra
    result = evaluate_onnx("configs/detr_r50.yaml", "detr-r50.xml", backend="openvino")

The counterpart of `detr_lab.engine.evaluate.evaluate_checkpoint`: the same validation batches and
`evaluate_model`, with the model, classes and category ids from the ONNX file's metadata.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence

import torch

from detr_lab.checkpoints import split_model_overrides
from detr_lab.config import load_config
from detr_lab.engine.evaluate import EvalOptions, EvaluationResult, evaluate_model, evaluation_data
from detr_lab.errors import InputError
from detr_lab.export.backends import open_runtime


def evaluate_onnx(
    config_path: str | os.PathLike,
    model_path: str | os.PathLike,
    *,
    overrides: Sequence[str] = (),
    output: str | os.PathLike | None = None,
    batch_size: int | None = None,
    progress: bool = True,
    threads: int | None = None,
    options: EvalOptions | None = None,
    backend: str = "onnxruntime",
) -> EvaluationResult:
    """`evaluate_checkpoint` for an exported model, run by onnxruntime (an `.onnx` file) or OpenVINO
    (`backend="openvino"`, an `.xml` IR) on the CPU.

    The model config, classes and category ids come from the ONNX file's metadata (see
    `detr_lab.export`); the YAML gives the dataset. Validation batches are the PyTorch path's
    (same transform, padding and batch size), so the two APs are directly comparable.
    Args:
        overrides: dotted `key=value` for the YAML's data settings (`model.*` ones are refused: the
            exported graph is fixed).
        output: the COCO results json (default: `default_results_path` of the ONNX file).
        batch_size: images per forward pass (default `data.batch_size`).
        threads: runtime threads (default: the runtime's choice, one per core).
        options: the split or annotation file, the COCO backend, the report (see `EvalOptions`).
        backend: "onnxruntime" or "openvino".
    Raises:
        InputError: a `model.*` override. FileNotFoundError: no such model file. MissingExtraError:
        the runtime missing. MetadataError: a file not written by detr_lab's export.
    """
    options = options or EvalOptions()
    model_overrides, data_overrides = split_model_overrides(overrides)
    if model_overrides:
        raise InputError(f"model overrides {model_overrides} cannot change an exported ONNX model")
    if batch_size is not None:
        data_overrides.append(f"data.batch_size={batch_size}")
    cfg = evaluation_data(load_config(config_path, data_overrides), options)
    detector = open_runtime(backend, model_path, threads=threads)
    cfg = dataclasses.replace(cfg, model=detector.metadata.config.model)
    return evaluate_model(
        cfg, detector, detector.metadata.category_ids, torch.device("cpu"), output=output, progress=progress,
        source=model_path, class_names=detector.metadata.class_names, options=options,
    )
