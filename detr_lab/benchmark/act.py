"""Encoder self-attention cost of ACT (adaptive clustering) against plain attention (the library
behind tools/bench_act.py; the options named below are `ActBenchSettings` fields and the tool's flags).

For each number of hash rounds L (and bucket width r) this measures, on one encoder self-attention
call at DC5 resolution (an 800 x 1066 image -> stride-16 map 50 x 67 = 3350 tokens, d 256, 8 heads):

- the mean number of clusters per (image, head) of ACT;
- FLOPs: the matmul FLOPs that `torch.utils.flop_counter.FlopCounterMode` sees (one multiply-add = 2
  FLOPs; SDPA is run on its math backend so its two bmm are visible), plus, for ACT, the
  element-wise hashing and averaging work counted by formula (below). Softmax, masking, sorting and
  indexing are counted for neither. Plain = q/k/v/out projections + QK^T + AV. ACT = projections +
  hashing (q . a for L rounds) + prototype attention. The prototype attention runs on prototypes
  padded to the largest count over heads, which is what the counter sees; the "ideal" column uses
  the mean count instead (what a packed kernel would do);
- the relative error ||ACT - plain|| / ||plain|| of the attention output (same weights);
- CPU time: median of `--runs` timed calls after `--warmup` calls, plain and ACT with the same
  weights, in eval mode under `torch.no_grad()`; plain, ACT and ACT's hashing + clustering alone
  are called in turn, so that load from other processes affects all three alike.

Inputs (`source` in the output says which was used):
- `--tokens PATH`: a tensor `[B, HW, d]` saved with `torch.save` (query = key = value), or a dict with
  `query` `[B, HW, d]` (encoder input + position embedding), optional `value` `[B, HW, d]`
  (encoder input) and optional `padding_mask` bool `[B, HW]` (True = padding);
- `--checkpoint PATH [--config PATH]`: a trained model (any checkpoint `load_checkpoint` reads). One
  image (`--image`, else the first validation image of the config's dataset; the config defaults to
  the one stored in the checkpoint) is resized to `--image-size` and run through the model; a hook
  captures the query (= key, encoder input + position embedding), value (encoder input) and key
  padding mask of encoder layer `--layer`'s self-attention, and that layer's attention weights are
  used for plain and ACT. Of a multi-level model only the tokens of the level with stride
  `--stride` are kept (for a DC5-like map of the same size);
- otherwise a synthetic smooth feature map: a low-resolution Gaussian field upsampled bilinearly to
  the token grid plus small white noise, which clusters far more like real encoder features than
  i.i.d. Gaussian tokens (those put nearly every query in its own cluster).

Extra FLOPs counted by formula for ACT, per (image, head) with N queries, L rounds, K clusters,
head_dim h: hashing adds the offset, divides by r and floors (3 N L); the prototype means need N h
additions and K h divisions.

Accuracy (`--ap`, needs `--checkpoint`): COCO AP of the checkpoint on the validation set of its
config, evaluated by the library's `evaluate_checkpoint` with plain encoder attention and with
`--set model.encoder.attention=act` for every (L, r) of `--ap-hashes` x `--ap-bucket-width` (no
retraining). For each it reports the mean number of clusters and tokens per (image, layer, head) and
the encoder self-attention FLOPs of ACT relative to plain at that resolution, counted by the closed
forms above per image on its real (non-padded) tokens and the clusters of each head.

    python tools/bench_act.py --hashes 16 20 24 32 --bucket-width 1 4 --json runs/bench_act.json
    python tools/bench_act.py --checkpoint runs/demo_act_teacher/checkpoints/last.ckpt --threads 1 \
        --hashes 16 20 24 32 --bucket-width 1 2 4 \
        --ap --ap-set data.augment.eval_size=480 --ap-set data.augment.eval_max_size=800
"""

from __future__ import annotations

