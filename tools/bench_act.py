"""Encoder self-attention cost of ACT (adaptive clustering) against plain attention.

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

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from detr_lab.models.attention.clustering import AdaptiveClusteringAttention
from detr_lab.models.attention.plain import PlainAttention

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hashes", type=int, nargs="+", default=[16, 20, 24, 32], help="values of L")
    parser.add_argument("--bucket-width", type=float, nargs="+", default=[1.0], help="values of r")
    parser.add_argument("--image-size", type=int, nargs=2, default=[800, 1066], metavar=("H", "W"))
    parser.add_argument("--stride", type=int, default=16, help="feature stride (16 = DC5)")
    parser.add_argument("--embed-dim", type=int, default=256)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0, help="seeds weights, synthetic tokens and hashing")
    parser.add_argument("--tokens", type=Path, help="torch.save'd [B, HW, d] tensor or dict (see above)")
    parser.add_argument("--checkpoint", type=Path, help="trained model checkpoint (see above)")
    parser.add_argument("--config", type=Path, help="YAML giving the dataset (default: the checkpoint's)")
    parser.add_argument("--image", type=Path, help="image to run (default: the first val image)")
    parser.add_argument("--layer", type=int, default=0, help="encoder layer whose inputs are captured")
    parser.add_argument("--ap", action="store_true", help="AP of plain vs ACT attention (see above)")
    parser.add_argument("--ap-hashes", type=int, nargs="+", help="L values of the AP sweep "
                        "(default --hashes)")  # fmt: skip
    parser.add_argument("--ap-bucket-width", type=float, nargs="+", help="r values of the AP sweep "
                        "(default --bucket-width)")  # fmt: skip
    parser.add_argument("--ap-batch-size", type=int, default=1, help="images per forward pass (AP sweep)")
    parser.add_argument("--ap-set", action="append", default=[], metavar="KEY=VALUE",
                        help="config override for every evaluation of the AP sweep, e.g. "
                        "data.augment.eval_size=480 (repeatable)")  # fmt: skip
    parser.add_argument("--field-size", type=int, default=8, help="synthetic: low-res field rows")
    parser.add_argument("--noise", type=float, default=0.1, help="synthetic: white-noise std")
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--json", type=Path, default=Path("runs/bench_act.json"), help="output JSON path")
    return parser.parse_args(argv)


# ------------------------------------------------------------------------------------------ inputs
def synthetic_tokens(
    batch: int, height: int, width: int, dim: int, *, field_size: int, noise: float, seed: int
) -> torch.Tensor:
    """Smooth random feature map `[batch, height * width, dim]`: upsampled low-res field + noise."""
    generator = torch.Generator().manual_seed(seed)
    field_height = max(1, field_size)
    field_width = max(1, round(field_size * width / height))
    field = torch.randn(batch, dim, field_height, field_width, generator=generator)
    smooth = F.interpolate(field, size=(height, width), mode="bilinear", align_corners=False)
    smooth = smooth + noise * torch.randn(batch, dim, height, width, generator=generator)
    return smooth.flatten(2).transpose(1, 2).contiguous()  # (B, H*W, d)


def load_tokens(path: Path, dim: int) -> dict[str, torch.Tensor | None]:
    """Read `--tokens`: query / value `[B, HW, d]` and optional padding mask `[B, HW]`."""
    loaded = torch.load(path, map_location="cpu", weights_only=True)
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
    from detr_lab.data.datamodule import DetectionDataModule

    DetectionDataModule(cfg).prepare_data()
    folder = Path(cfg.data.root) / cfg.data.val_images
    images = sorted(p for p in folder.glob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not images:
        raise SystemExit(f"no images in {folder}: pass --image")
    return images[0]


def load_image(path: Path, size: tuple[int, int], mean, std) -> torch.Tensor:
    """RGB image resized to `size` (H, W) bilinearly, ImageNet-normalized -> `[1, 3, H, W]`."""
    import numpy as np
    from PIL import Image

    with Image.open(path) as image:
        resized = image.convert("RGB").resize((size[1], size[0]), Image.BILINEAR)
    pixels = torch.from_numpy(np.asarray(resized).copy()).permute(2, 0, 1).float() / 255  # (3, H, W)
    return ((pixels - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1))[None]


def capture_self_attention(model: torch.nn.Module, layer: int, images, padding_mask) -> dict:
    """Keyword arguments of encoder layer `layer`'s self-attention call in `model(images, padding_mask)`."""
    layers = model.transformer.encoder.layers
    if not 0 <= layer < len(layers):
        raise SystemExit(f"--layer {layer}: the encoder has {len(layers)} layers")
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


