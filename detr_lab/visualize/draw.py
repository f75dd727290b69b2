"""Drawings on images, from plain arrays in image pixels.

- detections (PIL, fast enough for every inference output): `draw_detections` draws labelled boxes,
  `draw_ground_truth_and_predictions` puts two of its panels side by side, `save_picture` writes one;
- attention maps, deformable sampling points, query clusters (matplotlib): built with
  `matplotlib.figure.Figure` (no pyplot state, no display needed), written by `save_figure`.

Every file is written atomically (a temporary file, then a rename).
"""

from __future__ import annotations

import colorsys
import os
import textwrap
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib import colormaps
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from PIL import Image, ImageDraw, ImageFont

from detr_lab.files import atomic_write

DPI = 100
TITLE_HEIGHT = 14  # px of the title strip above a `draw_detections` picture
# Upscaling for legibility never takes a picture's longer side above this many pixels, and the run
# summary's side-by-side panels are shrunk to half of it: a 20000 x 20 image gives a picture of a few MB
# that any viewer opens, not one of 640008 x 334 px.
MAX_PICTURE_SIDE = 4096


def save_figure(figure: Figure, path: str | os.PathLike) -> Path:
    """Write `figure` as a PNG at `path` (parent folders created, atomic) and return the path.

    Raises:
        FileWriteError: the file cannot be written (the message names it).
    """
    with atomic_write(path, "wb") as file:
        figure.savefig(file, dpi=DPI, format="png")
    return Path(path)


SIDE_PX = 130  # px of the strip right of the image holding a legend or a colour bar


def _image_figure(
    image: np.ndarray, title: str, *, min_inches: float = 5.0, side_px: int = 0
) -> tuple[Figure, object]:
    """A figure sized to the image (longer side at least `min_inches`), the image shown, axes off, and
    the title wrapped above it; `side_px` pixels are left free right of the image (legend, colour bar)."""
    height, width = image.shape[:2]
    scale = max(min_inches / max(width, height) * DPI, 1.0)
    # the whole picture (image, side strip, title) stays within MAX_PICTURE_SIDE on both sides
    scale = min(scale, (MAX_PICTURE_SIDE - side_px) / width, MAX_PICTURE_SIDE / height)
    width_px = max(width * scale, 1.0)
    lines = textwrap.wrap(title, width=max(30, int((width_px + side_px) / 7.2))) or [""]
    header_px = 14 * len(lines) + 8
    scale = min(scale, (MAX_PICTURE_SIDE - header_px) / height)
    width_px, height_px = max(width * scale, 1.0), max(height * scale, 1.0)
    figure = Figure(figsize=((width_px + side_px) / DPI, (height_px + header_px) / DPI), dpi=DPI)
    axes = figure.add_axes((0, 0, width_px / (width_px + side_px), height_px / (height_px + header_px)))
    axes.imshow(image)
    axes.set_axis_off()
    axes.set_xlim(-0.5, width - 0.5)
    axes.set_ylim(height - 0.5, -0.5)
    figure.text(0.5, 1 - 4 / (height_px + header_px), "\n".join(lines), fontsize=9, ha="center", va="top")
    return figure, axes


def _box(axes, box: Sequence[float], color, *, width: float = 2.0) -> None:
    """Outline absolute (x1, y1, x2, y2) pixels `box` on a matplotlib image axes."""
    x1, y1, x2, y2 = (float(v) for v in box)
    axes.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, edgecolor=color, linewidth=width))


def class_color(index: int) -> tuple[int, int, int]:
    """A distinct, saturated RGB colour per class index (golden-ratio hue steps, any number of classes)."""
    red, green, blue = colorsys.hsv_to_rgb((index * 0.618034) % 1.0, 0.85, 1.0)
    return int(red * 255), int(green * 255), int(blue * 255)


