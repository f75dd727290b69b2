"""Matplotlib drawings written as PNG files: detections against ground truth, attention maps,
deformable sampling points, query clusters. Inputs are plain arrays in image pixels.

Figures are built with `matplotlib.figure.Figure` (no pyplot state, no display needed) and written
atomically (a temporary file, then a rename).
"""

from __future__ import annotations

import os
import tempfile
import textwrap
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib import colormaps
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

DPI = 100


def save_figure(figure: Figure, path: str | os.PathLike) -> Path:
    """Write `figure` as a PNG at `path` (parent folders created, atomic) and return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".png")
    os.close(handle)
    try:
        figure.savefig(tmp, dpi=DPI, format="png")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _image_figure(image: np.ndarray, title: str, *, min_inches: float = 5.0) -> tuple[Figure, object]:
    """A figure sized to the image (longer side at least `min_inches`), the image shown, axes off, and
    the title wrapped above it."""
    height, width = image.shape[:2]
    scale = max(min_inches / max(width, height) * DPI, 1.0)
    width_px, height_px = width * scale, height * scale
    lines = textwrap.wrap(title, width=max(30, int(width_px / 7.2))) or [""]
    header_px = 14 * len(lines) + 8
    figure = Figure(figsize=(width_px / DPI, (height_px + header_px) / DPI), dpi=DPI)
    axes = figure.add_axes((0, 0, 1, height_px / (height_px + header_px)))
    axes.imshow(image)
    axes.set_axis_off()
    axes.set_xlim(-0.5, width - 0.5)
    axes.set_ylim(height - 0.5, -0.5)
    figure.text(0.5, 1 - 4 / (height_px + header_px), "\n".join(lines), fontsize=9, ha="center", va="top")
    return figure, axes


def _box(axes, box: Sequence[float], color, *, dashed: bool = False, width: float = 2.0) -> None:
    x1, y1, x2, y2 = (float(v) for v in box)
    axes.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, edgecolor=color, linewidth=width,
                             linestyle="--" if dashed else "-"))


def _label(axes, x: float, y: float, text: str, color) -> None:
    axes.text(x, y, text, fontsize=7, color="white", va="bottom", ha="left",
              bbox={"facecolor": color, "alpha": 0.8, "pad": 1, "edgecolor": "none"})


def class_colors(num_classes: int) -> list[tuple[float, float, float, float]]:
    """One distinct colour per class index (tab10 / tab20 cycles)."""
    cmap = colormaps["tab10" if num_classes <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(num_classes)]


def draw_detections(
    image: np.ndarray,
    path: str | os.PathLike,
    *,
    gt_boxes: np.ndarray,
    gt_labels: np.ndarray,
    boxes: np.ndarray,
    labels: np.ndarray,
    scores: np.ndarray,
    class_names: Sequence[str],
    score_threshold: float = 0.5,
    title: str = "",
) -> Path:
    """Predictions (solid, with class and score) over ground truth (dashed white) on one image.

    Args:
        image: uint8 `[H, W, 3]` RGB.
        gt_boxes: `[N, 4]` absolute xyxy pixels; gt_labels: `[N]` class indices.
        boxes: `[K, 4]` absolute xyxy pixels; labels `[K]` class indices; scores `[K]` in [0, 1];
            only those with score >= `score_threshold` are drawn.
    Returns:
        The PNG path.
    """
    colors = class_colors(len(class_names))
    keep = np.asarray(scores) >= score_threshold
    heading = f"{title}  ".lstrip() + (f"{int(keep.sum())} predictions with score >= {score_threshold:g} "
                                       f"(solid), {len(gt_boxes)} ground-truth objects (dashed)")
    figure, axes = _image_figure(image, heading)
    gt_boxes, gt_labels = np.asarray(gt_boxes).reshape(-1, 4), np.asarray(gt_labels).reshape(-1)
    for box, label in zip(gt_boxes, gt_labels, strict=True):
        _box(axes, box, "white", dashed=True, width=2.5)
        _box(axes, box, colors[int(label)], dashed=True, width=1.2)
    order = np.argsort(-np.asarray(scores))
    for i in order:
        if not keep[i]:
            continue
        label = int(labels[i])
        _box(axes, boxes[i], colors[label])
        _label(axes, float(boxes[i][0]), float(boxes[i][1]), f"{class_names[label]} {float(scores[i]):.2f}",
               colors[label])
    return save_figure(figure, path)


def draw_heatmap(
    image: np.ndarray, heat: np.ndarray, path: str | os.PathLike, *, box: Sequence[float] | None, title: str
) -> Path:
    """An attention map (`[H, W]`, same size as `image`) over the image, plus the query's box.

    The colours span the map's own range (min dark, max bright), so weak but uneven attention shows.
    """
    figure, axes = _image_figure(image, title)
    low, high = float(heat.min()), float(heat.max())
    scaled = (heat - low) / (high - low) if high > low else np.zeros_like(heat)
    axes.imshow(scaled, cmap="inferno", alpha=0.6, vmin=0, vmax=1, interpolation="nearest")
    if box is not None:
        _box(axes, box, "cyan")
    return save_figure(figure, path)


def draw_sampling_points(
    image: np.ndarray,
    path: str | os.PathLike,
    *,
    reference: Sequence[float],
    points: np.ndarray,
    weights: np.ndarray,
    box: Sequence[float] | None,
    title: str,
) -> Path:
    """Deformable attention sampling points of one query, coloured by head, area by weight.

    Args:
        reference: (x, y) pixels of the query's reference point (drawn as a star).
        points: `[heads, N, 2]` (x, y) pixels; weights: `[heads, N]` attention weights.
    """
    figure, axes = _image_figure(image, title)
    heads = points.shape[0]
    cmap = colormaps["tab10" if heads <= 10 else "tab20"]
    largest = float(weights.max()) or 1.0
    for head in range(heads):
        sizes = 15 + 150 * weights[head] / largest
        axes.scatter(points[head, :, 0], points[head, :, 1], s=sizes, color=cmap(head % cmap.N),
                     edgecolors="black", linewidths=0.5, label=f"head {head}", zorder=3)
    axes.scatter([reference[0]], [reference[1]], marker="*", s=220, color="white", edgecolors="black",
                 linewidths=1.0, zorder=4, label="reference point")
    if box is not None:
        _box(axes, box, "cyan")
    axes.legend(loc="upper right", fontsize=6, framealpha=0.7, markerscale=0.6)
    return save_figure(figure, path)


def draw_clusters(image: np.ndarray, clusters: np.ndarray, path: str | os.PathLike, *, title: str) -> Path:
    """Query clusters (`[H, W]` int cluster ids, same size as `image`) as coloured regions over the image."""
    figure, axes = _image_figure(image, title)
    ids, dense = np.unique(clusters, return_inverse=True)
    cmap = colormaps["tab20"]
    colors = np.array([cmap(i % cmap.N) for i in range(len(ids))])
    overlay = colors[dense.reshape(clusters.shape)]
    overlay[..., 3] = 0.55
    axes.imshow(overlay, interpolation="nearest")
    return save_figure(figure, path)
