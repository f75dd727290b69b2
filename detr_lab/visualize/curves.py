"""Loss and AP curves of a run, from the `metrics.csv` Lightning's CSVLogger writes.

A run directory (`trainer.output_dir`) holds `csv/version_N/metrics.csv`, one per segment of the run
(a resumed run logs into a new version); every segment is read and joined in version order, each later
segment replacing the earlier rows from its first step on (the steps retrained after the resume).
Rows are sparse: each holds the metrics logged at one (epoch, step). Plotted:
- left: `train/loss_step` (or `train/loss`) against the step, with `train/loss_epoch` and `val/loss`
  at the last step of each epoch;
- right: `val/AP`, `val/AP50`, `val/AP75` against the epoch.
"""

from __future__ import annotations

import csv
import math
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from detr_lab.visualize.draw import save_figure

AP_COLUMNS = ("val/AP", "val/AP50", "val/AP75")


AP_STYLES = {"AP": "o-", "AP50": "s--", "AP75": "^:"}  # line style of each metric


def plot_ap(
    axes: Any,
    runs: Mapping[str, Sequence[Mapping[str, float]]],
    *,
    x: str,
    x_label: str,
    metrics: Sequence[str] = ("AP", "AP50"),
    annotate: bool = False,
) -> None:
    """Draw COCO AP curves into a matplotlib `axes`: the one AP plot of the run summary, the run
    curves (`detr_lab.visualize.curves`) and `tools/bench_demo_ap.py`.

    Args:
        axes: a matplotlib Axes.
        runs: run label ("" for a single unnamed run) -> rows, each a dict holding the `x` value and
            some of `metrics` (a row without a metric is no point of that metric's line).
        x: the key of the horizontal value in each row (e.g. "step", "epoch", "minutes").
        x_label: the horizontal axis' label.
        metrics: the keys drawn, each with its style from `AP_STYLES`: one colour per metric for a
            single run, one colour per run otherwise.
        annotate: write the first metric's value above each of its points (several runs' labels side
            by side).
    Raises:
        KeyError: a row without `x`.
    """
    for index, (run, rows) in enumerate(runs.items()):
        for number, metric in enumerate(metrics):
            points = [(row[x], row[metric]) for row in rows if metric in row]
            if not points:
                continue
            colour = f"C{index if len(runs) > 1 else number}"
            label = f"{run} {metric}" if run else metric
            alpha = 1.0 if number == 0 or len(runs) == 1 else 0.5
            axes.plot([p[0] for p in points], [p[1] for p in points], AP_STYLES.get(metric, "-"),
                      color=colour, alpha=alpha, label=label, markersize=4)
            if annotate and number == 0:
                shift = (index - (len(runs) - 1) / 2) * 18  # labels of runs that meet side by side
                for point in points:
                    axes.annotate(f"{point[1]:.3f}", point, textcoords="offset points", xytext=(shift, 6),
                                  ha="center", fontsize=7, color=colour)
    axes.set_xlabel(x_label)
    axes.set_ylabel("COCO AP (validation)")
    axes.set_ylim(0, 1)
    axes.grid(alpha=0.3)
    if axes.lines:
        axes.legend(fontsize=8)


def find_metrics_csvs(run: str | os.PathLike) -> list[Path]:
    """`[run]` if it is a CSV file, else every `csv/version_N/metrics.csv` under the run folder, by N.

    Raises:
        FileNotFoundError: naming the folder searched.
    """
    run = Path(run)
    if run.is_file():
        return [run]
    versions = sorted(run.glob("csv/version_*/metrics.csv"),
                      key=lambda p: int(re.sub(r"\D", "", p.parent.name) or -1))
    if not versions:
        raise FileNotFoundError(f"no csv/version_*/metrics.csv under {run} (a run's trainer.output_dir)")
    return versions


def find_metrics_csv(run: str | os.PathLike) -> Path:
    """`run` itself if it is a CSV file, else the newest `csv/version_N/metrics.csv` (the latest
    segment) under the run folder. Raises FileNotFoundError naming the folder searched."""
    return find_metrics_csvs(run)[-1]


