"""INT8 with an accuracy proof: a measured sensitivity analysis chooses what stays float, and the INT8
model is written only when its COCO AP is within `max_ap_drop` points of the FP32 model's.

    report = quantize_with_proof("fp32.onnx", "int8.onnx", cfg, backend="onnxruntime",
                                 calibration_images=32, max_ap_drop=1.0)
    print(report.text()); report.written   # False: refused, no INT8 file

The analysis, all on the validation split of `cfg` (COCO AP in points, 0-100):
1. the FP32 model's AP;
2. "base": every quantizable node INT8 except the candidate groups (`quantize.CANDIDATE_GROUPS`: box
   regression heads, sampling offsets, attention weights, distribution heads, score heads), which
   stay float;
3. each candidate group alone quantized on top of the base: its cost is the AP it loses against the
   base (also reported: the largest change of logits and boxes on the calibration batches);
4. groups are quantized in order of increasing cost while the base's drop plus the summed costs stay
   within `max_ap_drop`; the others stay float, and the report says why (their measured cost);
5. the chosen model is quantized and evaluated: its drop against FP32 decides. Over `max_ap_drop`
   nothing is written (unless `force`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from detr_lab.config import Config
from detr_lab.engine.evaluate import evaluate_model
from detr_lab.export.backends import SUFFIXES, open_runtime
from detr_lab.export.quantize import (
    calibration_batches,
    present_groups,
    quantize_onnxruntime,
    quantize_openvino,
)
from detr_lab.files import atomic_write_text

DEFAULT_MAX_AP_DROP = 1.0


@dataclass
class Measure:
    """One quantized variant: what stayed float and what it scored."""

    name: str  # "fp32", "base", "group:<name>", "int8"
    float_groups: list[str]
    ap: float  # COCO AP, points (0-100)
    ap50: float
    logits_diff: float = 0.0  # largest |INT8 - FP32| on the calibration batches
    boxes_diff: float = 0.0  # normalized cxcywh


@dataclass
class Int8Report:
    """The proof: FP32 and INT8 AP on the validation set, the sensitivity measurements, the verdict."""

    backend: str
    calibration_images: int  # used (the split may hold fewer than requested)
    calibration_split: str
    max_ap_drop: float
    calibration_requested: int = 0
    measures: list[Measure] = field(default_factory=list)
    kept_float: dict[str, str] = field(default_factory=dict)  # group -> why
    quantized_groups: list[str] = field(default_factory=list)
    written: bool = False
    forced: bool = False
    output: str | None = None

    def measure(self, name: str) -> Measure:
        return next(m for m in self.measures if m.name == name)

    @property
    def ap_drop(self) -> float:
        """FP32 AP minus INT8 AP, in points."""
        return self.measure("fp32").ap - self.measure("int8").ap

    @property
    def passed(self) -> bool:
        return self.ap_drop <= self.max_ap_drop

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "ap_drop": self.ap_drop, "passed": self.passed}

    def text(self) -> str:
        """A few lines: each measurement, what stayed float and why, the verdict."""
        fp32 = self.measure("fp32")
        fewer = (f" (of {self.calibration_requested} requested: the split has no more)"
                 if self.calibration_images < self.calibration_requested else "")
        lines = [f"INT8 ({self.backend}), calibrated on {self.calibration_images} {self.calibration_split} "
                 f"images{fewer}; COCO AP on the validation set:"]
        for m in self.measures:
            cost = "" if m.name == "fp32" else f", {m.ap - fp32.ap:+.2f} vs FP32"
            diffs = ("" if m.name == "fp32"
                     else f", max |diff| logits {m.logits_diff:.3g} boxes {m.boxes_diff:.3g}")
            lines.append(f"  {m.name}: AP {m.ap:.2f} AP50 {m.ap50:.2f}{cost}{diffs}")
        lines.append(f"  quantized candidate groups: {', '.join(self.quantized_groups) or 'none'}")
        for group, why in self.kept_float.items():
            lines.append(f"  kept float: {group} ({why})")
        verdict = "PASSED" if self.passed else "FAILED"
        lines.append(f"int8 {verdict}: AP {fp32.ap:.2f} (FP32) -> {self.measure('int8').ap:.2f} (INT8), "
                     f"drop {self.ap_drop:.2f} points (max {self.max_ap_drop:g})")
        return "\n".join(lines)


def quantize_with_proof(
    fp32_path: str | os.PathLike,
    output: str | os.PathLike,
    config: Config,
    *,
    backend: str = "onnxruntime",
    onnx_path: str | os.PathLike | None = None,
    calibration_images: int = 32,
    calibration_split: str = "train",
    max_ap_drop: float = DEFAULT_MAX_AP_DROP,
    force: bool = False,
    analyze: bool = True,
    report_path: str | os.PathLike | None = None,
) -> Int8Report:
    """Quantize an FP32 export to INT8 after a measured sensitivity analysis; write it only when the
    COCO AP drop on the validation set of `config` is at most `max_ap_drop` points (or `force`).

    Args:
        fp32_path: the FP32 `.onnx` (backend "onnxruntime") or `.xml` (backend "openvino").
        output: the INT8 file to write (`.onnx`, or `.xml` with its `.bin`).
        config: its `data` section gives the calibration and validation images.
        onnx_path: the ONNX file the IR was converted from (names the candidate groups; default
            `fp32_path`, for onnxruntime).
        calibration_split: "train" or "val" images for calibration.
        analyze: False skips steps 2-4 (every candidate group quantized).
        report_path: the json report (written in every case, also when refused).
    Returns:
        the `Int8Report` (`written`: whether `output` was written).
    Raises:
        ValueError: a negative `max_ap_drop`, a bad backend or calibration count. DatasetError: an
        unreadable dataset. MissingExtraError: the runtime or its quantizer is missing.
    """
    if max_ap_drop < 0:
        raise ValueError(f"--max-ap-drop must be >= 0, got {max_ap_drop}")
    if backend not in SUFFIXES:
        raise ValueError(f"INT8 backend must be one of {sorted(SUFFIXES)}, got {backend!r}")
    quantize = quantize_onnxruntime if backend == "onnxruntime" else quantize_openvino
    onnx_path = onnx_path or fp32_path
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    report = Int8Report(backend, calibration_images, calibration_split, max_ap_drop,
                        calibration_requested=calibration_images, forced=force)
    fp32 = open_runtime(backend, fp32_path)
    cfg = dataclasses.replace(config, model=fp32.metadata.config.model)
    feeds, report.calibration_images = calibration_batches(config, fp32.metadata, calibration_images,
                                                           split=calibration_split)
    reference = [fp32(torch.from_numpy(f["images"]), torch.from_numpy(f["padding_mask"])) for f in feeds]
    groups = list(present_groups(onnx_path))
    with tempfile.TemporaryDirectory(prefix=".int8_", dir=output.parent) as scratch:
        scratch = Path(scratch)
        suffix = SUFFIXES[backend]

        def measure(name: str, float_groups: list[str]) -> Measure:
            path = scratch / f"{name.replace(':', '_')}{suffix}"
            quantize(fp32_path, path, feeds, float_groups=float_groups)
            detector = open_runtime(backend, path)
            return _measure(name, float_groups, detector, cfg, scratch, reference, feeds)

        report.measures.append(_measure("fp32", groups, fp32, cfg, scratch, None, feeds))
        fp32_ap = report.measure("fp32").ap
        if analyze and groups:
            base = measure("base", groups)
            report.measures.append(base)
            costs = {}
            for group in groups:
                others = [g for g in groups if g != group]
                single = measure(f"group:{group}", others)
                report.measures.append(single)
                costs[group] = base.ap - single.ap
            budget = max_ap_drop - (fp32_ap - base.ap)
            spent = 0.0
            for group in sorted(groups, key=lambda g: (costs[g], report.measure(f"group:{g}").boxes_diff)):
                if spent + max(costs[group], 0.0) <= budget:
                    report.quantized_groups.append(group)
                    spent += max(costs[group], 0.0)
                else:
                    report.kept_float[group] = (
                        f"quantized on top of the base it costs {costs[group]:.2f} AP; the base drops "
                        f"{fp32_ap - base.ap:.2f} and the groups already quantized {spent:.2f}, so with it "
                        f"the drop would pass --max-ap-drop {max_ap_drop:g}"
                    )
        else:
            report.quantized_groups = list(groups)
        final = measure("int8", [g for g in groups if g not in report.quantized_groups])
        report.measures.append(final)
        if report.passed or force:
            _move(scratch / f"int8{suffix}", output, backend)
            report.written, report.output = True, str(output)
    if report_path is not None:
        atomic_write_text(Path(report_path), json.dumps(report.to_dict(), indent=2))
    return report


def _measure(name, float_groups, detector, cfg, scratch: Path, reference, feeds) -> Measure:
    result = evaluate_model(cfg, detector, detector.metadata.category_ids, torch.device("cpu"),
                            output=scratch / f"{name.replace(':', '_')}.json", progress=False,
                            source=detector.path)
    measure = Measure(name, list(float_groups), 100.0 * result.stats["AP"], 100.0 * result.stats["AP50"])
    if reference is not None:
        for expected, feed in zip(reference, feeds, strict=True):
            got = detector(torch.from_numpy(feed["images"]), torch.from_numpy(feed["padding_mask"]))
            measure.logits_diff = max(measure.logits_diff,
                                      float((got["pred_logits"] - expected["pred_logits"]).abs().max()))
            measure.boxes_diff = max(measure.boxes_diff,
                                     float((got["pred_boxes"] - expected["pred_boxes"]).abs().max()))
    return measure


def _move(source: Path, output: Path, backend: str) -> None:
    """The quantized file from the scratch folder to `output` (an IR: .bin first, then .xml)."""
    if backend == "openvino":
        os.replace(source.with_suffix(".bin"), output.with_suffix(".bin"))
    os.replace(source, output)
