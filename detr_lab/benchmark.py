"""Speed, memory, FLOPs and size of detectors built from configs (the library behind tools/benchmark.py).

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
  size (`detr_lab.export`, gather deformable core) and run by onnxruntime on the CPU with
  `threads` intra-op threads; no breakdown.
- "fast_bf16" (only when asked for): "fast" under `torch.autocast(dtype=torch.bfloat16)`. Not a
  drop-in replacement: outputs move (DETR-R50 with random weights: about 2e-2 on the logits, 1e-3
  on the normalized boxes; a two-stage model may select other proposals altogether). Each inference
  case records every mode's largest output difference from the reference path.

Tasks, each at every requested image size and batch size:

- "inference": one forward pass of the model in eval mode under `torch.inference_mode()`.
- "train_step": forward, set loss with Hungarian matching against random targets, backward (train
  mode, dropout on; no optimizer step).

Every figure comes from `runs` timed calls after `warmup` untimed ones. The modes are called in
turn within each run (the order alternating from run to run), so that load from other processes
affects both alike; `ratio` holds median(fast) / median(reference) of the wall and CPU times, and
`paired_wall`, the median over runs of fast / reference within a run (`ratio_fast_bf16` likewise).
Times are wall-clock seconds (after a CUDA synchronize on GPU) and, on CPU, the CPU seconds the
process used (all its threads): the CPU time is far less sensitive to other processes taking turns
on the cores.

Memory (one extra call per mode, after the timed ones):

- CUDA: `torch.cuda.max_memory_allocated` during the call (peak) and that peak minus what was
  allocated before the call (increase).
- CPU (Linux): the process's resident-set high-water mark (`VmHWM`), reset before the call through
  `/proc/self/clear_refs`, minus the resident set before the call, after returning freed heap memory
  to the system (`malloc_trim`). It counts the pages the call touched beyond what was resident,
  including allocator slack; where the mark cannot be reset only the process's lifetime peak
  (`ru_maxrss`) is reported. Python's `tracemalloc` does not see tensor memory and is not used.

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
import ctypes
import ctypes.util
import dataclasses
import gc
import json
import os
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from detr_lab.config import Config, load_config
from detr_lab.models.attention.deformable import set_deformable_core
from detr_lab.models.attention.plain import set_plain_attention_impl
from detr_lab.models.build import build_criterion, build_model
from detr_lab.models.optimize import optimize_for_inference

MODES = ("fast", "reference", "fast_bf16", "onnxruntime")
DEFAULT_MODES = ("fast", "reference")
TASKS = ("inference", "train_step")
MIB = 2**20


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
    threads: int | None = None  # torch CPU threads; None keeps torch's default
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
        if self.threads is not None and self.threads < 1:
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


def parse_size(text: str) -> tuple[int, int]:
    """"800x1066" -> (800, 1066) (height, width)."""
    parts = text.lower().split("x")
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
        raise ValueError(f"image size {text!r} must look like HEIGHTxWIDTH, e.g. 800x1066")
    return int(parts[0]), int(parts[1])


# ------------------------------------------------------------------------------------------ machine
def cpu_model_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_average() -> list[float] | None:
    """1, 5 and 15 minute load averages (None where the system has none)."""
    return [round(v, 2) for v in os.getloadavg()] if hasattr(os, "getloadavg") else None


def describe_machine(device: torch.device) -> dict:
    """CPU, cores, threads, GPU, library versions, load and allocator settings of this process."""
    try:
        usable_cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        usable_cores = os.cpu_count()
    import torchvision

    info = {
        "cpu_model": cpu_model_name(),
        "logical_cores": os.cpu_count(),
        "usable_cores": usable_cores,
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "mkldnn": torch.backends.mkldnn.is_available(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "load_average": load_average(),
        # Allocator settings change CPU timings a lot (page faults on freshly mapped memory).
        "allocator_environment": {
            key: value
            for key, value in os.environ.items()
            if key.startswith("MALLOC_") or key == "LD_PRELOAD"
        },
        "device": str(device),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(
            gpu_name=props.name,
            gpu_memory_gib=round(props.total_memory / 2**30, 1),
            cuda=torch.version.cuda,
            cudnn=torch.backends.cudnn.version(),
        )
    return info


# ------------------------------------------------------------------------------------------- timing
def summarize(values: Sequence[float]) -> dict:
    """Median, min, max, quartiles and the raw values (rounded to microseconds)."""
    if not values:
        raise ValueError("nothing to summarize: no measured values")
    ordered = sorted(values)
    if len(ordered) >= 2:
        q1, _, q3 = statistics.quantiles(ordered, n=4, method="inclusive")
    else:
        q1 = q3 = ordered[0]
    return {
        "median": round(statistics.median(ordered), 6),
        "min": round(ordered[0], 6),
        "max": round(ordered[-1], 6),
        "q1": round(q1, 6),
        "q3": round(q3, 6),
        "values": [round(v, 6) for v in values],
    }


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_interleaved(
    calls: dict[str, Callable[[], object]], *, runs: int, warmup: int, device: torch.device
) -> dict[str, dict[str, list[float]]]:
    """Time each call `runs` times after `warmup` untimed calls, the calls taking turns.

    Within run r the calls go in dict order for even r and in reverse order for odd r.
    Returns per name `{"wall": [seconds...], "cpu": [process CPU seconds...]}`.
    """
    names = list(calls)
    for _ in range(warmup):
        for name in names:
            calls[name]()
            _synchronize(device)
    times = {name: {"wall": [], "cpu": []} for name in names}
    for run in range(runs):
        for name in names if run % 2 == 0 else names[::-1]:
            _synchronize(device)
            cpu_start, wall_start = time.process_time(), time.perf_counter()
            calls[name]()
            _synchronize(device)
            times[name]["wall"].append(time.perf_counter() - wall_start)
            times[name]["cpu"].append(time.process_time() - cpu_start)
    return times


# ------------------------------------------------------------------------------------------- memory
def _proc_status_kib(key: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def _reset_peak_rss() -> bool:
    """Reset the process's VmHWM to the current resident set (Linux >= 4.0); False if not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as file:
            file.write("5")
    except OSError:
        return False
    return True