def inputs_from_checkpoint(args: argparse.Namespace) -> dict:
    """Encoder self-attention inputs and weights of a trained model (see the module docstring).

    Returns `query`, `value` `[1, N, d]`, `padding_mask` None, `state_dict` (the layer's attention
    weights), `heads`, `feature_map` (H, W) and `source`.
    """
    from detr_lab.checkpoints import load_checkpoint
    from detr_lab.config import load_config

    loaded = load_checkpoint(args.checkpoint)
    cfg = load_config(args.config) if args.config else loaded.config
    path = args.image or first_validation_image(cfg)
    height, width = args.image_size
    images = load_image(path, (height, width), cfg.data.augment.mean, cfg.data.augment.std)
    padding_mask = torch.zeros(1, height, width, dtype=torch.bool)
    model = loaded.model.eval()
    call = capture_self_attention(model, args.layer, images, padding_mask)
    shapes = call["spatial_shapes"].tolist()
    strides = [round(height / level_height) for level_height, _ in shapes]
    if args.stride not in strides:
        raise SystemExit(
            f"{args.checkpoint}: no feature level of stride {args.stride} at {height}x{width} "
            f"(level strides {strides}); pass --stride with one of them"
        )
    level = strides.index(args.stride)
    start = int(call["level_start_index"][level])
    count = shapes[level][0] * shapes[level][1]
    attention = model.transformer.encoder.layers[args.layer].self_attn
    levels = f"level {level} of {len(shapes)} (stride {args.stride})" if len(shapes) > 1 else "single level"
    return {
        "query": call["query"][:, start : start + count].contiguous(),
        "value": call["value"][:, start : start + count].contiguous(),
        "padding_mask": None,
        "state_dict": {k: v.detach().clone() for k, v in attention.state_dict().items()},
        "heads": loaded.config.model.num_heads,
        "feature_map": shapes[level],
        "source": (
            f"checkpoint {args.checkpoint}: encoder layer {args.layer} self-attention inputs and weights, "
            f"{levels}, on {path} resized to {height}x{width}"
        ),
    }


# ------------------------------------------------------------------------------------------- costs
def counted_flops(module: torch.nn.Module, query, value, padding) -> int:
    """Matmul FLOPs of one call seen by FlopCounterMode (SDPA on its math backend)."""
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        module(query, query, value, key_padding_mask=padding, query_padding_mask=padding)
    return int(counter.get_total_flops())


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


def interleaved_timings(functions: dict, runs: int, warmup: int) -> dict[str, dict[str, float]]:
    """Median and minimum milliseconds of each function, called in turn so load drifts hit all alike."""
    times: dict[str, list[float]] = {name: [] for name in functions}
    with torch.no_grad():
        for index in range(warmup + runs):
            for name, function in functions.items():
                start = time.perf_counter()
                function()
                if index >= warmup:
                    times[name].append((time.perf_counter() - start) * 1e3)
    return {name: {"median_ms": statistics.median(t), "min_ms": min(t)} for name, t in times.items()}


def machine_description() -> dict:
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": model,
        "logical_cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "load_average_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