def draw_detections(
    image: np.ndarray,
    boxes: np.ndarray | Sequence[Sequence[float]],
    labels: Sequence[int],
    class_names: Sequence[str],
    *,
    scores: Sequence[float] | None = None,
    title: str | None = None,
    min_side: int = 0,
    max_side: int | None = None,
) -> Image.Image:
    """Boxes with their class (and score) labels drawn on an RGB copy of `image`: the one drawing of
    detections, for annotated inference outputs, the run summary and the validation pictures.

    Args:
        image: uint8 `[H, W, 3]` RGB.
        boxes: `[K, 4]` absolute (x1, y1, x2, y2) pixels of `image`.
        labels: `[K]` class indices into `class_names`; a box is outlined in `class_color(label)`.
        scores: `[K]`, shown after the class name ("name 0.87"); None: the name alone (ground truth).
        title: a line written in a white strip (`TITLE_HEIGHT` px) above the image; None: no strip.
        min_side: the picture is upscaled so that its shorter side is at least this, but never so far
            that its longer side exceeds `MAX_PICTURE_SIDE` px.
        max_side: the picture is shrunk, where needed, so that its longer side is at most this many
            px; None: `image`'s own size is kept (an annotated copy is as large as its input).
    Returns:
        A PIL RGB image of `image`'s size times the scale (each side at least 1 px), plus the title
        strip.
    Raises:
        IndexError: a label outside `class_names`.
    """
    height, width = image.shape[:2]
    scale = max(1.0, min_side / min(height, width)) if min_side else 1.0
    scale = min(scale, max(1.0, MAX_PICTURE_SIDE / max(height, width)))  # upscaling stays bounded
    if max_side is not None:
        scale = min(scale, max_side / max(height, width))
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    top = TITLE_HEIGHT if title is not None else 0
    font = ImageFont.load_default()
    canvas = Image.new("RGB", (size[0], size[1] + top), (255, 255, 255))
    picture = Image.fromarray(image).convert("RGB")
    canvas.paste(picture if scale == 1.0 else picture.resize(size, Image.BILINEAR), (0, top))
    draw = ImageDraw.Draw(canvas)
    if title is not None:
        draw.text((2, 1), title, fill=(0, 0, 0), font=font)
    line_width = max(2, round(min(size) / 200))
    texts = [class_names[int(label)] for label in labels]
    if scores is not None:
        texts = [f"{text} {float(score):.2f}" for text, score in zip(texts, scores, strict=True)]
    for box, label, text in zip(np.asarray(boxes).reshape(-1, 4), labels, texts, strict=True):
        x1, y1, x2, y2 = (float(v) * scale for v in box)
        y1, y2 = y1 + top, y2 + top
        color = class_color(int(label))
        draw.rectangle((x1, y1, x2, y2), outline=color, width=line_width)
        left, text_top, right, bottom = draw.textbbox((x1, y1), text, font=font)
        text_width, text_height = right - left, bottom - text_top
        label_top = max(top, y1 - text_height - 2)  # above the box, inside the picture
        draw.rectangle((x1, label_top, x1 + text_width + 4, label_top + text_height + 2), fill=color)
        draw.text((x1 + 2, label_top), text, fill=(0, 0, 0), font=font)
    return canvas


def draw_ground_truth_and_predictions(
    image: np.ndarray,
    gt_boxes: np.ndarray,
    gt_labels: Sequence[int],
    pred_boxes: np.ndarray,
    pred_labels: Sequence[int],
    pred_scores: Sequence[float],
    class_names: Sequence[str],
    *,
    score_threshold: float,
    min_side: int = 320,
) -> Image.Image:
    """Two `draw_detections` panels of `image` side by side (8 px apart): ground truth left, the
    predictions scoring at least `score_threshold` right, each titled with its count. Each panel's
    longer image side is at most `MAX_PICTURE_SIDE // 2` px, so the picture is at most
    `MAX_PICTURE_SIDE + 8` px wide.

    Args:
        image: uint8 `[H, W, 3]` RGB.
        gt_boxes: `[N, 4]` and pred_boxes `[K, 4]` absolute (x1, y1, x2, y2) pixels of `image`;
            gt_labels `[N]` and pred_labels `[K]` class indices; pred_scores `[K]` in [0, 1].
        min_side: both panels are upscaled so that their shorter image side is at least this.
    """
    keep = [i for i, score in enumerate(pred_scores) if float(score) >= score_threshold]
    pred_boxes = np.asarray(pred_boxes).reshape(-1, 4)[keep]
    panel_side = MAX_PICTURE_SIDE // 2
    gt = draw_detections(image, gt_boxes, gt_labels, class_names, min_side=min_side, max_side=panel_side,
                         title=f"ground truth ({len(gt_labels)})")
    pred = draw_detections(image, pred_boxes, [pred_labels[i] for i in keep], class_names,
                           scores=[pred_scores[i] for i in keep], min_side=min_side, max_side=panel_side,
                           title=f"predictions, score >= {score_threshold:.2f} ({len(keep)})")
    both = Image.new("RGB", (gt.width * 2 + 8, gt.height), (255, 255, 255))
    both.paste(gt, (0, 0))
    both.paste(pred, (gt.width + 8, 0))
    return both