import math
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.nn.attention import SDPBackend, sdpa_kernel

from detr_lab.benchmark.machine import describe_machine, load_average
from detr_lab.benchmark.measure import count_flops
from detr_lab.checkpoints import load_checkpoint
from detr_lab.config import ConfigError, load_config, save_config
from detr_lab.data.datamodule import DetectionDataModule
from detr_lab.engine.evaluate import evaluate_checkpoint
from detr_lab.io import safe_load
from detr_lab.models.attention.clustering import AdaptiveClusteringAttention
from detr_lab.models.attention.plain import PlainAttention
from detr_lab.timer import time_interleaved

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


class ActBenchError(ValueError):
    """Settings that do not go together, or inputs the benchmark cannot use (the message says which)."""


@dataclass
class ActBenchSettings:
    """What `run` measures; the fields are tools/bench_act.py's options (see the module docstring)."""

    hashes: list[int] = field(default_factory=lambda: [16, 20, 24, 32])  # values of L
    bucket_width: list[float] = field(default_factory=lambda: [1.0])  # values of r
    image_size: list[int] = field(default_factory=lambda: [800, 1066])  # H, W in pixels
    stride: int = 16  # feature stride (16 = DC5)
    embed_dim: int = 256
    heads: int = 8
    batch: int = 1
    seed: int = 0  # seeds weights, synthetic tokens and hashing
    tokens: Path | None = None
    checkpoint: Path | None = None
    config: Path | None = None
    image: Path | None = None
    layer: int = 0
    ap: bool = False
    ap_hashes: list[int] | None = None
    ap_bucket_width: list[float] | None = None
    ap_batch_size: int = 1
    ap_set: list[str] = field(default_factory=list)
    field_size: int = 8
    noise: float = 0.1
    runs: int = 7
    warmup: int = 2
    threads: int | None = None
    output: Path = Path("runs/bench_act.json")  # the JSON report; the AP sweep writes beside it


# ------------------------------------------------------------------------------------------ inputs
def synthetic_tokens(
    batch: int, height: int, width: int, dim: int, *, field_size: int, noise: float, seed: int
) -> torch.Tensor:
    """Smooth random feature map `[batch, height * width, dim]`: upsampled low-res field + noise."""
    generator = torch.Generator().manual_seed(seed)
    field_height = max(1, field_size)
    field_width = max(1, round(field_size * width / height))
    gaussian_field = torch.randn(batch, dim, field_height, field_width, generator=generator)
    smooth = F.interpolate(gaussian_field, size=(height, width), mode="bilinear", align_corners=False)
    smooth = smooth + noise * torch.randn(batch, dim, height, width, generator=generator)
    return smooth.flatten(2).transpose(1, 2).contiguous()  # (B, H*W, d)


def load_tokens(path: Path, dim: int) -> dict[str, torch.Tensor | None]:
    """Read `--tokens`: query / value `[B, HW, d]` and optional padding mask `[B, HW]`."""
    loaded = safe_load(path)
    if isinstance(loaded, torch.Tensor):
        loaded = {"query": loaded}
    if not isinstance(loaded, dict) or "query" not in loaded:
        raise ValueError(f"{path}: expected a [B, HW, d] tensor or a dict with key 'query'")
    query = loaded["query"].float()
    value = loaded.get("value")
    value = query if value is None else value.float()
    padding = loaded.get("padding_mask")
    if query.dim() != 3 or query.shape[-1] != dim:
        raise ValueError(f"{path}: 'query' must be [B, HW, {dim}], got {tuple(query.shape)}")
    if value.shape != query.shape:
        raise ValueError(f"{path}: 'value' {tuple(value.shape)} must match 'query' {tuple(query.shape)}")
    if padding is not None and (padding.dtype != torch.bool or padding.shape != query.shape[:2]):
        raise ValueError(
            f"{path}: 'padding_mask' must be bool {tuple(query.shape[:2])}, got {padding.dtype} "
            f"{tuple(padding.shape)}"
        )
    return {"query": query, "value": value, "padding_mask": padding}


