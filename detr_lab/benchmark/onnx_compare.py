"""Two ONNX detectors side by side on onnxruntime (the library behind tools/bench_official_onnx.py).

    sessions = {"detr_lab": ..., "official": ...}          # onnxruntime.InferenceSession each
    feeds = {"detr_lab": {...}, "official": {...}}          # each graph's own inputs, same image
    result = time_sessions(sessions, feeds, runs=10, warmup=2)
    print(format_comparison(results, machine, commands))

Written for the RT-DETR comparison: detr_lab's export (inputs `images` + `padding_mask`, outputs the
raw `pred_logits` / `pred_boxes`) against the official lyuwenyu/RT-DETR export (inputs `images` +
`orig_target_sizes`, outputs the post-processed `labels`, `boxes`, `scores`: the top 300 of the
sigmoid scores over every (query, class), boxes in pixels x1 y1 x2 y2). `official_postprocess` applies
that post-processing to detr_lab's outputs, so that the two can be checked against each other before
they are timed, and `rtdetr_anchors` recomputes the official decoder's `anchors` / `valid_mask`
buffers for an input size (the official module registers them for its `eval_spatial_size`).

Timing: the sessions take turns within every run, the order alternating from run to run
(`detr_lab.timer.time_interleaved`), so that load from other processes hits them alike; each figure
is the median over runs of the wall time and of the process CPU time (all threads), and the ratio is
median(A) / median(B) (also the median over runs of the per-run ratio, `paired`).
"""

from __future__ import annotations

import collections
import json
import os
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from detr_lab.benchmark.machine import package_version
from detr_lab.export.dependencies import require
from detr_lab.export.ort_session import create_session
from detr_lab.timer import ratio, summarize, time_interleaved


def rtdetr_anchors(
    height: int,
    width: int,
    strides: Sequence[int] = (8, 16, 32),
    grid_size: float = 0.05,
    eps: float = 1e-2,
) -> tuple[Tensor, Tensor]:
    """The official RT-DETR decoder's `anchors` `[1, N, 4]` (inverse-sigmoid cx, cy, w, h; +inf where
    invalid) and `valid_mask` `[1, N, 1]` for a `height` x `width` input: per level of stride s an
    `int(height / s)` x `int(width / s)` grid of pixel-centre anchors of side `grid_size * 2**level`,
    valid where every coordinate lies in (eps, 1 - eps)."""
    levels = []
    for level, stride in enumerate(strides):
        rows, cols = int(height / stride), int(width / stride)
        y, x = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")
        grid = torch.stack((x, y), dim=-1).float()
        centres = (grid + 0.5) / torch.tensor([cols, rows], dtype=torch.float32)
        sides = torch.full_like(centres, grid_size * 2.0**level)
        levels.append(torch.cat((centres, sides), dim=-1).reshape(1, rows * cols, 4))
    anchors = torch.cat(levels, dim=1)
    valid = ((anchors > eps) & (anchors < 1 - eps)).all(-1, keepdim=True)
    return torch.where(valid, torch.log(anchors / (1 - anchors)), torch.inf), valid


def official_postprocess(
    logits: np.ndarray, boxes: np.ndarray, width: int, height: int, top: int = 300
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(labels, boxes, scores) of one image as the official RT-DETR post-processor (focal-loss
    scores) returns them: the `top` largest sigmoid scores over every (query, class) `[Q, C]` of
    `logits`, in decreasing order, their class indices, and their boxes (`boxes` `[Q, 4]` normalized
    cx, cy, w, h) as pixel x1, y1, x2, y2 of a `width` x `height` image."""
    num_classes = logits.shape[-1]
    scores = 1.0 / (1.0 + np.exp(-logits.astype(np.float64).reshape(-1)))
    order = np.argsort(-scores, kind="stable")[:top]
    cx, cy, w, h = boxes[order // num_classes].astype(np.float64).T
    corners = np.stack((cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2), axis=-1)
    return order % num_classes, corners * np.array([width, height, width, height]), scores[order]


def compare_detections(ours: tuple, official: tuple) -> dict:
    """Agreement of two (labels, boxes, scores) lists ranked by score: the largest score difference
    at equal rank, the share of ranks with the same class, and the largest box difference (pixels)
    over those ranks. Near-equal scores may swap ranks, which shows in the last two only."""
    labels, boxes, scores = (np.asarray(a) for a in ours)
    labels_o, boxes_o, scores_o = (np.asarray(a) for a in official)
    if labels.shape != labels_o.shape or boxes.shape != boxes_o.shape:
        raise ValueError(f"detections of different shapes: {labels.shape} / {boxes.shape} against "
                         f"{labels_o.shape} / {boxes_o.shape}")
    same = labels == labels_o
    return {
        "max_score_difference": float(np.abs(scores - scores_o).max()),
        "same_label_share": float(same.mean()),
        "max_box_difference_px": float(np.abs(boxes - boxes_o)[same].max()) if same.any() else None,
    }


def op_type_counts(path: str | os.PathLike) -> dict[str, int]:
    """Nodes per operator type of an ONNX graph (top level), most frequent first."""
    onnx = require("onnx")
    model = onnx.load(str(path), load_external_data=False)
    counts = collections.Counter(node.op_type for node in model.graph.node)
    return dict(counts.most_common())


def make_session(path: str | os.PathLike, threads: int | None, *, profile_prefix: str | None = None):
    """A CPU `onnxruntime.InferenceSession` with detr_lab's settings (`detr_lab.export.ort_session`,
    given to both graphs of a comparison alike), `threads` intra-op threads (None: onnxruntime's
    choice) and, with `profile_prefix`, onnxruntime's profiler on."""
    return create_session(path, threads=threads, profile_prefix=profile_prefix)


