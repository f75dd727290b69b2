"""The evaluation report folder: per-class AP, a confusion matrix and precision-recall curves.

    report = write_report("runs/x/eval_report", evaluator, iou_threshold=0.5, score_threshold=0.3)
    print(report.table)

Written to the folder (atomically, each file):
    per_class.csv            class index, category id, name, ground-truth boxes, AP, AP50, AR100
    confusion_matrix.csv     ground truth (rows) x prediction (columns), background last
    confusion_matrix.png     the same counts as a picture
    pr_curves/<k>-<name>.png precision against recall per class, at IoU 0.50, 0.75 and averaged

Per-class numbers come from COCOeval's own arrays (`CocoEvaluator.coco_eval` after `compute()`), area
"all", 100 detections per image: `precision` `[T=10 IoUs, R=101 recall points, K, A, M]` and `recall`
`[T, K, A, M]`, where -1 marks "no ground truth". AP is the mean of precision over IoUs and recall
points, AP50 the same at IoU 0.50, AR100 the mean of recall over IoUs: the numbers whose class mean is
COCOeval's AP / AP50 / AR100. A class without ground truth gets -1 (as COCOeval writes it).
"""

from __future__ import annotations

import csv
import io
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure

from detr_lab.engine.confusion import ConfusionMatrix
from detr_lab.engine.evaluator import CocoEvaluator
from detr_lab.errors import InputError
from detr_lab.files import atomic_write, atomic_write_text

__all__ = [
    "ClassMetrics", "EvaluationReport", "confusion_from_evaluator", "format_table", "per_class_metrics",
    "write_report",
]

PER_CLASS_FIELDS = ("index", "category_id", "name", "gt_boxes", "AP", "AP50", "AR100")


@dataclass
class ClassMetrics:
    index: int  # class index of the model
    category_id: int  # the dataset's category id
    name: str
    gt_boxes: int  # non-crowd ground-truth boxes of the evaluated images
    AP: float  # AP@[.50:.95], -1 without ground truth
    AP50: float
    AR100: float


@dataclass
class EvaluationReport:
    folder: Path
    per_class: list[ClassMetrics]
    confusion: np.ndarray  # int64 [K + 1, K + 1], rows ground truth, columns prediction, background last
    table: str  # the per-class table as printed
    files: list[Path]


def _mean_valid(values: np.ndarray) -> float:
    valid = values[values > -1]
    return float(valid.mean()) if valid.size else -1.0


def _class_names(evaluator: CocoEvaluator) -> list[str]:
    cats = evaluator.coco_gt.cats
    return [str(cats.get(c, {}).get("name", c)) for c in evaluator.category_ids]


def per_class_metrics(evaluator: CocoEvaluator) -> list[ClassMetrics]:
    """AP, AP50 and AR100 of every class of `evaluator` (after `compute()`), read from COCOeval's
    precision and recall arrays (area "all", 100 detections), in class-index order.

    Raises:
        ValueError: `compute()` has not run.
    """
    coco_eval = evaluator.coco_eval
    if coco_eval is None:
        raise ValueError("per_class_metrics() needs CocoEvaluator.compute() first")
    precision = np.asarray(coco_eval.eval["precision"])  # [T, R, K, A, M]
    recall = np.asarray(coco_eval.eval["recall"])  # [T, K, A, M]
    iou_thresholds = np.asarray(coco_eval.params.iouThrs)
    at50 = int(np.argmin(np.abs(iou_thresholds - 0.5)))
    column = {int(c): k for k, c in enumerate(coco_eval.params.catIds)}
    images = set(evaluator.results)
    gt_counts: dict[int, int] = {}
    for ann in evaluator.coco_gt.dataset.get("annotations", []):
        if ann.get("image_id") in images and not ann.get("iscrowd", 0):
            gt_counts[int(ann["category_id"])] = gt_counts.get(int(ann["category_id"]), 0) + 1
    rows = []
    for index, (category_id, name) in enumerate(zip(evaluator.category_ids, _class_names(evaluator),
                                                    strict=True)):
        k = column.get(category_id)
        if k is None:  # a class the ground truth does not declare
            ap = ap50 = ar = -1.0
        else:
            ap = _mean_valid(precision[:, :, k, 0, -1])
            ap50 = _mean_valid(precision[at50, :, k, 0, -1])
            ar = _mean_valid(recall[:, k, 0, -1])
        rows.append(ClassMetrics(index, category_id, name, gt_counts.get(category_id, 0), ap, ap50, ar))
    return rows


def format_table(rows: list[ClassMetrics]) -> str:
    """The per-class table as text: one line per class, `-` where a class has no ground truth."""
    width = max([len("class"), *(len(row.name) for row in rows)])
    lines = [f"{'class':<{width}}  {'gt':>6}  {'AP':>6}  {'AP50':>6}  {'AR100':>6}"]
    for row in rows:
        numbers = "  ".join(f"{v:>6.3f}" if v > -1 else f"{'-':>6}" for v in (row.AP, row.AP50, row.AR100))
        lines.append(f"{row.name:<{width}}  {row.gt_boxes:>6}  {numbers}")
    return "\n".join(lines) + "\n"


def _xywh_to_xyxy(boxes: list) -> torch.Tensor:
    xywh = torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)
    return torch.cat([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], dim=1)