def first_validation_image(cfg) -> Path:
    """The first image (by name) of the config's validation folder; generates the synthetic set if needed."""
    DetectionDataModule(cfg).prepare_data()
    folder = Path(cfg.data.root) / cfg.data.val_images
    images = sorted(p for p in folder.glob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not images:
        raise ActBenchError(f"no images in {folder}: pass --image")
    return images[0]


def load_image(path: Path, size: tuple[int, int], mean, std) -> torch.Tensor:
    """RGB image resized to `size` (H, W) bilinearly, ImageNet-normalized -> `[1, 3, H, W]`."""
    with Image.open(path) as image:
        resized = image.convert("RGB").resize((size[1], size[0]), Image.BILINEAR)
    pixels = torch.from_numpy(np.asarray(resized).copy()).permute(2, 0, 1).float() / 255  # (3, H, W)
    return ((pixels - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1))[None]


def capture_self_attention(model: torch.nn.Module, layer: int, images, padding_mask) -> dict:
    """Keyword arguments of encoder layer `layer`'s self-attention call in `model(images, padding_mask)`."""
    layers = model.transformer.encoder.layers
    if not 0 <= layer < len(layers):
        raise ActBenchError(f"--layer {layer}: the encoder has {len(layers)} layers")
    captured: dict = {}

    def hook(module, args, kwargs):
        if not captured:
            captured.update(kwargs)

    handle = layers[layer].self_attn.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            model(images, padding_mask)
    finally:
        handle.remove()
    return captured


def inputs_from_checkpoint(settings: ActBenchSettings) -> dict:
    """Encoder self-attention inputs and weights of a trained model (see the module docstring).

    Returns `query`, `value` `[1, N, d]`, `padding_mask` None, `state_dict` (the layer's attention
    weights), `heads`, `feature_map` (H, W) and `source`.
    """
    loaded = load_checkpoint(settings.checkpoint)
    cfg = load_config(settings.config) if settings.config else loaded.config
    path = settings.image or first_validation_image(cfg)
    height, width = settings.image_size
    images = load_image(path, (height, width), cfg.data.augment.mean, cfg.data.augment.std)
    padding_mask = torch.zeros(1, height, width, dtype=torch.bool)
    model = loaded.model.eval()
    call = capture_self_attention(model, settings.layer, images, padding_mask)
    shapes = call["spatial_shapes"].tolist()
    strides = [round(height / level_height) for level_height, _ in shapes]
    if settings.stride not in strides:
        raise ActBenchError(
            f"{settings.checkpoint}: no feature level of stride {settings.stride} at {height}x{width} "
            f"(level strides {strides}); pass --stride with one of them"
        )
    level = strides.index(settings.stride)
    start = int(call["level_start_index"][level])
    count = shapes[level][0] * shapes[level][1]
    attention = model.transformer.encoder.layers[settings.layer].self_attn
    levels = "single level"
    if len(shapes) > 1:
        levels = f"level {level} of {len(shapes)} (stride {settings.stride})"
    return {
        "query": call["query"][:, start : start + count].contiguous(),
        "value": call["value"][:, start : start + count].contiguous(),
        "padding_mask": None,
        "state_dict": {k: v.detach().clone() for k, v in attention.state_dict().items()},
        "heads": loaded.config.model.num_heads,
        "feature_map": shapes[level],
        "source": (
            f"checkpoint {settings.checkpoint}: encoder layer {settings.layer} self-attention inputs and "
            f"weights, {levels}, on {path} resized to {height}x{width}"
        ),
    }


# ------------------------------------------------------------------------------------------- costs
def counted_flops(module: torch.nn.Module, query, value, padding) -> int:
    """Matmul FLOPs of one call seen by FlopCounterMode (SDPA on its math backend)."""
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        return count_flops(
            lambda: module(query, query, value, key_padding_mask=padding, query_padding_mask=padding)
        )


def act_extra_flops(batch: int, heads: int, tokens: int, rounds: int, head_dim: int, clusters: float) -> int:
    """Element-wise ACT work not seen by the counter (see the module docstring)."""
    per_head = 3 * tokens * rounds + tokens * head_dim + clusters * head_dim
    return int(round(batch * heads * per_head))


def ideal_act_flops(batch: int, dim: int, heads: int, tokens: int, keys: int, rounds: int, clusters: float):
    """Projections + hashing matmul + prototype attention with the mean cluster count (no padding)."""
    head_dim = dim // heads
    projections = 4 * 2 * batch * tokens * dim * dim
    hashing = 2 * batch * heads * tokens * head_dim * rounds
    attention = 2 * 2 * batch * heads * clusters * keys * head_dim
    return int(round(projections + hashing + attention))


def timings_ms(functions: dict, runs: int, warmup: int) -> dict[str, dict[str, float]]:
    """Median and minimum wall milliseconds of each function under `torch.no_grad()`, timed by the
    package's timer (the functions take turns, so load drifts hit all alike)."""
    with torch.no_grad():
        times = time_interleaved(functions, runs=runs, warmup=warmup)
    return {
        name: {"median_ms": statistics.median(t["wall"]) * 1e3, "min_ms": min(t["wall"]) * 1e3}
        for name, t in times.items()
    }


# -------------------------------------------------------------------------------------------- main
def run(settings: ActBenchSettings) -> dict:
    """Measure every (L, r) of `settings` (and the AP sweep with `settings.ap`); returns the report.

    `settings.threads` sets torch's CPU threads for the run (restored afterwards).
    Raises:
        ActBenchError: settings that do not go together, a missing feature level or encoder layer.
        ValueError: a tokens file of the wrong layout. CheckpointError: an unreadable checkpoint.
    """
    threads_before = torch.get_num_threads()
    if settings.threads:
        torch.set_num_threads(settings.threads)
    try:
        return _run(settings)
    finally:
        torch.set_num_threads(threads_before)


def _run(settings: ActBenchSettings) -> dict:
    machine = describe_machine("cpu")  # its load average is the one before the measurements
    torch.manual_seed(settings.seed)
    height = math.ceil(settings.image_size[0] / settings.stride)
    width = math.ceil(settings.image_size[1] / settings.stride)
    heads = settings.heads
    weights = "PlainAttention's random initialization (same weights for plain and ACT)"
    state_dict = None
    if (settings.config or settings.ap or settings.image) and not settings.checkpoint:
        raise ActBenchError("--config, --image and --ap need --checkpoint")
    if settings.checkpoint and settings.tokens:
        raise ActBenchError("--checkpoint and --tokens are alternatives: pass one")
    if settings.ap_set and not settings.ap:
        raise ActBenchError("--ap-set applies to the AP sweep: add --ap")
    ap_config = resolve_ap_config(settings) if settings.ap else None
    if settings.checkpoint:
        inputs = inputs_from_checkpoint(settings)
        source, heads, state_dict = inputs["source"], inputs["heads"], inputs["state_dict"]
        height, width = inputs["feature_map"]
        weights = (
            f"encoder layer {settings.layer} self-attention of {settings.checkpoint} "
            "(same for plain and ACT)"
        )
    elif settings.tokens:
        inputs = load_tokens(settings.tokens, settings.embed_dim)
        source = f"tokens file {settings.tokens}"
    else:
        query = synthetic_tokens(
            settings.batch,
            height,
            width,
            settings.embed_dim,
            field_size=settings.field_size,
            noise=settings.noise,
            seed=settings.seed,
        )
        inputs = {"query": query, "value": query, "padding_mask": None}
        source = (
            f"synthetic smooth map {height}x{width}: {settings.field_size}-row Gaussian field upsampled "
            f"bilinearly + N(0, {settings.noise}^2) noise"
        )
    query, value, padding = inputs["query"], inputs["value"], inputs["padding_mask"]
    batch, tokens, dim = query.shape
    keys = tokens if padding is None else int((~padding).sum(dim=1).max())
    head_dim = dim // heads
    masks = {"key_padding_mask": padding, "query_padding_mask": padding}  # self-attention: same tokens

    plain = PlainAttention(dim, heads).eval()
    if state_dict is not None:
        plain.load_state_dict(state_dict)
    plain_flops = counted_flops(plain, query, value, padding)
    rows = []
    for bucket_width in settings.bucket_width:
        for rounds in settings.hashes:
            act = AdaptiveClusteringAttention(
                dim, heads, q_hashes=rounds, bucket_width=bucket_width, seed=settings.seed
            ).eval()
            act.load_state_dict(plain.state_dict())
            flops = counted_flops(act, query, value, padding)
            clusters = act.last_num_clusters
            max_clusters = int(act.last_clusters_per_head.max())
            with torch.no_grad():
                scaled = act.split_heads(act.q_proj(query)) * head_dim**-0.5
                exact = plain(query, query, value, **masks)
                approximate = act(query, query, value, **masks)
                relative_error = float((approximate - exact).norm() / exact.norm())
            timings = timings_ms(
                {
                    "plain": lambda: plain(query, query, value, **masks),
                    "act": lambda act=act: act(query, query, value, **masks),
                    "hash_and_cluster": lambda act=act, scaled=scaled: act.cluster_queries(
                        act.hash_queries(scaled)
                    ),
                },
                settings.runs,
                settings.warmup,
            )
            extra = act_extra_flops(batch, heads, tokens, rounds, head_dim, clusters)
            rows.append(
                {
                    "q_hashes": rounds,
                    "bucket_width": bucket_width,
                    "mean_clusters": clusters,
                    "max_clusters": max_clusters,
                    "relative_error": relative_error,
                    "act_gflops_counted": flops / 1e9,
                    "act_gflops_extra": extra / 1e9,
                    "act_gflops_ideal": (
                        ideal_act_flops(batch, dim, heads, tokens, keys, rounds, clusters) + extra
                    )
                    / 1e9,
                    "plain_ms": timings["plain"]["median_ms"],
                    "act_ms": timings["act"]["median_ms"],
                    "act_hash_and_cluster_ms": timings["hash_and_cluster"]["median_ms"],
                    "speedup": timings["plain"]["median_ms"] / timings["act"]["median_ms"],
                    "min_ms": {name: timing["min_ms"] for name, timing in timings.items()},
                }
            )
    return {
        "setting": {
            "image_size": settings.image_size,
            "stride": settings.stride,
            "feature_map": [int(height), int(width)],
            "tokens": tokens,
            "batch": batch,
            "embed_dim": dim,
            "heads": heads,
            "seed": settings.seed,
            "runs": settings.runs,
            "warmup": settings.warmup,
            "source": source,
            "weights": weights,
            "flop_convention": "one multiply-add = 2 FLOPs; matmuls counted by FlopCounterMode",
        },
        "machine": {**machine, "load_average_end": load_average()},
        "plain": {
            "gflops": plain_flops / 1e9,
            "ms": statistics.median(row["plain_ms"] for row in rows) if rows else None,
        },
        "act": rows,
        "ap": ap_sweep(settings, ap_config) if settings.ap else None,
    }


# ---------------------------------------------------------------------------------------- accuracy
class EncoderAttentionCost:
    """Counts, during evaluation, the encoder self-attention work of every ACT call.

    A global forward hook sees each `AdaptiveClusteringAttention` call (only encoder self-attention
    uses it): per image and layer it adds the closed-form FLOPs of plain and of ACT attention on the
    image's real tokens N (keys = queries = N), with the clusters K of each head:
    plain = 8 N d^2 + 4 N^2 d;  ACT = 8 N d^2 + 2 N d L + sum over heads of (3 N L + N h + K h + 4 K N h).
    The "core" totals leave out the q/k/v/out projections (8 N d^2), which ACT does not change and
    which dominate at small N.
    """

    def __init__(self) -> None:
        self.plain_flops = 0.0
        self.act_flops = 0.0
        self.projection_flops = 0.0
        self.clusters = 0.0
        self.tokens = 0.0
        self.calls = 0  # (image, layer) pairs
        self.head_calls = 0  # (image, layer, head) triples
        self.handle = None

    def __enter__(self) -> EncoderAttentionCost:
        self.handle = torch.nn.modules.module.register_module_forward_hook(self.hook, with_kwargs=True)
        return self

    def __exit__(self, *exc) -> None:
        self.handle.remove()

    def hook(self, module, args, kwargs, output) -> None:
        if not isinstance(module, AdaptiveClusteringAttention):
            return
        query = kwargs["query"] if "query" in kwargs else args[0]
        mask = kwargs.get("key_padding_mask")
        batch, length, dim = query.shape
        real = torch.full((batch,), length) if mask is None else (~mask).sum(1)
        clusters = module.last_clusters_per_head  # (B, heads), real queries' clusters
        heads, head_dim, rounds = module.num_heads, module.head_dim, module.q_hashes
        for image in range(batch):
            n = float(real[image])
            k = clusters[image].double()
            projections = 8 * n * dim * dim
            self.projection_flops += projections
            self.plain_flops += projections + 4 * n * n * dim
            per_head = 3 * n * rounds + n * head_dim + k * head_dim + 4 * k * n * head_dim
            self.act_flops += projections + 2 * n * dim * rounds + float(per_head.sum())
            self.clusters += float(k.sum())
            self.tokens += n
            self.calls += 1
            self.head_calls += heads


def resolve_ap_config(settings: ActBenchSettings) -> Path:
    """The config file of the AP sweep (`--config`, else the checkpoint's, saved beside the JSON).

    Checked with the `--ap-set` overrides before any measurement, so that a wrong key fails at once.
    """
    config = settings.config
    if config is None:  # the checkpoint's own config gives the dataset
        output_dir = settings.output.parent / f"{settings.output.stem}_ap"
        output_dir.mkdir(parents=True, exist_ok=True)
        stored = load_checkpoint(settings.checkpoint).config
        config = save_config(stored, output_dir / "checkpoint_config.yaml")
    try:
        load_config(config, overrides=settings.ap_set)
    except ConfigError as err:
        raise ActBenchError(f"--ap-set: {err}") from None
    return Path(config)


def ap_sweep(settings: ActBenchSettings, config: Path) -> dict:
    """COCO AP of the checkpoint with plain and with ACT encoder attention (see the module docstring)."""
    output_dir = settings.output.parent / f"{settings.output.stem}_ap"
    hashes = settings.ap_hashes or settings.hashes
    widths = settings.ap_bucket_width or settings.bucket_width

    def evaluate(name: str, overrides: list[str]) -> dict:
        start = time.perf_counter()
        with EncoderAttentionCost() as cost:
            result = evaluate_checkpoint(
                config, settings.checkpoint, overrides=overrides, output=output_dir / f"{name}.json",
                device="cpu", batch_size=settings.ap_batch_size, progress=False,
            )  # fmt: skip
        row = {"overrides": overrides, "AP": result.stats["AP"], "AP50": result.stats["AP50"],
               "images": result.num_images, "seconds": time.perf_counter() - start}  # fmt: skip
        if cost.calls:
            row.update(
                mean_clusters=cost.clusters / cost.head_calls,
                mean_tokens=cost.tokens / cost.calls,
                flops_ratio=cost.act_flops / cost.plain_flops,
                core_flops_ratio=(cost.act_flops - cost.projection_flops)
                / (cost.plain_flops - cost.projection_flops),
            )
        print(f"  {name}: AP {row['AP']:.4f} ({row['seconds']:.0f} s)", file=sys.stderr)
        return row

    plain = evaluate("plain", list(settings.ap_set))
    rows = []
    for bucket_width in widths:
        for rounds in hashes:
            overrides = [
                "model.encoder.attention=act",
                f"model.encoder.act.q_hashes={rounds}",
                f"model.encoder.act.bucket_width={bucket_width}",
            ]
            row = evaluate(f"act_L{rounds}_r{bucket_width:g}", settings.ap_set + overrides)
            row.update(q_hashes=rounds, bucket_width=bucket_width, ap_drop=plain["AP"] - row["AP"])
            rows.append(row)
    return {
        "checkpoint": str(settings.checkpoint), "config": str(config), "overrides": list(settings.ap_set),
        "plain": plain, "act": rows,
    }  # fmt: skip


def format_act_table(result: dict) -> str:
    """The measured rows (and the AP sweep) as printed by tools/bench_act.py."""
    plain = result["plain"]
    lines = [
        f"input: {result['setting']['source']}",
        f"tokens {result['setting']['tokens']} x batch {result['setting']['batch']}, "
        f"d {result['setting']['embed_dim']}, {result['setting']['heads']} heads; "
        f"machine: {result['machine']['cpu_model']}, {result['machine']['torch_threads']} threads",
        f"load average at the start and end: {result['machine']['load_average']} -> "
        f"{result['machine']['load_average_end']}",
        f"plain: {plain['gflops']:.3f} GFLOPs, median {plain['ms']:.1f} ms over the rows below",
        f"{'L':>3} {'r':>6} {'clusters':>9} {'max':>5} {'GFLOPs':>8} {'ideal':>7} {'ratio':>6} "
        f"{'plain ms':>9} {'ACT ms':>8} {'hash+cl':>8} {'speedup':>7} {'rel.err':>7}",
    ]
    for row in result["act"]:
        total = row["act_gflops_counted"] + row["act_gflops_extra"]
        lines.append(
            f"{row['q_hashes']:>3} {row['bucket_width']:>6g} {row['mean_clusters']:>9.1f} "
            f"{row['max_clusters']:>5} {total:>8.3f} {row['act_gflops_ideal']:>7.3f} "
            f"{total / plain['gflops']:>6.2f} {row['plain_ms']:>9.1f} {row['act_ms']:>8.1f} "
            f"{row['act_hash_and_cluster_ms']:>8.1f} {row['speedup']:>7.2f} {row['relative_error']:>7.3f}"
        )
    ap = result.get("ap")
    if ap:
        plain_ap = ap["plain"]
        lines += [
            "",
            f"AP on the validation set of {ap['config']} ({plain_ap['images']} images)"
            + (f" with {' '.join(ap['overrides'])}" if ap.get("overrides") else "")
            + ", no retraining:",
            f"plain: AP {plain_ap['AP']:.4f}, AP50 {plain_ap['AP50']:.4f}",
            f"{'L':>3} {'r':>6} {'AP':>7} {'AP50':>7} {'drop':>7} {'clusters':>9} {'tokens':>7} {'FLOPs':>6} "
            f"{'core':>6}",
        ]
        for row in ap["act"]:
            lines.append(
                f"{row['q_hashes']:>3} {row['bucket_width']:>6g} {row['AP']:>7.4f} {row['AP50']:>7.4f} "
                f"{row['ap_drop']:>7.4f} {row['mean_clusters']:>9.1f} {row['mean_tokens']:>7.1f} "
                f"{row['flops_ratio']:>6.2f} {row['core_flops_ratio']:>6.2f}"
            )
    return "\n".join(lines)