def time_sessions(
    sessions: Mapping[str, object], feeds: Mapping[str, dict], *, runs: int, warmup: int, block: int = 1
) -> dict[str, dict]:
    """Wall and CPU seconds of `sessions[name].run(None, feeds[name])`, the sessions taking turns of
    `block` timed calls (`time_interleaved`; use `block` > 1 with several onnxruntime threads); per
    name `{"wall_s": summarize(...), "cpu_s": summarize(...)}` over `runs` timed calls.

    Raises:
        ValueError: `runs` or `block` < 1, or `warmup` < 0.
    """
    calls = {name: (lambda s=session, f=feeds[name]: s.run(None, f)) for name, session in sessions.items()}
    times = time_interleaved(calls, runs=runs, warmup=warmup, block=block)
    return {name: {"wall_s": summarize(t["wall"]), "cpu_s": summarize(t["cpu"])} for name, t in times.items()}


def ratios(result: Mapping[str, dict], numerator: str, denominator: str) -> dict[str, float]:
    """median(numerator) / median(denominator) of the wall and the CPU times, and the median of the
    per-run wall ratios (`paired_wall`)."""
    top, bottom = result[numerator], result[denominator]
    return {
        "wall": ratio(top["wall_s"]["median"], bottom["wall_s"]["median"]),
        "cpu": ratio(top["cpu_s"]["median"], bottom["cpu_s"]["median"]),
        "paired_wall": round(statistics.median(
            a / b for a, b in zip(top["wall_s"]["values"], bottom["wall_s"]["values"], strict=True)
        ), 4),
    }


def profile_by_op_type(profile_file: str | os.PathLike) -> dict[str, float]:
    """Milliseconds per run and operator type from an onnxruntime profile (the kernels' own time,
    summed over the runs the profile holds, divided by their number), largest first."""
    events = json.loads(Path(profile_file).read_text())
    runs = sum(1 for e in events if e.get("cat") == "Session" and e.get("name") == "model_run") or 1
    totals: collections.Counter = collections.Counter()
    for event in events:
        if event.get("cat") == "Node" and event.get("name", "").endswith("_kernel_time"):
            totals[event["args"]["op_name"]] += event["dur"]
    return {op: round(us / runs / 1e3, 3) for op, us in totals.most_common()}


def runtime_versions() -> dict[str, str | None]:
    """onnxruntime, onnx and numpy versions (None where not installed)."""
    return {name: package_version(name) for name in ("onnxruntime", "onnx", "numpy")}


def format_comparison(rows: Sequence[dict], names: Sequence[str], baseline: str) -> str:
    """A markdown table: one row per thread count, each name's median wall ms (CPU ms in brackets),
    and the ratio of every other name to `baseline` (wall, CPU)."""
    others = [name for name in names if name != baseline]
    header = ["threads", *(f"{name} ms (CPU ms)" for name in names),
              *(f"{name} / {baseline} wall (CPU)" for name in others)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [str(row["threads"])]
        for name in names:
            figures = row["times"][name]
            cells.append(f"{figures['wall_s']['median'] * 1e3:.0f} ({figures['cpu_s']['median'] * 1e3:.0f})")
        for name in others:
            r = row["ratios"][name]
            cells.append(f"**{r['wall']:.3f}** ({r['cpu']:.3f})")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
