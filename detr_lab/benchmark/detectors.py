"""Speed, memory, FLOPs and size of detectors built from configs (the library behind tools/benchmark.py).

Machine description, timer, memory/FLOP counters and report writing are the package's shared
`machine`, `timer`, `measure` and `report` modules.

    report = run_benchmark(["configs/detr_r50.yaml"], BenchmarkSettings(device="cpu", runs=5))
    print(format_report(report))
    write_report(report, "runs/benchmark.json")

Models are built from their configs with random weights (`model.backbone.pretrained` is forced off,
nothing is downloaded) and measured in two modes (a third on request), in the same process and on
the same weights:

- "reference": the straightforward path. Plain attention computes `softmax(q k^T / sqrt(d)) v` step
  by step (as `nn.MultiheadAttention` in the reference DETR code), deformable attention samples
  each level with `F.grid_sample` (core "reference"), no inference rewrites.
- "fast": plain attention on `scaled_dot_product_attention`, deformable attention on the device's
  fast core ("auto"), and for inference `optimize_for_inference` (frozen batch norms folded into
  the convolutions, chunked feed-forward blocks, channels-last convolutions).
- "onnxruntime" (only when asked for; export extra): the model exported to ONNX at the case's fixed
  size (`detr_lab.export`, its default deformable core) and run by onnxruntime on the CPU with
  `threads` intra-op threads; no breakdown.
- "openvino", "onnxruntime_int8", "openvino_int8" (only when asked for; export extra): the same export
  converted to OpenVINO IR (FP32), or quantized to INT8 (onnxruntime static QDQ / NNCF, calibrated on
  the timed batch: latency only), run on the CPU with `threads` threads; no breakdown.
- "fast_bf16" (only when asked for): "fast" under `torch.autocast(dtype=torch.bfloat16)`. Not a
  drop-in replacement: outputs move (DETR-R50 with random weights: about 2e-2 on the logits, 1e-3
  on the normalized boxes; a two-stage model may select other proposals altogether). Each inference
  case records every mode's largest output difference from the reference path.
- "fast_compile" (only when asked for): "fast" with the model compiled by `torch.compile`
  (`nn.Module.compile`, as `model.compile: true` trains; inference without `optimize_for_inference`).
  The compilation happens in the warm-up calls: give `warmup` >= 1.

Tasks, each at every requested image size and batch size:

- "inference": one forward pass of the model in eval mode under `torch.inference_mode()`.
- "train_step": forward, set loss with Hungarian matching against random targets, backward (train
  mode, dropout on; no optimizer step).

Cases: every requested image size (or, with `native_size`, each config's own evaluation size of a
480 x 640 photo) and batch size, each at every thread count of `threads` (torch's intra-op threads and
the exported runtimes'; the exported files and the FLOP count are made once per case and shared by
its thread counts). `format_latency_table` puts the inference modes side by side.

Every figure comes from `runs` timed calls after `warmup` untimed ones. The modes are called in
turn within each run (the order alternating from run to run), so that load from other processes
affects both alike; `ratio` holds median(fast) / median(reference) of the wall and CPU times, and
`paired_wall`, the median over runs of fast / reference within a run (`ratio_fast_bf16` likewise).
Times are wall-clock seconds (after a CUDA synchronize on GPU) and, on CPU, the CPU seconds the
process used (all its threads): the CPU time is far less sensitive to other processes taking turns
on the cores.

Memory: one extra call per mode, after the timed ones, measured as `detr_lab.benchmark.measure`
describes (peak and increase over the call: CUDA allocations, or the CPU process's resident set).

Breakdown (`breakdown=True`, inference only): one more call per mode with forward hooks timing the
parts of the detector (`BREAKDOWN_PARTS`); the parts do not overlap and "other" is the rest of the
call (position encodings, residual adds and norms, heads, query selection, padding masks).

FLOPs: counted by `torch.utils.flop_counter.FlopCounterMode` on one call of the reference path
(its attention is explicit matmuls, which the counter sees; a fused CPU attention kernel is not
counted). Convolutions, matmuls and attention only: element-wise operations, softmax, normalization
and `grid_sample` are not counted. One multiply-add is 2 FLOPs.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import os
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from detr_lab.benchmark.machine import describe_machine, load_average, machine_line
from detr_lab.benchmark.measure import (
    count_flops,
    count_inference_flops,
    count_parameters,
    measure_peak_memory,
    release_free_heap,
)
from detr_lab.benchmark.report import format_table
from detr_lab.config import Config, load_config
from detr_lab.data.transforms import eval_resized_size
from detr_lab.export.openvino_runtime import OpenVinoRepeatError
from detr_lab.export.timing import ExportedModel, export_for_timing
from detr_lab.models.attention.deformable import set_deformable_core
from detr_lab.models.attention.plain import set_plain_attention_impl
from detr_lab.models.backbones.frozen_norm_conv import fold_frozen_norms_for_training
from detr_lab.models.build import build_criterion, build_model
from detr_lab.models.optimize import optimize_for_inference
from detr_lab.timer import ratio, summarize, synchronize, time_interleaved

MODES = ("fast", "reference", "fast_bf16", "fast_compile", "onnxruntime", "openvino", "onnxruntime_int8",
         "openvino_int8")
EXPORTED_MODES = {  # mode -> (runtime, int8)
    "onnxruntime": ("onnxruntime", False),
    "openvino": ("openvino", False),
    "onnxruntime_int8": ("onnxruntime", True),
    "openvino_int8": ("openvino", True),
}
DEFAULT_MODES = ("fast", "reference")
TASKS = ("inference", "train_step")


@dataclass
class BenchmarkSettings:
    """What to measure. Sizes are (height, width) in pixels of the (unpadded) input batch."""

    device: str = "cpu"
    sizes: list[tuple[int, int]] = field(default_factory=lambda: [(800, 1066), (512, 683)])
    batch_sizes: list[int] = field(default_factory=lambda: [1, 4])
    # The training step is measured at these (defaults: the first size, batch 1).
    train_sizes: list[tuple[int, int]] | None = None
    train_batch_sizes: list[int] = field(default_factory=lambda: [1])
    tasks: list[str] = field(default_factory=lambda: list(TASKS))
    modes: list[str] = field(default_factory=lambda: list(DEFAULT_MODES))
    runs: int = 5
    warmup: int = 1
    # CPU threads (torch's, or the exported runtime's intra-op threads), one case per value; None keeps
    # torch's default (exported runtimes then use their own).
    threads: int | list[int] | None = None
    # Measure inference at each config's own evaluation size instead of `sizes`: the size its
    # evaluation transform gives a 480 x 640 (COCO-typical) image, e.g. 800 x 1066 for DETR and
    # 640 x 640 for RT-DETR / D-FINE.
    native_size: bool = False
    objects_per_image: int = 5  # random targets of the training step
    seed: int = 0
    overrides: list[str] = field(default_factory=list)  # dotted config overrides for every config
    breakdown: bool = False  # inference: one more call per mode, timed per part of the detector

    def validate(self) -> None:
        for name in ("runs", "objects_per_image"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.warmup < 0:
            raise ValueError(f"warmup must be >= 0, got {self.warmup}")
        if not self.thread_counts():
            raise ValueError("threads must name at least one thread count")
        for threads in self.thread_counts():
            if threads is not None and threads < 1:
                raise ValueError(f"threads must be >= 1, got {self.threads}")
        for name, allowed in (("tasks", TASKS), ("modes", MODES)):
            values = getattr(self, name)
            bad = [v for v in values if v not in allowed]
            if bad or not values:
                raise ValueError(f"{name} must be a non-empty list from {allowed}, got {values}")
        for height, width in [*self.sizes, *(self.train_sizes or [])]:
            if height < 32 or width < 32:
                raise ValueError(f"image sizes must be at least 32x32 pixels, got {height}x{width}")
        for batch in [*self.batch_sizes, *self.train_batch_sizes]:
            if batch < 1:
                raise ValueError(f"batch sizes must be >= 1, got {batch}")

    def thread_counts(self) -> list[int | None]:
        """The thread counts measured, in order (`[None]`: torch's default only)."""
        if self.threads is None:
            return [None]
        return [self.threads] if isinstance(self.threads, int) else list(self.threads)


def parse_size(text: str) -> tuple[int, int]:
    """"800x1066" -> (800, 1066) (height, width)."""
    parts = text.lower().split("x")
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
        raise ValueError(f"image size {text!r} must look like HEIGHTxWIDTH, e.g. 800x1066")
    return int(parts[0]), int(parts[1])


# ---------------------------------------------------------------------------------------- breakdown
BREAKDOWN_PARTS = (
    "backbone",  # ResNet
    "neck",  # the neck: per-level projections to the model width (and extra levels or a pyramid)
    "enc_attn_linear",  # the nn.Linear layers inside the encoder's attention modules
    "enc_attn_core",  # the rest of encoder attention: SDPA / softmax(qk)v, or sampling + core
    "enc_ffn",  # the encoder's feed-forward blocks
    "decoder",  # the whole decoder
    "other",
)


def breakdown_modules(model: nn.Module) -> dict[str, list[nn.Module]]:
    """The modules whose forward calls make up each timed part of a detector ("backbone", "neck",
    "enc_attn" and its "enc_attn_linear" layers, "enc_ffn", "decoder"); parts the model lacks are empty."""
    transformer = getattr(model, "transformer", None)
    encoder_layers = list(getattr(getattr(transformer, "encoder", None), "layers", []))
    attention = [layer.self_attn for layer in encoder_layers if hasattr(layer, "self_attn")]
    parts = {
        "backbone": [getattr(model, "backbone", None)],
        # A ModuleList is never called itself: time its members.
        "neck": [getattr(model, "neck", None)],
        "enc_attn": attention,
        "enc_attn_linear": [
            child for module in attention for child in module.children() if isinstance(child, nn.Linear)
        ],
        "enc_ffn": [layer.ffn for layer in encoder_layers if hasattr(layer, "ffn")],
        "decoder": [getattr(transformer, "decoder", None)],
    }
    return {name: [m for m in modules if m is not None] for name, modules in parts.items()}


def time_breakdown(model: nn.Module, call: Callable[[], object], device: torch.device) -> dict[str, float]:
    """Wall seconds of one `call()` (which runs `model`) per part of `BREAKDOWN_PARTS`, plus "total"."""
    parts = breakdown_modules(model)
    totals = dict.fromkeys(parts, 0.0)
    handles = []

    def hooks(name: str):
        started: list[float] = []

        def pre_hook(module, args):
            synchronize(device)
            started.append(time.perf_counter())

        def post_hook(module, args, output):
            synchronize(device)
            totals[name] += time.perf_counter() - started.pop()

        return pre_hook, post_hook

    for name, modules in parts.items():
        for module in modules:
            pre_hook, post_hook = hooks(name)
            handles.append(module.register_forward_pre_hook(pre_hook))
            handles.append(module.register_forward_hook(post_hook))
    try:
        synchronize(device)
        start = time.perf_counter()
        call()
        synchronize(device)
        total = time.perf_counter() - start
    finally:
        for handle in handles:
            handle.remove()
    result = {
        "backbone": totals["backbone"],
        "neck": totals["neck"],
        "enc_attn_linear": totals["enc_attn_linear"],
        "enc_attn_core": totals["enc_attn"] - totals["enc_attn_linear"],
        "enc_ffn": totals["enc_ffn"],
        "decoder": totals["decoder"],
    }
    result["other"] = total - sum(result.values())
    result["total"] = total
    return {name: round(value, 6) for name, value in result.items()}


# ------------------------------------------------------------------------------------------- inputs
def random_batch(
    batch_size: int, height: int, width: int, device: torch.device, generator: torch.Generator
) -> tuple[Tensor, Tensor]:
    """Normal images `[B, 3, H, W]` and an all-False padding mask `[B, H, W]` (no padding)."""
    images = torch.randn(batch_size, 3, height, width, generator=generator).to(device)
    padding_mask = torch.zeros(batch_size, height, width, dtype=torch.bool, device=device)
    return images, padding_mask


def random_targets(
    batch_size: int,
    height: int,
    width: int,
    *,
    num_classes: int,
    objects_per_image: int,
    device: torch.device,
    generator: torch.Generator,
) -> list[dict[str, Tensor]]:
    """Targets in the data pipeline's format: boxes normalized cxcywh inside the image, labels."""
    targets = []
    for index in range(batch_size):
        sizes = 0.05 + 0.4 * torch.rand(objects_per_image, 2, generator=generator)  # (N, 2) w, h
        centers = sizes / 2 + (1 - sizes) * torch.rand(objects_per_image, 2, generator=generator)
        targets.append({
            "boxes": torch.cat((centers, sizes), dim=1).to(device),
            "labels": torch.randint(num_classes, (objects_per_image,), generator=generator).to(device),
            "image_id": torch.tensor(index, device=device),
            "orig_size": torch.tensor([height, width], device=device),
            "size": torch.tensor([height, width], device=device),
        })
    return targets


# ------------------------------------------------------------------------------------------- models
def benchmark_config(path: str | os.PathLike, overrides: Sequence[str] = ()) -> Config:
    """The config at `path` with `overrides`, never downloading weights (random initialisation)."""
    return load_config(
        path, [*overrides, "model.backbone.pretrained=false", "model.backbone.weights_path=null"]
    )


def use_reference_paths(model: nn.Module) -> nn.Module:
    """Step-by-step plain attention and the per-level `grid_sample` deformable core (in place)."""
    set_plain_attention_impl(model, "math")
    set_deformable_core(model, "reference")
    return model


def use_fast_paths(model: nn.Module) -> nn.Module:
    """The training paths, as `DetectionModule` sets them up (in place): SDPA plain attention, the
    device's fast deformable core, channels-last convolution weights (`model.channels_last`) and the
    frozen batch norms applied by their convolutions (`model.fold_frozen_norms`)."""
    set_plain_attention_impl(model, "sdpa")
    set_deformable_core(model, "auto")
    model.to(memory_format=torch.channels_last)
    fold_frozen_norms_for_training(model)
    return model


def models_for(base: nn.Module, task: str, modes: Sequence[str]) -> dict[str, nn.Module]:
    """Copies of `base` (same weights) set up for `task` in each mode."""
    models = {}
    for mode in modes:
        model = copy.deepcopy(base)
        if mode == "reference":
            use_reference_paths(model)
        elif mode in EXPORTED_MODES:
            pass  # exported as built (the export picks its own attention paths)
        elif mode == "fast_compile":
            use_fast_paths(model)
            model.compile()
        elif task == "inference":
            optimize_for_inference(model)
        else:
            use_fast_paths(model)
        models[mode] = model.train(task == "train_step")
    return models


def _autocast(device: torch.device, dtype: torch.dtype | None):
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


def inference_call(
    model: nn.Module, images: Tensor, padding_mask: Tensor, *, autocast_dtype: torch.dtype | None = None
) -> Callable[[], dict]:
    """Forward pass in inference mode (under autocast to `autocast_dtype` if given); returns the outputs."""

    def call() -> dict:
        with torch.inference_mode(), _autocast(images.device, autocast_dtype):
            return model(images, padding_mask)

    return call


def train_step_call(
    model: nn.Module,
    criterion: nn.Module,
    images: Tensor,
    padding_mask: Tensor,
    targets: list[dict],
    *,
    autocast_dtype: torch.dtype | None = None,
) -> Callable[[], None]:
    """Forward (with the targets, as `DetectionModule.training_step`: the denoising queries of the members
    that have them), set loss (Hungarian matching) and backward; gradients of the previous call are
    dropped."""

    def call() -> None:
        model.zero_grad(set_to_none=True)
        with _autocast(images.device, autocast_dtype):
            outputs = model(images, padding_mask, targets=targets)
            losses = criterion(outputs, targets)
            total = criterion.total_loss(losses)
        total.backward()

    return call


def output_difference(outputs: dict, reference: dict) -> dict[str, float]:
    """Largest absolute difference of `pred_logits` and `pred_boxes` (normalized cxcywh)."""
    return {
        key: float((outputs[key].float() - reference[key].float()).abs().max())
        for key in ("pred_logits", "pred_boxes")
    }


# -------------------------------------------------------------------------------------------- run
# The image a config's native size is computed for: (height, width) of a typical COCO photo.
NATIVE_SIZE_IMAGE = (480, 640)


def native_size(cfg: Config) -> tuple[int, int]:
    """(height, width) of a 480 x 640 image after `cfg`'s evaluation transform (the model's own
    inference size: 800 x 1066 for DETR's shorter side 800, 640 x 640 for RT-DETR's square resize)."""
    return eval_resized_size(*NATIVE_SIZE_IMAGE, cfg.data.augment)


def _cases(settings: BenchmarkSettings, cfg: Config) -> list[tuple[str, int, int, int]]:
    cases = []
    sizes = [native_size(cfg)] if settings.native_size else settings.sizes
    if "inference" in settings.tasks:
        cases += [("inference", h, w, b) for h, w in sizes for b in settings.batch_sizes]
    if "train_step" in settings.tasks:
        train_sizes = settings.train_sizes or sizes[:1]
        cases += [("train_step", h, w, b) for h, w in train_sizes for b in settings.train_batch_sizes]
    return cases


def measure_case(
    base: nn.Module,
    criterion: nn.Module,
    cfg: Config,
    case: tuple[str, int, int, int],
    settings: BenchmarkSettings,
    device: torch.device,
    *,
    threads: int | None = None,
    kept: dict[tuple, object] | None = None,
) -> dict:
    """Time, memory and FLOPs of one (task, height, width, batch) for every mode, with `threads` CPU
    threads (torch's and the exported runtimes'; None: their defaults). What does not depend on
    the thread count (each exported mode's file, the FLOP count) is made once and kept in `kept` (when
    given: the same dict for every thread count of one case, a new one for another case). A mode whose
    OpenVINO model fails its repeat check is recorded with its error instead of times."""
    kept = {} if kept is None else kept
    threads_before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return _measure_case(base, criterion, cfg, case, settings, device, threads, kept)
    finally:
        torch.set_num_threads(threads_before)


def _measure_case(base, criterion, cfg, case, settings, device, threads, kept) -> dict:
    task, height, width, batch = case
    generator = torch.Generator().manual_seed(settings.seed)
    images, padding_mask = random_batch(batch, height, width, device, generator)
    targets = random_targets(
        batch,
        height,
        width,
        num_classes=cfg.model.num_classes,
        objects_per_image=settings.objects_per_image,
        device=device,
        generator=generator,
    )
    models = models_for(base, task, settings.modes)
    calls = {}
    refused: dict[str, str] = {}
    for mode, model in models.items():
        dtype = torch.bfloat16 if mode == "fast_bf16" else None
        if mode in EXPORTED_MODES:
            if task != "inference" or device.type != "cpu":
                raise ValueError(f"the {mode} mode measures CPU inference only")
            runtime, int8 = EXPORTED_MODES[mode]
            if ("export", mode) not in kept:
                kept["export", mode] = export_for_timing(model, cfg, images, padding_mask, runtime=runtime,
                                                         int8=int8)
            exported: ExportedModel = kept["export", mode]
            try:
                calls[mode] = exported.call(images, padding_mask, threads=threads)
            except OpenVinoRepeatError as error:
                refused[mode] = str(error)
        elif task == "inference":
            calls[mode] = inference_call(model, images, padding_mask, autocast_dtype=dtype)
        else:
            calls[mode] = train_step_call(
                model, criterion, images, padding_mask, targets, autocast_dtype=dtype
            )
    load_before = load_average()
    times = time_interleaved(calls, runs=settings.runs, warmup=settings.warmup, device=device)
    result: dict = {
        "task": task,
        "height": height,
        "width": width,
        "batch_size": batch,
        "threads": threads,
        "load_average_before": load_before,
        "load_average_after": load_average(),
        "modes": {},
    }
    outputs: dict[str, object] = {}
    for mode, error in refused.items():
        result["modes"][mode] = {"error": error}
    for mode in calls:

        def keep_outputs(mode: str = mode) -> None:
            outputs[mode] = calls[mode]()

        result["modes"][mode] = {
            "wall_s": summarize(times[mode]["wall"]),
            "cpu_s": summarize(times[mode]["cpu"]),
            "memory": measure_peak_memory(keep_outputs, device),
        }
        if settings.breakdown and task == "inference" and mode not in EXPORTED_MODES:
            result["modes"][mode]["breakdown_s"] = time_breakdown(models[mode], calls[mode], device)
    if ("flops",) not in kept:
        if "reference" in models:
            flops_model = models["reference"]
        else:
            flops_model = use_reference_paths(copy.deepcopy(base).train(task == "train_step"))
        if task == "inference":
            kept["flops",] = count_inference_flops(flops_model, images, padding_mask)
        else:
            step = train_step_call(flops_model, criterion, images, padding_mask, targets)
            kept["flops",] = count_flops(step)
    result["flops"] = kept["flops",]
    if task == "inference" and "reference" in outputs:
        for mode, output in outputs.items():
            if mode != "reference":
                result["modes"][mode]["max_abs_difference"] = output_difference(output, outputs["reference"])
    result["modes"] = {mode: result["modes"][mode] for mode in settings.modes}
    for mode in times:
        if mode == "reference" or "reference" not in times:
            continue
        fast, reference = times[mode], times["reference"]
        key = "ratio" if mode == "fast" else f"ratio_{mode}"
        result[key] = {
            "wall": ratio(statistics.median(fast["wall"]), statistics.median(reference["wall"])),
            "cpu": ratio(statistics.median(fast["cpu"]), statistics.median(reference["cpu"])),
            "paired_wall": round(
                statistics.median(f / r for f, r in zip(fast["wall"], reference["wall"], strict=True)), 4
            ),
        }
    for held in (models, calls, outputs):
        held.clear()
    release_free_heap()
    return result


def benchmark_one_config(
    path: str | os.PathLike,
    settings: BenchmarkSettings,
    device: torch.device,
    *,
    log: Callable[[str], None] | None = None,
) -> dict:
    """Every case of `settings` for the model of one config file."""
    cfg = benchmark_config(path, settings.overrides)
    torch.manual_seed(settings.seed)
    base = build_model(cfg.model).to(device)
    criterion = build_criterion(cfg.model, cfg.loss).to(device)
    entry = {
        "config": str(path),
        "name": Path(path).stem,
        "parameters": count_parameters(base),
        "cases": [],
    }
    for case in _cases(settings, cfg):
        kept: dict[tuple, object] = {}  # exported files and FLOPs, shared by the case's thread counts
        for threads in settings.thread_counts():
            if log is not None:
                task, height, width, batch = case
                in_threads = "" if threads is None else f", {threads} threads"
                log(f"{entry['name']}: {task} {height}x{width} batch {batch}{in_threads} ...")
            entry["cases"].append(measure_case(base, criterion, cfg, case, settings, device, threads=threads,
                                               kept=kept))
            if log is not None:
                log(format_case_line(entry["name"], entry["cases"][-1]))
    return entry


def run_benchmark(
    config_paths: Sequence[str | os.PathLike],
    settings: BenchmarkSettings,
    *,
    log: Callable[[str], None] | None = None,
) -> dict:
    """Benchmark every config; returns the report (machine, settings, one entry per config)."""
    settings.validate()
    if not config_paths:
        raise ValueError("no config files to benchmark")
    device = torch.device(settings.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device '{settings.device}' requested but CUDA is not available")
    threads_before = torch.get_num_threads()
    first_threads = settings.thread_counts()[0]
    if first_threads is not None:  # the machine description records the first case's threads
        torch.set_num_threads(first_threads)
    try:
        report = {
            "machine": describe_machine(device),
            "settings": dataclasses.asdict(settings),
            "models": [],
        }
    finally:
        torch.set_num_threads(threads_before)
    for path in config_paths:
        report["models"].append(benchmark_one_config(path, settings, device, log=log))
    report["machine"]["load_average_end"] = load_average()
    return report


# ------------------------------------------------------------------------------------------- output
def format_case_line(name: str, case: dict) -> str:
    threads = "" if case.get("threads") is None else f" t{case['threads']}"
    parts = [f"{name} {case['task']} {case['height']}x{case['width']} b{case['batch_size']}{threads}:"]
    for mode, figures in case["modes"].items():
        if "error" in figures:
            parts.append(f"{mode} refused")
            continue
        parts.append(f"{mode} {figures['wall_s']['median'] * 1e3:.0f} ms")
    if "ratio" in case:
        parts.append(f"fast/reference {case['ratio']['wall']:.2f} (cpu {case['ratio']['cpu']:.2f})")
    return "  ".join(parts)


def format_report(report: dict) -> str:
    """A plain-text table: one row per (model, task, size, batch, mode)."""
    header = (
        "model", "task", "size", "batch", "threads", "mode", "median ms", "min-max ms", "cpu ms",
        "peak +MiB", "GFLOPs", "params M", "fast/ref (cpu)",
    )
    rows = []
    for entry in report["models"]:
        params = f"{entry['parameters']['total'] / 1e6:.1f}"
        for case in entry["cases"]:
            size = f"{case['height']}x{case['width']}"
            threads = "-" if case.get("threads") is None else str(case["threads"])
            for mode, figures in case["modes"].items():
                if "error" in figures:
                    rows.append((entry["name"], case["task"], size, str(case["batch_size"]), threads, mode,
                                 "refused", "", "", "", f"{case['flops'] / 1e9:.1f}", params, ""))
                    continue
                wall, cpu = figures["wall_s"], figures["cpu_s"]
                memory = figures["memory"]
                mib = memory["increase_mib"] if memory["increase_mib"] is not None else memory["peak_mib"]
                ratios = ""
                ratio_key = "ratio" if mode == "fast" else f"ratio_{mode}"
                if ratio_key in case:
                    ratios = f"{case[ratio_key]['wall']:.2f} ({case[ratio_key]['cpu']:.2f})"
                rows.append((
                    entry["name"], case["task"], size, str(case["batch_size"]), threads, mode,
                    f"{wall['median'] * 1e3:.0f}", f"{wall['min'] * 1e3:.0f}-{wall['max'] * 1e3:.0f}",
                    f"{cpu['median'] * 1e3:.0f}", f"{mib:.0f}", f"{case['flops'] / 1e9:.1f}", params, ratios,
                ))
    lines = [format_table(header, rows)]
    latency = format_latency_table(report)
    if latency:
        lines += ["", latency]
    breakdown = format_breakdown(report)
    if breakdown:
        lines += ["", breakdown]
    lines.append(machine_line(report["machine"]))
    return "\n".join(lines)


def format_latency_table(report: dict) -> str:
    """Inference latency with the modes side by side (median ms), one row per model, size, batch and
    thread count, with the fastest mode's speed-up over "fast" and INT8's over FP32 in the same
    runtime; empty unless several modes were measured. "-" marks a mode refused (its error is in the
    JSON report)."""
    modes = report["settings"]["modes"]
    if len(modes) < 2:
        return ""
    int8_pairs = [(f"{runtime}_int8", runtime) for runtime in ("onnxruntime", "openvino")
                  if runtime in modes and f"{runtime}_int8" in modes]
    header = ["model", "size", "batch", "threads", *modes, "best"]
    if "fast" in modes:
        header.append("best / fast")
    header += [f"{int8} x" for int8, _ in int8_pairs]
    rows = []
    for entry in report["models"]:
        for case in entry["cases"]:
            if case["task"] != "inference":
                continue
            medians = {mode: figures["wall_s"]["median"] for mode, figures in case["modes"].items()
                       if "error" not in figures}
            if not medians:
                continue
            best = min(medians, key=medians.get)
            row = [entry["name"], f"{case['height']}x{case['width']}", str(case["batch_size"]),
                   "-" if case.get("threads") is None else str(case["threads"]),
                   *(f"{medians[mode] * 1e3:.1f}" if mode in medians else "-" for mode in modes), best]
            if "fast" in modes:
                row.append(f"{medians['fast'] / medians[best]:.2f}" if "fast" in medians else "-")
            for int8, fp32 in int8_pairs:
                both = int8 in medians and fp32 in medians
                row.append(f"{medians[fp32] / medians[int8]:.2f}" if both else "-")
            rows.append(tuple(row))
    if not rows:
        return ""
    legend = ("inference latency, median ms (best / fast: the fastest mode's speed-up over the PyTorch fast"
              " path; <runtime>_int8 x: INT8's speed-up over FP32 in that runtime):")
    return legend + "\n" + format_table(tuple(header), rows)


def format_breakdown(report: dict) -> str:
    """Milliseconds per detector part (one row per model, case and mode), where measured."""
    header = ("model", "size", "batch", "mode", *BREAKDOWN_PARTS, "total")
    rows = []
    for entry in report["models"]:
        for case in entry["cases"]:
            for mode, figures in case["modes"].items():
                parts = figures.get("breakdown_s")
                if parts is None:
                    continue
                rows.append((
                    entry["name"], f"{case['height']}x{case['width']}", str(case["batch_size"]), mode,
                    *(f"{parts[name] * 1e3:.0f}" for name in (*BREAKDOWN_PARTS, "total")),
                ))
    if not rows:
        return ""
    return "breakdown of one inference call (ms):\n" + format_table(header, rows)