def confusion_from_evaluator(
    evaluator: CocoEvaluator, *, iou_threshold: float = 0.5, score_threshold: float = 0.3
) -> ConfusionMatrix:
    """The confusion matrix (see `detr_lab.engine.confusion`) of the detections `evaluator` holds
    against its ground truth, over the images it has seen.

    Raises:
        InputError: a ground-truth category id that is not one of the evaluator's category ids, or a
            threshold out of range.
    """
    index_of = {c: i for i, c in enumerate(evaluator.category_ids)}
    matrix = ConfusionMatrix(len(index_of), iou_threshold=iou_threshold, score_threshold=score_threshold)
    for image_id in sorted(evaluator.results):
        anns = [a for a in evaluator.coco_gt.imgToAnns.get(image_id, []) if not a.get("iscrowd", 0)]
        unknown = sorted({int(a["category_id"]) for a in anns} - set(index_of))
        if unknown:
            raise InputError(f"image {image_id}: ground-truth category id(s) {unknown} are not among the "
                             f"model's category ids {list(index_of)}")
        detections = evaluator.results[image_id]
        matrix.add_image(
            _xywh_to_xyxy([a["bbox"] for a in anns]),
            torch.tensor([index_of[int(a["category_id"])] for a in anns], dtype=torch.int64),
            _xywh_to_xyxy([d["bbox"] for d in detections]),
            torch.tensor([index_of[int(d["category_id"])] for d in detections], dtype=torch.int64),
            torch.tensor([float(d["score"]) for d in detections], dtype=torch.float32),
        )
    return matrix


def _csv_text(header: list, rows: list[list]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buffer.getvalue()


def _save_figure(figure: Figure, path: Path) -> Path:
    with atomic_write(path) as handle:
        figure.savefig(handle, format="png", dpi=100)
    return path


def _confusion_figure(counts: np.ndarray, labels: list[str], iou: float, score: float) -> Figure:
    size = max(4.0, 0.45 * len(labels) + 2.0)
    figure = Figure(figsize=(size + 1.0, size))
    axes = figure.add_subplot()
    image = axes.imshow(counts, cmap="Blues")
    figure.colorbar(image, ax=axes, fraction=0.046, pad=0.04, label="boxes")
    axes.set_xticks(range(len(labels)), labels, rotation=90)
    axes.set_yticks(range(len(labels)), labels)
    axes.set_xlabel("prediction")
    axes.set_ylabel("ground truth")
    axes.set_title(f"confusion matrix (IoU >= {iou:g}, score >= {score:g})")
    if len(labels) <= 30:
        threshold = counts.max() / 2 if counts.size else 0
        for (row, col), value in np.ndenumerate(counts):
            axes.text(col, row, str(value), ha="center", va="center", fontsize=7,
                      color="white" if value > threshold else "black")
    figure.tight_layout()
    return figure


def _pr_figure(coco_eval, k: int, row: ClassMetrics) -> Figure:
    precision = np.asarray(coco_eval.eval["precision"])[:, :, k, 0, -1]  # [T, R]
    recall_points = np.asarray(coco_eval.params.recThrs)
    iou_thresholds = np.asarray(coco_eval.params.iouThrs)
    figure = Figure(figsize=(5, 4))
    axes = figure.add_subplot()
    for iou in (0.5, 0.75):
        t = int(np.argmin(np.abs(iou_thresholds - iou)))
        curve = precision[t]
        axes.plot(recall_points[curve > -1], curve[curve > -1], label=f"IoU {iou:.2f}")
    averaged = np.where(precision > -1, precision, 0.0).mean(axis=0)  # drawn for classes with ground truth
    axes.plot(recall_points, averaged, linestyle="--", label=f"IoU .50:.95 (AP {row.AP:.3f})")
    axes.set_xlim(0, 1)
    axes.set_ylim(0, 1.02)
    axes.set_xlabel("recall")
    axes.set_ylabel("precision")
    axes.set_title(f"{row.name}: {row.gt_boxes} boxes, AP50 {row.AP50:.3f}")
    axes.legend(loc="upper right")
    figure.tight_layout()
    return figure


def _file_stem(row: ClassMetrics) -> str:
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", row.name).strip("_") or "class"
    return f"{row.index:03d}-{safe}"


def write_report(
    folder: str | Path,
    evaluator: CocoEvaluator,
    *,
    iou_threshold: float = 0.5,
    score_threshold: float = 0.3,
) -> EvaluationReport:
    """Write the report folder (see the module doc) for `evaluator` after `compute()`; return what
    was written.

    Args:
        iou_threshold, score_threshold: of the confusion matrix (see `detr_lab.engine.confusion`).
    Raises:
        ValueError: `compute()` has not run; InputError: see `confusion_from_evaluator`;
        FileWriteError: a file cannot be written.
    """
    folder = Path(folder)
    rows = per_class_metrics(evaluator)
    matrix = confusion_from_evaluator(evaluator, iou_threshold=iou_threshold,
                                      score_threshold=score_threshold)
    files = [atomic_write_text(folder / "per_class.csv", _csv_text(
        list(PER_CLASS_FIELDS),
        [[r.index, r.category_id, r.name, r.gt_boxes, *(f"{v:.6f}" for v in (r.AP, r.AP50, r.AR100))]
         for r in rows],
    ))]
    labels = [row.name for row in rows] + ["background"]
    files.append(atomic_write_text(folder / "confusion_matrix.csv", _csv_text(
        ["ground_truth \\ prediction", *labels],
        [[label, *counts.tolist()] for label, counts in zip(labels, matrix.counts, strict=True)],
    )))
    files.append(_save_figure(_confusion_figure(matrix.counts, labels, iou_threshold, score_threshold),
                              folder / "confusion_matrix.png"))
    column = {int(c): k for k, c in enumerate(evaluator.coco_eval.params.catIds)}
    for row in rows:
        if row.gt_boxes and row.category_id in column:
            figure = _pr_figure(evaluator.coco_eval, column[row.category_id], row)
            files.append(_save_figure(figure, folder / "pr_curves" / f"{_file_stem(row)}.png"))
    return EvaluationReport(folder, rows, matrix.counts, format_table(rows), files)