def _release_free_heap() -> None:
    """Return freed heap memory to the system (glibc `malloc_trim`; no-op elsewhere)."""
    gc.collect()
    name = ctypes.util.find_library("c")
    if not name:
        return
    try:
        libc = ctypes.CDLL(name)
        if hasattr(libc, "malloc_trim"):
            libc.malloc_trim(0)
    except OSError:
        pass


def measure_peak_memory(call: Callable[[], object], device: torch.device) -> dict:
    """Peak memory of one `call()` (see the module docstring for what each method measures)."""
    if device.type == "cuda":
        _synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        call()
        _synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
        return {
            "method": "torch.cuda.max_memory_allocated",
            "peak_mib": round(peak / MIB, 1),
            "increase_mib": round((peak - before) / MIB, 1),
        }
    _release_free_heap()
    before_kib = _proc_status_kib("VmRSS")
    if before_kib is not None and _reset_peak_rss():
        call()
        peak_kib = _proc_status_kib("VmHWM")
        if peak_kib is not None:
            return {
                "method": "VmHWM (reset before the call) - VmRSS before the call, after malloc_trim",
                "peak_mib": round(peak_kib / 1024, 1),
                "increase_mib": round((peak_kib - before_kib) / 1024, 1),
            }
    call()
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale
    return {
        "method": "ru_maxrss (process lifetime peak)",
        "peak_mib": round(peak / MIB, 1),
        "increase_mib": None,
    }


def count_flops(call: Callable[[], object]) -> int:
    """FLOPs of one `call()` seen by `FlopCounterMode` (convolutions, matmuls, attention)."""
    with FlopCounterMode(display=False) as counter:
        call()
    return int(counter.get_total_flops())


def count_inference_flops(model: nn.Module, images: Tensor, padding_mask: Tensor) -> int:
    """FLOPs of one forward pass without gradients.

    Run under `torch.no_grad()` with the parameters' `requires_grad` switched off for the call
    (FlopCounterMode's module tracking fails on inference-mode tensors and on leaves that require
    gradients inside `no_grad`); the flags are restored afterwards.
    """
    flags = [(param, param.requires_grad) for param in model.parameters()]
    try:
        for param, _ in flags:
            param.requires_grad_(False)
        with torch.no_grad():
            return count_flops(lambda: model(images, padding_mask))
    finally:
        for param, flag in flags:
            param.requires_grad_(flag)


def count_parameters(model: nn.Module) -> dict:
    params = list(model.parameters())
    return {
        "total": sum(p.numel() for p in params),
        "trainable": sum(p.numel() for p in params if p.requires_grad),
    }


# ---------------------------------------------------------------------------------------- breakdown
BREAKDOWN_PARTS = (
    "backbone",  # ResNet
    "input_proj",  # per-level projections to the model width (and the extra strided level)
    "enc_attn_linear",  # the nn.Linear layers inside the encoder's attention modules
    "enc_attn_core",  # the rest of encoder attention: SDPA / softmax(qk)v, or sampling + core
    "enc_ffn",  # the encoder's feed-forward blocks
    "decoder",  # the whole decoder
    "other",
)


