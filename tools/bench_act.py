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
- `--checkpoint PATH --config PATH`: encoder inputs and attention weights of a trained model (not
  supported yet: the script says so and stops);
- otherwise a synthetic smooth feature map: a low-resolution Gaussian field upsampled bilinearly to
  the token grid plus small white noise, which clusters far more like real encoder features than
  i.i.d. Gaussian tokens (those put nearly every query in its own cluster).

Extra FLOPs counted by formula for ACT, per (image, head) with N queries, L rounds, K clusters,
head_dim h: hashing adds the offset, divides by r and floors (3 N L); the prototype means need N h
additions and K h divisions.

    python tools/bench_act.py --hashes 16 20 24 32 --bucket-width 1 4 --json runs/bench_act.json
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
    parser.add_argument("--checkpoint", type=Path, help="trained model checkpoint (with --config)")
    parser.add_argument("--config", type=Path, help="config of --checkpoint")
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


def inputs_from_checkpoint(checkpoint: Path, config: Path) -> dict:
    """Encoder self-attention inputs and weights of a trained model (not supported yet)."""
    raise SystemExit(
        f"--checkpoint {checkpoint} --config {config}: reading encoder inputs from a trained model is not "
        "supported yet; save the first encoder layer's inputs with torch.save and pass --tokens"
    )


# ------------------------------------------------------------------------------------------- costs
def counted_flops(module: torch.nn.Module, query, value, padding) -> int:
    """Matmul FLOPs of one call seen by FlopCounterMode (SDPA on its math backend)."""
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        module(query, query, value, key_padding_mask=padding)
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
    if args.checkpoint or args.config:
        if not (args.checkpoint and args.config):
            raise SystemExit("--checkpoint and --config go together")
        inputs_from_checkpoint(args.checkpoint, args.config)
    if args.tokens:
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
    head_dim = dim // args.heads

    plain = PlainAttention(dim, args.heads).eval()
    plain_flops = counted_flops(plain, query, value, padding)
    rows = []
    for bucket_width in args.bucket_width:
        for rounds in args.hashes:
            act = AdaptiveClusteringAttention(
                dim, args.heads, q_hashes=rounds, bucket_width=bucket_width, seed=args.seed
            ).eval()
            act.load_state_dict(plain.state_dict())
            flops = counted_flops(act, query, value, padding)
            clusters = act.last_num_clusters
            max_clusters = int(act.last_clusters_per_head.max())
            with torch.no_grad():
                scaled = act.split_heads(act.q_proj(query)) * head_dim**-0.5
                exact = plain(query, query, value, key_padding_mask=padding)
                approximate = act(query, query, value, key_padding_mask=padding)
                relative_error = float((approximate - exact).norm() / exact.norm())
            timings = interleaved_timings(
                {
                    "plain": lambda: plain(query, query, value, key_padding_mask=padding),
                    "act": lambda act=act: act(query, query, value, key_padding_mask=padding),
                    "hash_and_cluster": lambda act=act, scaled=scaled: act.cluster_queries(
                        act.hash_queries(scaled)
                    ),
                },
                args.runs,
                args.warmup,
            )
            extra = act_extra_flops(batch, args.heads, tokens, rounds, head_dim, clusters)
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
                        ideal_act_flops(batch, dim, args.heads, tokens, keys, rounds, clusters) + extra
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
            "feature_map": [height, width],
            "tokens": tokens,
            "batch": batch,
            "embed_dim": dim,
            "heads": args.heads,
            "seed": args.seed,
            "runs": args.runs,
            "warmup": args.warmup,
            "source": source,
            "weights": "PlainAttention's random initialization (same weights for plain and ACT)",
            "flop_convention": "one multiply-add = 2 FLOPs; matmuls counted by FlopCounterMode",
        },
        "machine": machine_description(),
        "plain": {
            "gflops": plain_flops / 1e9,
            "ms": statistics.median(row["plain_ms"] for row in rows) if rows else None,
        },
        "act": rows,
    }


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