def save_picture(picture: Image.Image, path: str | os.PathLike, **options: object) -> Path:
    """Write a PIL picture at `path` (format from the suffix; parent folders created, atomic);
    `options` go to PIL's `save` (e.g. `quality=92` for a JPEG).

    Raises:
        FileWriteError: the file cannot be written (the message names it).
    """
    path = Path(path)
    with atomic_write(path, "wb") as file:
        picture.save(file, format=Image.registered_extensions().get(path.suffix.lower(), "PNG"), **options)
    return path


def heatmap_figure(
    image: np.ndarray, heat: np.ndarray, *, box: Sequence[float] | None, title: str,
    label: str = "attention weight",
) -> Figure:
    """An attention map (`[H, W]`, same size as `image`) over the image, plus the query's box, and a
    colour bar beside the image giving the weights (`label`) of its colours.

    The colours span the map's own range (min dark, max bright), so weak but uneven attention shows;
    the colour bar's ends are that minimum and maximum.
    """
    figure, axes = _image_figure(image, title, side_px=SIDE_PX)
    low, high = float(heat.min()), float(heat.max())
    if high <= low:
        high = low + 1e-12  # a flat map: one colour
    shown = axes.imshow(heat, cmap="inferno", alpha=0.6, vmin=low, vmax=high, interpolation="nearest")
    if box is not None:
        _box(axes, box, "cyan")
    left, bottom, width, height = axes.get_position().bounds
    side = 1 - (left + width)
    bar_axes = figure.add_axes((left + width + side * 0.12, bottom + height * 0.05, side * 0.14,
                                height * 0.9))
    bar = figure.colorbar(shown, cax=bar_axes)
    bar.set_label(label, fontsize=8)
    bar.ax.tick_params(labelsize=7)
    return figure


def draw_heatmap(
    image: np.ndarray, heat: np.ndarray, path: str | os.PathLike, *, box: Sequence[float] | None, title: str
) -> Path:
    """`heatmap_figure` written as a PNG at `path`."""
    return save_figure(heatmap_figure(image, heat, box=box, title=title), path)


def sampling_points_figure(
    image: np.ndarray,
    *,
    reference: Sequence[float],
    points: np.ndarray,
    weights: np.ndarray,
    box: Sequence[float] | None,
    title: str,
) -> Figure:
    """Deformable attention sampling points of one query, coloured by head, area by weight; the
    legend stands beside the image, so it covers none of the points.

    Args:
        reference: (x, y) pixels of the query's reference point (drawn as a star).
        points: `[heads, N, 2]` (x, y) pixels; weights: `[heads, N]` attention weights.
    """
    figure, axes = _image_figure(image, title, side_px=SIDE_PX)
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
    left, bottom, width, height = axes.get_position().bounds
    figure.legend(*axes.get_legend_handles_labels(), loc="upper left",
                  bbox_to_anchor=(left + width, bottom + height), fontsize=7, framealpha=0.9, markerscale=0.6,
                  borderaxespad=0.3)
    return figure


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
    """`sampling_points_figure` written as a PNG at `path`."""
    figure = sampling_points_figure(image, reference=reference, points=points, weights=weights, box=box,
                                    title=title)
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