def _breakdown_modules(model: nn.Module) -> dict[str, list[nn.Module]]:
    transformer = getattr(model, "transformer", None)
    encoder_layers = list(getattr(getattr(transformer, "encoder", None), "layers", []))
    attention = [layer.self_attn for layer in encoder_layers if hasattr(layer, "self_attn")]
    parts = {
        "backbone": [getattr(model, "backbone", None)],
        # A ModuleList is never called itself: time its members.
        "input_proj": list(getattr(model, "input_proj", [])),
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
    parts = _breakdown_modules(model)
    totals = dict.fromkeys(parts, 0.0)
    handles = []

    def hooks(name: str):
        started: list[float] = []

        def pre_hook(module, args):
            _synchronize(device)
            started.append(time.perf_counter())

        def post_hook(module, args, output):
            _synchronize(device)
            totals[name] += time.perf_counter() - started.pop()

        return pre_hook, post_hook

    for name, modules in parts.items():
        for module in modules:
            pre_hook, post_hook = hooks(name)
            handles.append(module.register_forward_pre_hook(pre_hook))
            handles.append(module.register_forward_hook(post_hook))
    try:
        _synchronize(device)
        start = time.perf_counter()
        call()
        _synchronize(device)
        total = time.perf_counter() - start
    finally:
        for handle in handles:
            handle.remove()
    result = {
        "backbone": totals["backbone"],
        "input_proj": totals["input_proj"],
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
    """SDPA plain attention and the device's fast deformable core (in place)."""
    set_plain_attention_impl(model, "sdpa")
    set_deformable_core(model, "auto")
    return model


def models_for(base: nn.Module, task: str, modes: Sequence[str]) -> dict[str, nn.Module]:
    """Copies of `base` (same weights) set up for `task` in each mode."""
    models = {}
    for mode in modes:
        model = copy.deepcopy(base)
        if mode == "reference":
            use_reference_paths(model)
        elif mode == "onnxruntime":
            pass  # exported as built (the export picks its own attention paths)
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
    """Forward, set loss (Hungarian matching) and backward; gradients of the previous call are dropped."""

    def call() -> None:
        model.zero_grad(set_to_none=True)
        with _autocast(images.device, autocast_dtype):
            outputs = model(images, padding_mask)
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
def _cases(settings: BenchmarkSettings) -> list[tuple[str, int, int, int]]:
    cases = []
    if "inference" in settings.tasks:
        cases += [("inference", h, w, b) for h, w in settings.sizes for b in settings.batch_sizes]
    if "train_step" in settings.tasks:
        train_sizes = settings.train_sizes or settings.sizes[:1]
        cases += [("train_step", h, w, b) for h, w in train_sizes for b in settings.train_batch_sizes]
    return cases


def _ratio(fast: float, reference: float) -> float | None:
    return round(fast / reference, 4) if reference > 0 else None


def measure_case(
    base: nn.Module,
    criterion: nn.Module,
    cfg: Config,
    case: tuple[str, int, int, int],
    settings: BenchmarkSettings,
    device: torch.device,
) -> dict:
    """Time, memory and FLOPs of one (task, height, width, batch) for every mode."""
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
    for mode, model in models.items():
        dtype = torch.bfloat16 if mode == "fast_bf16" else None
        if mode == "onnxruntime":
            if task != "inference" or device.type != "cpu":
                raise ValueError("the onnxruntime mode measures CPU inference only")
            from detr_lab.export.timing import onnxruntime_call

            calls[mode] = onnxruntime_call(model, cfg, images, padding_mask, threads=settings.threads)
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
        "load_average_before": load_before,
        "load_average_after": load_average(),
        "modes": {},
    }
    outputs: dict[str, object] = {}
    for mode in settings.modes:

        def keep_outputs(mode: str = mode) -> None:
            outputs[mode] = calls[mode]()

        result["modes"][mode] = {
            "wall_s": summarize(times[mode]["wall"]),
            "cpu_s": summarize(times[mode]["cpu"]),
            "memory": measure_peak_memory(keep_outputs, device),
        }
        if settings.breakdown and task == "inference" and mode != "onnxruntime":
            result["modes"][mode]["breakdown_s"] = time_breakdown(models[mode], calls[mode], device)
    if "reference" in models:
        flops_model = models["reference"]
    else:
        flops_model = use_reference_paths(copy.deepcopy(base).train(task == "train_step"))
    if task == "inference":
        result["flops"] = count_inference_flops(flops_model, images, padding_mask)
    else:
        result["flops"] = count_flops(train_step_call(flops_model, criterion, images, padding_mask, targets))
    if task == "inference" and "reference" in outputs:
        for mode, output in outputs.items():
            if mode != "reference":
                result["modes"][mode]["max_abs_difference"] = output_difference(output, outputs["reference"])
    for mode in settings.modes:
        if mode == "reference" or "reference" not in times:
            continue
        fast, reference = times[mode], times["reference"]
        key = "ratio" if mode == "fast" else f"ratio_{mode}"
        result[key] = {
            "wall": _ratio(statistics.median(fast["wall"]), statistics.median(reference["wall"])),
            "cpu": _ratio(statistics.median(fast["cpu"]), statistics.median(reference["cpu"])),
            "paired_wall": round(
                statistics.median(f / r for f, r in zip(fast["wall"], reference["wall"], strict=True)), 4
            ),
        }
    for held in (models, calls, outputs):
        held.clear()
    _release_free_heap()
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
    for case in _cases(settings):
        if log is not None:
            task, height, width, batch = case
            log(f"{entry['name']}: {task} {height}x{width} batch {batch} ...")
        entry["cases"].append(measure_case(base, criterion, cfg, case, settings, device))
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
    if settings.threads is not None:
        torch.set_num_threads(settings.threads)
    try:
        report = {
            "machine": describe_machine(device),
            "settings": dataclasses.asdict(settings),
            "models": [],
        }
        for path in config_paths:
            report["models"].append(benchmark_one_config(path, settings, device, log=log))
        report["machine"]["load_average_end"] = load_average()
    finally:
        torch.set_num_threads(threads_before)
    return report


# ------------------------------------------------------------------------------------------- output
def format_case_line(name: str, case: dict) -> str:
    parts = [f"{name} {case['task']} {case['height']}x{case['width']} b{case['batch_size']}:"]
    for mode, figures in case["modes"].items():
        parts.append(f"{mode} {figures['wall_s']['median'] * 1e3:.0f} ms")
    if "ratio" in case:
        parts.append(f"fast/reference {case['ratio']['wall']:.2f} (cpu {case['ratio']['cpu']:.2f})")
    return "  ".join(parts)


def format_report(report: dict) -> str:
    """A plain-text table: one row per (model, task, size, batch, mode)."""
    header = (
        "model", "task", "size", "batch", "mode", "median ms", "min-max ms", "cpu ms",
        "peak +MiB", "GFLOPs", "params M", "fast/ref (cpu)",
    )
    rows = [header]
    for entry in report["models"]:
        params = f"{entry['parameters']['total'] / 1e6:.1f}"
        for case in entry["cases"]:
            size = f"{case['height']}x{case['width']}"
            for mode, figures in case["modes"].items():
                wall, cpu = figures["wall_s"], figures["cpu_s"]
                memory = figures["memory"]
                mib = memory["increase_mib"] if memory["increase_mib"] is not None else memory["peak_mib"]
                ratio = ""
                ratio_key = "ratio" if mode == "fast" else f"ratio_{mode}"
                if ratio_key in case:
                    ratio = f"{case[ratio_key]['wall']:.2f} ({case[ratio_key]['cpu']:.2f})"
                rows.append((
                    entry["name"], case["task"], size, str(case["batch_size"]), mode,
                    f"{wall['median'] * 1e3:.0f}", f"{wall['min'] * 1e3:.0f}-{wall['max'] * 1e3:.0f}",
                    f"{cpu['median'] * 1e3:.0f}", f"{mib:.0f}", f"{case['flops'] / 1e9:.1f}", params, ratio,
                ))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)) for row in rows]
    lines.insert(1, "  ".join("-" * width for width in widths))
    breakdown = format_breakdown(report)
    if breakdown:
        lines += ["", breakdown]
    machine = report["machine"]
    lines.append(
        f"machine: {machine['cpu_model']}, {machine['usable_cores']} cores, torch threads "
        f"{machine['torch_threads']}, {machine.get('gpu_name', 'no GPU')}, torch {machine['torch']}, "
        f"load average {machine['load_average']} -> {machine.get('load_average_end')}"
    )
    return "\n".join(lines)


def format_breakdown(report: dict) -> str:
    """Milliseconds per detector part (one row per model, case and mode), where measured."""
    header = ("model", "size", "batch", "mode", *BREAKDOWN_PARTS, "total")
    rows = [header]
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
    if len(rows) == 1:
        return ""
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)) for row in rows]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "breakdown of one inference call (ms):\n" + "\n".join(lines)


def write_report(report: dict, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2))
    return path
