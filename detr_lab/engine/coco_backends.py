"""The COCO box-evaluation backends: pycocotools (default) and the optional faster-coco-eval.

    coco_eval = run_cocoeval(gt_dataset, detections, image_ids, backend="faster-coco-eval")
    coco_eval.stats                  # the 12 standard numbers, COCOeval's order
    coco_eval.eval["precision"]      # [T, R, K, A, M], see detr_lab.engine.eval_report

Both return an object with pycocotools' `COCOeval` attributes after `evaluate()` / `accumulate()`:
`params` (`iouThrs` [T], `recThrs` [R], `catIds` [K], `areaRngLbl` [A], `maxDets` [M]), `eval`
(`precision` [T, R, K, A, M] and `recall` [T, K, A, M], -1 where a class has no ground truth) and,
after `summarize()`, `stats` [12]. faster-coco-eval (the `eval` extra, a C++ reimplementation) is
much faster on large sets and gives the same AP (tests/engine/test_eval_report.py).
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
from collections.abc import Sequence

from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from detr_lab.errors import InputError, MissingExtraError

try:
    from faster_coco_eval import COCO as FasterCOCO
    from faster_coco_eval import COCOeval_faster
except ImportError:  # the optional `eval` extra
    FasterCOCO = None
    COCOeval_faster = None

__all__ = ["BACKENDS", "check_backend", "run_cocoeval"]

BACKENDS = ("pycocotools", "faster-coco-eval")
EVAL_EXTRA_HINT = 'pip install -e ".[eval]"'


def check_backend(backend: str) -> None:
    """Raise `InputError` for an unknown backend name and `MissingExtraError` when faster-coco-eval is
    asked for but not installed (the message names the extra)."""
    if backend not in BACKENDS:
        raise InputError(f"COCO evaluation backend {backend!r} is not one of {', '.join(BACKENDS)}")
    if backend == "faster-coco-eval" and COCOeval_faster is None:
        raise MissingExtraError(
            f"'faster-coco-eval' is not installed; the faster-coco-eval backend needs the eval extra: "
            f"{EVAL_EXTRA_HINT}"
        )


def _empty_results(gt_dataset: dict) -> dict:
    return {
        "images": list(gt_dataset["images"]),
        "categories": copy.deepcopy(gt_dataset.get("categories", [])),
        "annotations": [],
    }


def run_cocoeval(
    gt_dataset: dict,
    detections: list[dict],
    image_ids: Sequence[int],
    *,
    backend: str = "pycocotools",
    gt_index: COCO | None = None,
):
    """Evaluate `detections` (COCO results dicts: image_id, category_id, bbox [x, y, w, h] pixels,
    score) against `gt_dataset` (a COCO instances dict whose annotation ids are 1..N, see
    `evaluator.renumber_annotations`) on `image_ids`; return the evaluator after `evaluate()`,
    `accumulate()` and `summarize()` (its printed table in `summary_text`).

    Args:
        gt_index: pycocotools' index of `gt_dataset`, reused by the pycocotools backend when given.
    Raises:
        InputError / MissingExtraError: see `check_backend`.
    """
    check_backend(backend)
    quiet = io.StringIO()
    with contextlib.redirect_stdout(quiet):
        if backend == "pycocotools":
            coco_gt = gt_index if gt_index is not None else _pycocotools_index(gt_dataset)
            if detections:
                coco_dt = coco_gt.loadRes(_copies(detections))
            else:
                coco_dt = _pycocotools_index(_empty_results(gt_dataset))
            coco_eval = COCOeval(coco_gt, coco_dt, iouType="bbox")
        else:
            coco_gt = FasterCOCO(copy.deepcopy(gt_dataset))
            coco_dt = coco_gt.loadRes(_copies(detections)) if detections else FasterCOCO(
                _empty_results(gt_dataset))
            coco_eval = COCOeval_faster(coco_gt, coco_dt, iouType="bbox", print_function=print)
        coco_eval.params.imgIds = sorted(int(i) for i in image_ids)
        coco_eval.evaluate()
        coco_eval.accumulate()
    summary = io.StringIO()
    with contextlib.redirect_stdout(summary):
        coco_eval.summarize()
    coco_eval.summary_text = summary.getvalue()
    return coco_eval


def _copies(detections: list[dict]) -> list[dict]:
    """Copies of the result dicts for `loadRes`, which adds keys (id, area, segmentation) to each; a
    per-dict copy is enough and much faster than `copy.deepcopy` on large sets."""
    return [{**detection, "bbox": list(detection["bbox"])} for detection in detections]


def _pycocotools_index(dataset: dict) -> COCO:
    coco = COCO()
    coco.dataset = dataset
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


# faster-coco-eval logs its own progress at INFO through the logging module; keep it quiet.
logging.getLogger("faster_coco_eval").setLevel(logging.WARNING)