def read_run_metrics(paths: Sequence[str | os.PathLike]) -> dict[str, list[tuple[int, int, float]]]:
    """The segments of a run (`find_metrics_csvs`) joined: column -> [(epoch, step, value)] by step.

    A later segment starts where its run resumed: the earlier segments' rows from its first step on
    (work lost to the interruption and trained again) are replaced by its own.
    """
    joined: dict[str, list[tuple[int, int, float]]] = {}
    for path in paths:
        series = read_metrics(path)
        steps = [step for points in series.values() for _, step, _ in points]
        if steps:
            start = min(steps)
            joined = {column: [p for p in points if p[1] < start] for column, points in joined.items()}
        for column, points in series.items():
            joined.setdefault(column, []).extend(points)
    return {column: points for column, points in joined.items() if points}


def read_metrics(path: str | os.PathLike) -> dict[str, list[tuple[int, int, float]]]:
    """metrics.csv -> column -> [(epoch, step, value)] for the rows where the column has a value.

    Raises:
        ValueError: the file has no `step` column (not a Lightning metrics file), or a value that is
            not a number; the message names the file, line and column.
    """
    path = Path(path)
    series: dict[str, list[tuple[int, int, float]]] = {}
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None or "step" not in reader.fieldnames:
            raise ValueError(f"{path}: not a Lightning metrics.csv (no 'step' column)")
        for line, row in enumerate(reader, start=2):
            epoch = int(float(row.get("epoch") or -1))
            step = int(float(row["step"]))
            for column, text in row.items():
                if column in ("epoch", "step") or text in (None, ""):
                    continue
                try:
                    value = float(text)
                except ValueError:
                    where = f"{path}, line {line}: column '{column}'"
                    raise ValueError(f"{where} value {text!r} is not a number") from None
                if math.isfinite(value):
                    series.setdefault(column, []).append((epoch, step, value))
    return series


def plot_run_curves(run: str | os.PathLike, path: str | os.PathLike) -> Path:
    """Draw a run's loss and AP curves into a PNG at `path`; `run` is a run folder (every segment of a
    resumed run, see `read_run_metrics`) or a metrics.csv.

    Raises:
        FileNotFoundError: no metrics file; ValueError: it has neither a loss nor an AP column.
    """
    csv_paths = find_metrics_csvs(run)
    csv_path = csv_paths[-1]
    series = read_run_metrics(csv_paths)
    step_loss = series.get("train/loss_step") or series.get("train/loss")
    if not step_loss and not any(column in series for column in AP_COLUMNS):
        raise ValueError(f"{csv_path}: no 'train/loss' or 'val/AP' values to plot")
    figure = Figure(figsize=(11, 4), dpi=100)
    loss_axes, ap_axes = figure.subplots(1, 2)
    for column, style in (("train/loss_step", "-"), ("train/loss", "-"), ("train/loss_epoch", "o-"),
                          ("val/loss", "s-")):
        if column == "train/loss" and "train/loss_step" in series:
            continue
        points = series.get(column)
        if points:
            loss_axes.plot([p[1] for p in points], [p[2] for p in points], style, label=column,
                           linewidth=1.0, markersize=4)
    loss_axes.set_xlabel("step")
    loss_axes.set_ylabel("loss")
    loss_axes.set_title("loss")
    loss_axes.grid(alpha=0.3)
    if loss_axes.lines:
        loss_axes.legend(fontsize=8)
    by_epoch: dict[int, dict[str, float]] = {}  # epoch -> {"epoch", "AP", "AP50", "AP75"}
    for column in AP_COLUMNS:
        for epoch, _, value in series.get(column, []):
            by_epoch.setdefault(epoch, {"epoch": epoch})[column.removeprefix("val/")] = value
    rows = [by_epoch[epoch] for epoch in sorted(by_epoch)]
    plot_ap(ap_axes, {"": rows}, x="epoch", x_label="epoch", metrics=("AP", "AP50", "AP75"))
    ap_axes.set_xlim(-0.5, max(by_epoch, default=0) + 0.5)
    ap_axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    ap_axes.set_title("validation AP")
    if not ap_axes.lines:
        ap_axes.text(0.5, 0.5, "no val/AP logged yet", ha="center", va="center", transform=ap_axes.transAxes)
    segments = f" and {len(csv_paths) - 1} earlier segment(s)" if len(csv_paths) > 1 else ""
    figure.suptitle(f"{csv_path}{segments}", fontsize=8)
    figure.tight_layout()
    return save_figure(figure, path)