# -------------------------------------------------------------------------------------------- main
def run(args: argparse.Namespace) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    height = math.ceil(args.image_size[0] / args.stride)
    width = math.ceil(args.image_size[1] / args.stride)
    heads = args.heads
    weights = "PlainAttention's random initialization (same weights for plain and ACT)"
    state_dict = None
    if (args.config or args.ap or args.image) and not args.checkpoint:
        raise SystemExit("--config, --image and --ap need --checkpoint")
    if args.checkpoint and args.tokens:
        raise SystemExit("--checkpoint and --tokens are alternatives: pass one")
    if args.ap_set and not args.ap:
        raise SystemExit("--ap-set applies to the AP sweep: add --ap")
    if args.ap:
        args.ap_config = resolve_ap_config(args)
    if args.checkpoint:
        inputs = inputs_from_checkpoint(args)
        source, heads, state_dict = inputs["source"], inputs["heads"], inputs["state_dict"]
        height, width = inputs["feature_map"]
        weights = f"encoder layer {args.layer} self-attention of {args.checkpoint} (same for plain and ACT)"
    elif args.tokens:
        inputs = load_tokens(args.tokens, args.embed_dim)
        source = f"tokens file {args.tokens}"
    else:
        query = synthetic_tokens(
            args.batch,
            height,
            width,
            args.embed_dim,
            field_size=args.field_size,
            noise=args.noise,
            seed=args.seed,
        )
        inputs = {"query": query, "value": query, "padding_mask": None}
        source = (
            f"synthetic smooth map {height}x{width}: {args.field_size}-row Gaussian field upsampled "
            f"bilinearly + N(0, {args.noise}^2) noise"
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
    for bucket_width in args.bucket_width:
        for rounds in args.hashes:
            act = AdaptiveClusteringAttention(
                dim, heads, q_hashes=rounds, bucket_width=bucket_width, seed=args.seed
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
            timings = interleaved_timings(
                {
                    "plain": lambda: plain(query, query, value, **masks),
                    "act": lambda act=act: act(query, query, value, **masks),
                    "hash_and_cluster": lambda act=act, scaled=scaled: act.cluster_queries(
                        act.hash_queries(scaled)
                    ),
                },
                args.runs,
                args.warmup,
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
            "image_size": args.image_size,
            "stride": args.stride,
            "feature_map": [int(height), int(width)],
            "tokens": tokens,
            "batch": batch,
            "embed_dim": dim,
            "heads": heads,
            "seed": args.seed,
            "runs": args.runs,
            "warmup": args.warmup,
            "source": source,
            "weights": weights,
            "flop_convention": "one multiply-add = 2 FLOPs; matmuls counted by FlopCounterMode",
        },
        "machine": machine_description(),
        "plain": {
            "gflops": plain_flops / 1e9,
            "ms": statistics.median(row["plain_ms"] for row in rows) if rows else None,
        },
        "act": rows,
        "ap": ap_sweep(args) if args.ap else None,
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


def resolve_ap_config(args: argparse.Namespace) -> Path:
    """The config file of the AP sweep (`--config`, else the checkpoint's, saved beside the JSON).

    Checked with the `--ap-set` overrides before any measurement, so that a wrong key fails at once.
    """
    from detr_lab.checkpoints import load_checkpoint
    from detr_lab.config import ConfigError, load_config, save_config

    config = args.config
    if config is None:  # the checkpoint's own config gives the dataset
        output_dir = args.json.parent / f"{args.json.stem}_ap"
        output_dir.mkdir(parents=True, exist_ok=True)
        config = save_config(load_checkpoint(args.checkpoint).config, output_dir / "checkpoint_config.yaml")
    try:
        load_config(config, overrides=args.ap_set)
    except ConfigError as err:
        raise SystemExit(f"--ap-set: {err}") from None
    return Path(config)


def ap_sweep(args: argparse.Namespace) -> dict:
    """COCO AP of the checkpoint with plain and with ACT encoder attention (see the module docstring)."""
    from detr_lab.engine.evaluate import evaluate_checkpoint

    config = args.ap_config
    output_dir = args.json.parent / f"{args.json.stem}_ap"
    hashes = args.ap_hashes or args.hashes
    widths = args.ap_bucket_width or args.bucket_width

    def evaluate(name: str, overrides: list[str]) -> dict:
        start = time.perf_counter()
        with EncoderAttentionCost() as cost:
            result = evaluate_checkpoint(
                config, args.checkpoint, overrides=overrides, output=output_dir / f"{name}.json",
                device="cpu", batch_size=args.ap_batch_size, progress=False,
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

    plain = evaluate("plain", list(args.ap_set))
    rows = []
    for bucket_width in widths:
        for rounds in hashes:
            overrides = [
                "model.encoder.attention=act",
                f"model.encoder.act.q_hashes={rounds}",
                f"model.encoder.act.bucket_width={bucket_width}",
            ]
            row = evaluate(f"act_L{rounds}_r{bucket_width:g}", args.ap_set + overrides)
            row.update(q_hashes=rounds, bucket_width=bucket_width, ap_drop=plain["AP"] - row["AP"])
            rows.append(row)
    return {
        "checkpoint": str(args.checkpoint), "config": str(config), "overrides": list(args.ap_set),
        "plain": plain, "act": rows,
    }  # fmt: skip


def format_table(result: dict) -> str:
    plain = result["plain"]
    lines = [
        f"input: {result['setting']['source']}",
        f"tokens {result['setting']['tokens']} x batch {result['setting']['batch']}, "
        f"d {result['setting']['embed_dim']}, {result['setting']['heads']} heads; "
        f"machine: {result['machine']['cpu']}, {result['machine']['torch_threads']} threads",
        f"load average (1 min) at the end: {result['machine']['load_average_1min']}",
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


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    result = run(args)
    print(format_table(result))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.json}", file=sys.stderr)


if __name__ == "__main__":
    main()
