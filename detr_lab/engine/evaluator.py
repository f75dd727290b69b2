"""COCO box evaluation (pycocotools COCOeval) of per-image detections, usable with or without Lightning.

    evaluator = CocoEvaluator(dataset.coco, category_ids)
    evaluator.update({image_id: {"scores": ..., "labels": ..., "boxes": ...}, ...})   # per batch
    evaluator.gather()              # multi-process: collect every rank's detections (no-op otherwise)
    stats = evaluator.compute()     # {"AP": ..., "AP50": ..., ..., "AR100": ...}
    evaluator.write_results("results.json")

Annotation ids do not matter: the evaluator scores against its own index of the ground truth with the
annotations renumbered 1..N, because pycocotools' match table uses 0 for "unmatched" and a ground-truth
annotation with id 0 (or a negative id) would silently count as a miss (cocoapi issue #664).

Detections are kept per image id, so an image predicted twice (a distributed sampler pads its last
batch with repeated samples) is counted once. Class indices are written as the dataset's original
category ids, boxes as COCO `[x, y, width, height]` in pixels of the original image.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
import torch.distributed as dist
from pycocotools.coco import COCO

from detr_lab.engine.coco_backends import check_backend, run_cocoeval
from detr_lab.io import atomic_write_text

# The order of COCOeval.stats.
STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")


def xyxy_to_coco_xywh(boxes: torch.Tensor) -> torch.Tensor:
    """`[K, 4]` absolute (x1, y1, x2, y2) -> `[K, 4]` absolute (x, y, width, height), COCO's box format."""
    x1, y1, x2, y2 = boxes.unbind(-1)
    return torch.stack([x1, y1, x2 - x1, y2 - y1], dim=-1)


def renumber_annotations(coco_gt: COCO) -> COCO:
    """A new `COCO` index over the same images and categories whose annotations have ids 1..N.

    COCOeval records a matched ground-truth id in a table where 0 means "unmatched", so an annotation
    with id 0 is never counted as found (and a detection matched to it is a false positive). Ids are
    only used for matching, so renumbering (in the order of the file) changes nothing else.
    The input is not modified; each annotation dict is copied shallowly.
    """
    dataset = dict(coco_gt.dataset)
    annotations = dataset.get("annotations", [])
    dataset["annotations"] = [{**ann, "id": index} for index, ann in enumerate(annotations, start=1)]
    renumbered = COCO()
    renumbered.dataset = dataset
    with contextlib.redirect_stdout(io.StringIO()):
        renumbered.createIndex()
    return renumbered


class CocoEvaluator:
    """Collects detections image by image and scores them with pycocotools' COCOeval (iouType "bbox").

    Args:
        coco_gt: ground truth as a pycocotools `COCO` object (the validation dataset's `coco`); it is not
            modified, and its annotation ids may be any integers (see `renumber_annotations`).
        category_ids: class index -> original category id of the dataset (length `num_classes`).
        backend: "pycocotools" or "faster-coco-eval" (the optional `eval` extra; see `coco_backends`).
    Raises:
        InputError / MissingExtraError: an unknown backend, or faster-coco-eval not installed.
    """

    def __init__(self, coco_gt: COCO, category_ids: Sequence[int], *, backend: str = "pycocotools"):
        check_backend(backend)
        self.backend = backend
        self.coco_gt = coco_gt
        self._scoring_gt: COCO | None = None  # coco_gt with annotation ids 1..N, built on first compute()
        self.category_ids = [int(c) for c in category_ids]
        # image id -> list of COCO result dicts; an image with no detection maps to [].
        self.results: dict[int, list[dict]] = {}
        self.stats: dict[str, float] | None = None
        self.coco_eval = None  # the last compute()'s evaluator: precision / recall arrays for reports
        self._summary = ""

    def reset(self) -> None:
        self.results = {}
        self.stats = None
        self.coco_eval = None
        self._summary = ""

    def update(self, predictions: Mapping[int, Mapping[str, torch.Tensor]]) -> None:
        """Add the detections of some images.

        Args:
            predictions: image id -> dict with `scores` float `[K]`, `labels` int64 `[K]` (class indices
                in `[0, num_classes)`) and `boxes` float `[K, 4]` absolute (x1, y1, x2, y2) pixels of the
                original image, as returned by the post-processor. A later update of the same image id
                replaces the earlier one.
        Raises:
            ValueError: an image id the ground truth does not have, or a class index out of range.
        """
        for image_id, prediction in predictions.items():
            image_id = int(image_id)
            if image_id not in self.coco_gt.imgs:
                raise ValueError(f"prediction for image_id {image_id}, which the ground truth lacks")
            labels = prediction["labels"].detach().cpu().long()
            if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= len(self.category_ids)):
                raise ValueError(
                    f"image_id {image_id}: 'labels' range from {int(labels.min())} to {int(labels.max())}, "
                    f"outside [0, {len(self.category_ids)}) (the number of category ids)"
                )
            boxes = xyxy_to_coco_xywh(prediction["boxes"].detach().cpu().float()).tolist()
            scores = prediction["scores"].detach().cpu().float().tolist()
            self.results[image_id] = [
                {"image_id": image_id, "category_id": self.category_ids[label], "bbox": box, "score": score}
                for label, box, score in zip(labels.tolist(), boxes, scores, strict=True)
            ]

    def gather(self) -> None:
        """Merge the detections of all processes when torch.distributed is initialized (no-op otherwise).

        Every rank ends with the union, keyed by image id, so padded duplicates count once.
        """
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return
        parts: list[dict[int, list[dict]] | None] = [None] * dist.get_world_size()
        dist.all_gather_object(parts, self.results)
        merged: dict[int, list[dict]] = {}
        for part in parts:
            merged.update(part or {})
        self.results = merged

    def detections(self) -> list[dict]:
        """All detections as a COCO results list, sorted by image id."""
        return [det for image_id in sorted(self.results) for det in self.results[image_id]]

    def write_results(self, path: str | os.PathLike) -> Path:
        """Write the COCO results json (the format `COCO.loadRes` reads) atomically; return its path.

        Raises:
            FileWriteError: the file cannot be written (the message names the path and the reason).
        """
        return atomic_write_text(path, json.dumps(self.detections()))

    def compute(self) -> dict[str, float]:
        """Run COCOeval on the images seen so far; return the 12 standard numbers by name (see STAT_NAMES).

        Only images passed to `update` are evaluated (all of them after a full pass over the dataset).
        A number is -1 where the ground truth has nothing to measure (e.g. no small objects).
        """
        if not self.results:
            raise ValueError("CocoEvaluator.compute() called before any update()")
        if self._scoring_gt is None:
            self._scoring_gt = renumber_annotations(self.coco_gt)
        self.coco_eval = run_cocoeval(self._scoring_gt.dataset, self.detections(), sorted(self.results),
                                      backend=self.backend, gt_index=self._scoring_gt)
        coco_eval = self.coco_eval
        self._summary = coco_eval.summary_text
        numbers = list(coco_eval.stats)[: len(STAT_NAMES)]  # faster-coco-eval appends more
        self.stats = {name: float(value) for name, value in zip(STAT_NAMES, numbers, strict=True)}
        return dict(self.stats)

    def summary_text(self) -> str:
        """The 12-line summary COCOeval printed for the last `compute()`."""
        if self.stats is None:
            raise ValueError("CocoEvaluator.summary_text() called before compute()")
        return self._summary
