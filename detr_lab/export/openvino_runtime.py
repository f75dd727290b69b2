"""OpenVINO: an exported ONNX graph converted to OpenVINO IR, and its inference with the PyTorch model's
call contract (needs `openvino`, part of the `export` extra).

    xml = convert_to_openvino("model.onnx", "model.xml")            # FP32 (the default)
    detector = OpenVinoDetector("model.xml", threads=2)
    outputs = detector(images, padding_mask)   # {"pred_logits": [B, Q, C], "pred_boxes": [B, Q, 4]}

The IR is `model.xml` (graph) beside `model.bin` (weights). The detr_lab metadata of the ONNX file
(classes, category ids, config, traced size; see `metadata`) is carried into the IR's runtime info
under "detr_lab", with one more key, "precision": "f32" (weights and inference in float32; the CPU
plugin is told so, since on bfloat16-capable CPUs it otherwise computes in bfloat16) or "f16" (weights
stored as float16, inference at the plugin's low precision: float16, or bfloat16 where the CPU has no
float16). Quantized (INT8) IRs come from `detr_lab.export.quantize`.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from detr_lab.export.dependencies import require
from detr_lab.export.metadata import PREFIX, ExportMetadata, MetadataError
from detr_lab.export.onnx_export import INPUT_NAMES, OUTPUT_NAMES, ExportError
from detr_lab.export.runtime import ExportedRuntime

RT_SECTION = "detr_lab"
PRECISIONS = ("f32", "f16")
REPEAT_TOLERANCE = 1e-4
DYNAMIC_CHECK_SIZE = (1, 128, 128)  # (batch, height, width) of the repeat check for a dynamic IR


class OpenVinoRepeatError(ExportError):
    """OpenVINO returned different outputs for the same input on a compiled model's first and second
    inference (see `OpenVinoDetector.check_repeatable`)."""


def onnx_properties(onnx_path: str | os.PathLike) -> dict[str, str]:
    """The detr_lab metadata properties of an ONNX file (key -> JSON string), as onnxruntime reads them.

    Raises:
        MissingExtraError: onnx is not installed.
    """
    onnx = require("onnx")
    proto = onnx.load(str(onnx_path), load_external_data=False)
    return {p.key: p.value for p in proto.metadata_props if p.key.startswith(PREFIX)}


def save_ir(model, output: str | os.PathLike, *, compress_to_fp16: bool = False) -> Path:
    """Write an `openvino.Model` as `output` (.xml) and its .bin, both by rename from a temporary folder
    beside them (the .bin first), so that no half-written IR is ever under the final names.

    Raises:
        ValueError: `output` does not end in .xml.
    """
    ov = require("openvino")
    output = Path(output)
    if output.suffix != ".xml":
        raise ValueError(f"an OpenVINO model is written as a .xml file (with its .bin); got {output}")
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".ov_", dir=output.parent))
    try:
        ov.save_model(model, str(staging / output.name), compress_to_fp16=compress_to_fp16)
        os.replace(staging / output.with_suffix(".bin").name, output.with_suffix(".bin"))
        os.replace(staging / output.name, output)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return output


def set_metadata(model, properties: dict[str, str], precision: str) -> None:
    """Store detr_lab metadata properties (`PREFIX`-named, JSON values) and the precision ("f32", "f16",
    "int8") in an `openvino.Model`'s runtime info."""
    for key, value in properties.items():
        model.set_rt_info(value, [RT_SECTION, key[len(PREFIX):]])
    model.set_rt_info(precision, [RT_SECTION, "precision"])


def read_metadata(model, source: str) -> tuple[ExportMetadata, str]:
    """(metadata, precision) from an `openvino.Model` written by `convert_to_openvino` or the quantizer.

    Raises:
        MetadataError: naming `source`, when the IR carries no detr_lab metadata.
    """
    if not model.has_rt_info([RT_SECTION, "format"]):
        raise MetadataError(
            f"{source}: no '{RT_SECTION}' runtime info; not a model written by detr_lab's export"
        )
    keys = ("format", "version", "category_ids", "class_names", "config", "traced_size")
    properties = {
        PREFIX + key: model.get_rt_info([RT_SECTION, key]).astype(str)
        for key in keys if model.has_rt_info([RT_SECTION, key])
    }
    precision = (model.get_rt_info([RT_SECTION, "precision"]).astype(str)
                 if model.has_rt_info([RT_SECTION, "precision"]) else "f32")
    return ExportMetadata.from_properties(properties, source), precision


def convert_to_openvino(
    onnx_path: str | os.PathLike, output: str | os.PathLike, *, precision: str = "f32"
) -> Path:
    """Convert a detr_lab ONNX export (`export_onnx`) to OpenVINO IR with `openvino.convert_model`.

    Args:
        onnx_path: the `.onnx` file (its metadata is carried over).
        output: the `.xml` path; the weights go to the `.bin` beside it.
        precision: "f32" (default) or "f16" (weights compressed to float16; verify before use).
    Returns:
        the `.xml` path.
    Raises:
        MissingExtraError: openvino or onnx missing. MetadataError: not a detr_lab export.
        ValueError: an unknown precision, or an `output` not ending in .xml.
    """
    ov = require("openvino")
    if precision not in PRECISIONS:
        raise ValueError(f"OpenVINO precision must be one of {PRECISIONS}, got {precision!r}")
    properties = onnx_properties(onnx_path)
    ExportMetadata.from_properties(properties, str(onnx_path))  # refuse a foreign file before converting
    model = ov.convert_model(str(onnx_path))
    set_metadata(model, properties, precision)
    return save_ir(model, output, compress_to_fp16=precision == "f16")


class OpenVinoDetector(ExportedRuntime):
    """A detr_lab OpenVINO IR run by OpenVINO on the CPU.

    Args:
        path: the `.xml` file (its `.bin` beside it).
        threads: inference threads (`INFERENCE_NUM_THREADS`; default: OpenVINO's choice).
        check: run `check_repeatable` once the model is compiled (on by default).
    Attributes:
        precision: "f32", "f16" or "int8" (from the IR); `inference_precision`: what the compiled model
            computes in (f32 for "f32" and "int8" IRs' float parts).
    Raises:
        FileNotFoundError: no such file. MetadataError: not a detr_lab model.
        MissingExtraError: openvino is not installed. ValueError: OpenVINO cannot read or compile it.
        OpenVinoRepeatError: the compiled model fails `check_repeatable`.
    """

    backend = "openvino"

    def __init__(self, path: str | os.PathLike, *, threads: int | None = None, check: bool = True) -> None:
        ov = require("openvino")
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"OpenVINO model not found: {self.path}")
        core = ov.Core()
        try:
            model = core.read_model(str(self.path))
        except Exception as err:
            raise ValueError(f"{self.path}: OpenVINO cannot read it: {str(err).splitlines()[0]}") from None
        self.metadata, self.precision = read_metadata(model, str(self.path))
        inputs = [port.get_any_name() for port in model.inputs]
        if inputs != list(INPUT_NAMES):
            raise ValueError(f"{self.path}: inputs {inputs}, expected {list(INPUT_NAMES)}")
        config: dict[str, object] = {}
        if self.precision != "f16":
            config["INFERENCE_PRECISION_HINT"] = "f32"
        if threads is not None:
            config["INFERENCE_NUM_THREADS"] = int(threads)
        try:
            self.compiled = core.compile_model(model, "CPU", config)
        except Exception as err:
            raise ValueError(f"{self.path}: OpenVINO cannot compile it: {str(err).splitlines()[0]}") from None
        hint = self.compiled.get_property("INFERENCE_PRECISION_HINT")
        self.inference_precision = hint.to_string() if hasattr(hint, "to_string") else str(hint)
        self.request = self.compiled.create_infer_request()
        if check:
            self.check_repeatable()

    def check_repeatable(self) -> float:
        """Run one random batch twice (the traced size, or `DYNAMIC_CHECK_SIZE` for a dynamic IR) and
        return the largest output difference between the two calls.

        OpenVINO's CPU plugin (2026.4) can compute a graph right on a compiled model's first call and
        differently on every later one: it runs a subgraph with constant inputs that its conversion did
        not fold once, keeps the result, and may then overwrite that buffer in place. The two-stage
        members' fixed-size exports did so (logits off by up to 4) until their encoder proposals were
        built without `CumSum` (`detr_lab.models.two_stage.encoder_proposals`). Checking here means no
        such model is used or written without an error.

        Raises:
            OpenVinoRepeatError: the two calls differ by more than `REPEAT_TOLERANCE`.
        """
        batch, height, width = self.metadata.traced_size or DYNAMIC_CHECK_SIZE
        generator = np.random.default_rng(0)
        images = generator.standard_normal((batch, 3, height, width), dtype=np.float32)
        padding_mask = np.zeros((batch, height, width), bool)
        first = self.run(images, padding_mask)
        second = self.run(images, padding_mask)
        difference = max(float(np.abs(a - b).max()) for a, b in zip(first, second, strict=True))
        if not difference <= REPEAT_TOLERANCE:
            ov = require("openvino")
            raise OpenVinoRepeatError(
                f"{self.path}: OpenVINO {ov.__version__} returned different outputs for the same input on "
                f"this model's first and second inference (largest difference {difference:.3g}), so its "
                "results cannot be trusted; run the ONNX export with onnxruntime instead "
                "(--backend onnxruntime, Predictor.from_onnx)"
            )
        return difference

    def run(self, images: np.ndarray, padding_mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """One inference: float32 `[B, 3, H, W]`, bool `[B, H, W]` -> (logits, boxes) float32 arrays."""
        results = self.request.infer({"images": images, "padding_mask": padding_mask})
        by_name = {port.get_any_name(): value for port, value in results.items()}
        logits, boxes = (np.asarray(by_name[name], np.float32).copy() for name in OUTPUT_NAMES)
        return logits, boxes
