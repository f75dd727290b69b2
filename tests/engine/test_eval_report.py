"""Evaluation reports: the confusion matrix against hand-counted cases, per-class AP from COCOeval's
arrays, the report folder, and the faster-coco-eval backend against pycocotools on the synthetic set."""

import csv
import importlib.util

import numpy as np
import pytest
import torch
from test_coco_evaluator import CATEGORY_IDS, ground_truth_as_predictions, make_coco

from detr_lab.data.synthetic import SHAPE_CATEGORIES, draw_synthetic_image
from detr_lab.engine import coco_backends
from detr_lab.engine.confusion import ConfusionMatrix, match_one_to_one
from detr_lab.engine.eval_report import per_class_metrics, write_report
from detr_lab.engine.evaluator import STAT_NAMES, CocoEvaluator
from detr_lab.errors import InputError, MissingExtraError

HAS_FASTER = importlib.util.find_spec("faster_coco_eval") is not None


def boxes(*rows):
    return torch.tensor(rows, dtype=torch.float32).reshape(-1, 4)


def labels(*values):
    return torch.tensor(values, dtype=torch.int64)


# ------------------------------------------------------------------------------ confusion matrix
def test_confusion_counts_hits_confusions_misses_and_false_positives():
    matrix = ConfusionMatrix(2, iou_threshold=0.5, score_threshold=0.3)
    matrix.add_image(
        boxes([0, 0, 10, 10], [20, 20, 30, 30], [50, 50, 60, 60]), labels(0, 1, 0),
        boxes([0, 0, 10, 10], [20, 20, 30, 30], [80, 80, 90, 90], [50, 50, 60, 60]), labels(0, 0, 1, 0),
        torch.tensor([0.9, 0.8, 0.7, 0.1]),  # the last one is below the score threshold
    )
    # rows: ground truth 0, 1, background; columns: prediction 0, 1, background (counted by hand)
    assert matrix.counts.tolist() == [[1, 0, 1], [1, 0, 0], [0, 1, 0]]


@pytest.mark.parametrize("order", [(0, 1), (1, 0)])
def test_confusion_pairs_the_highest_iou_first(order):
    det = [boxes([0, 0, 10, 8]), boxes([0, 0, 10, 10])]  # IoU 0.8 (class 1) and 1.0 (class 0) with the gt
    cls = [1, 0]
    matrix = ConfusionMatrix(2)
    matrix.add_image(boxes([0, 0, 10, 10]), labels(0), torch.cat([det[i] for i in order]),
                     labels(*[cls[i] for i in order]), torch.tensor([0.9, 0.9]))
    assert matrix.counts.tolist() == [[1, 0, 0], [0, 0, 0], [0, 1, 0]]


@pytest.mark.parametrize(("iou", "expected"), [(0.5, [[1, 0], [0, 0]]), (0.6, [[0, 1], [1, 0]])])
def test_confusion_iou_threshold_is_inclusive(iou, expected):
    matrix = ConfusionMatrix(1, iou_threshold=iou, score_threshold=0.0)
    matrix.add_image(boxes([0, 0, 10, 10]), labels(0), boxes([0, 0, 10, 5]), labels(0), torch.tensor([0.5]))
    assert matrix.counts.tolist() == expected  # IoU exactly 0.5


def test_confusion_one_detection_pairs_with_one_ground_truth_box():
    matrix = ConfusionMatrix(1)
    # the detection covers gt 1 exactly (IoU 1) and gt 0 at IoU 0.9: gt 0 is a miss
    matrix.add_image(boxes([0, 0, 10, 10], [0, 0, 10, 9]), labels(0, 0), boxes([0, 0, 10, 9]), labels(0),
                     torch.tensor([0.9]))
    assert matrix.counts.tolist() == [[1, 1], [0, 0]]
    assert match_one_to_one(torch.tensor([[0.9], [1.0]]), 0.5) == [(1, 0)]


def test_confusion_empty_images_and_bad_input():
    matrix = ConfusionMatrix(2)
    matrix.add_image(boxes(), labels(), boxes([0, 0, 5, 5]), labels(1), torch.tensor([0.9]))
    matrix.add_image(boxes([0, 0, 5, 5]), labels(0), boxes(), labels(), torch.tensor([]))
    assert matrix.counts.tolist() == [[0, 0, 1], [0, 0, 0], [0, 1, 0]]
    with pytest.raises(InputError, match="IoU threshold 0"):
        ConfusionMatrix(2, iou_threshold=0.0)
    with pytest.raises(InputError, match=r"outside \[0, 2\)"):
        matrix.add_image(boxes([0, 0, 5, 5]), labels(2), boxes(), labels(), torch.tensor([]))


# ------------------------------------------------------------------------------ per-class report
def _evaluator_with(predictions) -> CocoEvaluator:
    evaluator = CocoEvaluator(make_coco(), CATEGORY_IDS + [99])  # class 3 (id 99): no ground truth
    evaluator.update(predictions)
    evaluator.compute()
    return evaluator


def test_per_class_ap_from_cocoeval_arrays():
    predictions = ground_truth_as_predictions(make_coco())
    for prediction in predictions.values():  # class index 1 (category 7) predicted as class 2, score 0.5
        moved = prediction["labels"] == 1
        prediction["labels"] = torch.where(moved, 2, prediction["labels"])
        prediction["scores"] = torch.where(moved, 0.5, prediction["scores"])
    rows = per_class_metrics(_evaluator_with(predictions))
    assert [(r.category_id, r.gt_boxes) for r in rows] == [(3, 2), (7, 2), (12, 1), (99, 0)]
    # class 3 and 12: every box found exactly (class 12's two false positives rank below its hit, so
    # precision stays 1 up to recall 1); class 7: none found; id 99: no ground truth
    assert [r.AP for r in rows] == pytest.approx([1.0, 0.0, 1.0, -1.0], abs=1e-12)
    assert [r.AP50 for r in rows] == pytest.approx([1.0, 0.0, 1.0, -1.0], abs=1e-12)
    assert [r.AR100 for r in rows] == pytest.approx([1.0, 0.0, 1.0, -1.0], abs=1e-12)
    for prediction in predictions.values():  # the false positives now tie with the hit (score 1) and
        prediction["scores"][:] = 1.0        # come first (image 10 before 11): precision 1/2 at recall 1
    rows = per_class_metrics(_evaluator_with(predictions))
    assert (rows[2].AP, rows[2].AP50, rows[2].AR100) == pytest.approx((0.5, 0.5, 1.0), abs=1e-12)


def test_report_folder(tmp_path):
    predictions = ground_truth_as_predictions(make_coco())
    predictions[10]["labels"][1] = 2  # image 10's category-7 box predicted as category 12
    predictions[12]["scores"][:] = 0.1  # image 12's only box below the matrix's score threshold
    evaluator = _evaluator_with(predictions)
    report = write_report(tmp_path / "report", evaluator, iou_threshold=0.5, score_threshold=0.3)
    with open(tmp_path / "report" / "per_class.csv") as file:
        rows = list(csv.DictReader(file))
    assert [row["name"] for row in rows] == ["class3", "class7", "class12", "99"]
    assert float(rows[0]["AP"]) == 1.0 and float(rows[3]["AP"]) == -1.0
    with open(tmp_path / "report" / "confusion_matrix.csv") as file:
        matrix = [[int(v) for v in row[1:]] for row in list(csv.reader(file))[1:]]
    # gt class3: 2 hits; class7: one confused with class12, one missed (score 0.1); class12: 1 hit;
    # background: nothing unpaired above the score threshold
    assert matrix == [[2, 0, 0, 0, 0], [0, 0, 1, 0, 1], [0, 0, 1, 0, 0], [0, 0, 0, 0, 0], [0, 0, 0, 0, 0]]
    assert np.array_equal(report.confusion, np.array(matrix))
    assert (tmp_path / "report" / "confusion_matrix.png").read_bytes()[:4] == b"\x89PNG"
    curves = sorted(p.name for p in (tmp_path / "report" / "pr_curves").iterdir())
    assert curves == ["000-class3.png", "001-class7.png", "002-class12.png"]  # none for a class without gt
    assert report.table.splitlines()[0].split() == ["class", "gt", "AP", "AP50", "AR100"]
    assert report.table.splitlines()[4].split() == ["99", "0", "-", "-", "-"]


# ------------------------------------------------------------------------------ backends
def synthetic_set_and_detections(num_images: int = 24, seed: int = 3) -> tuple[dict, dict]:
    """Ground truth drawn by the synthetic set's generator (48 px images) and noisy detections: each
    box jittered, sometimes relabelled or dropped, plus random false positives, random scores."""
    rng = np.random.default_rng(seed)
    images, annotations, predictions = [], [], {}
    ids = [c.id for c in SHAPE_CATEGORIES]
    for image_id in range(1, num_images + 1):
        image, objects = draw_synthetic_image(48, np.random.default_rng([seed, image_id]))
        images.append({"id": image_id, "width": image.width, "height": image.height, "file_name": "x.jpg"})
        det_boxes, det_labels = [], []
        for obj in objects:
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "iscrowd": 0, **obj})
            x, y, w, h = obj["bbox"]
            if rng.random() < 0.8:
                jitter = rng.normal(0, 0.1, 4) * [w, h, w, h]
                det_boxes.append([x + jitter[0], y + jitter[1], x + w + jitter[2], y + h + jitter[3]])
                keep = rng.random() < 0.8
                det_labels.append(ids.index(obj["category_id"]) if keep else int(rng.integers(len(ids))))
        for _ in range(int(rng.integers(0, 4))):
            x1, y1 = rng.uniform(0, 30, 2)
            det_boxes.append([x1, y1, x1 + rng.uniform(4, 18), y1 + rng.uniform(4, 18)])
            det_labels.append(int(rng.integers(len(ids))))
        predictions[image_id] = {
            "boxes": torch.tensor(det_boxes, dtype=torch.float32).reshape(-1, 4),
            "labels": torch.tensor(det_labels, dtype=torch.int64),
            "scores": torch.tensor(rng.uniform(0.05, 1.0, len(det_labels)), dtype=torch.float32),
        }
    categories = [{"id": c.id, "name": c.name} for c in SHAPE_CATEGORIES]
    return {"images": images, "annotations": annotations, "categories": categories}, predictions


def test_per_class_means_are_cocoevals_summary_numbers():
    dataset, predictions = synthetic_set_and_detections()
    evaluator = CocoEvaluator(make_coco(dataset), [c.id for c in SHAPE_CATEGORIES])
    evaluator.update(predictions)
    stats = evaluator.compute()  # COCOeval.summarize()'s numbers
    rows = [row for row in per_class_metrics(evaluator) if row.gt_boxes]
    assert len(rows) >= 4 and len({round(row.AP, 6) for row in rows}) > 1  # classes differ
    for key, stat in (("AP", "AP"), ("AP50", "AP50"), ("AR100", "AR100")):
        assert np.mean([getattr(row, key) for row in rows]) == pytest.approx(stats[stat], abs=1e-12), key


@pytest.mark.skipif(not HAS_FASTER, reason="faster-coco-eval (the eval extra) is not installed")
def test_faster_coco_eval_gives_pycocotools_ap_on_the_synthetic_set():
    dataset, predictions = synthetic_set_and_detections()
    results = {}
    for backend in coco_backends.BACKENDS:
        evaluator = CocoEvaluator(make_coco(dataset), [c.id for c in SHAPE_CATEGORIES], backend=backend)
        evaluator.update(predictions)
        results[backend] = (evaluator.compute(), per_class_metrics(evaluator))
    (stats, rows), (faster_stats, faster_rows) = results["pycocotools"], results["faster-coco-eval"]
    assert 0.2 < stats["AP"] < 0.9  # neither trivial nor perfect
    for name in STAT_NAMES:
        assert faster_stats[name] == pytest.approx(stats[name], abs=1e-9), name
    for mine, theirs in zip(rows, faster_rows, strict=True):
        expected = (mine.AP, mine.AP50, mine.AR100)
        assert (theirs.AP, theirs.AP50, theirs.AR100) == pytest.approx(expected, abs=1e-9)


def test_backend_errors(monkeypatch):
    with pytest.raises(InputError, match="'detectron' is not one of pycocotools, faster-coco-eval"):
        CocoEvaluator(make_coco(), CATEGORY_IDS, backend="detectron")
    monkeypatch.setattr(coco_backends, "COCOeval_faster", None)
    with pytest.raises(MissingExtraError, match=r"eval extra: pip install -e \"\.\[eval\]\""):
        CocoEvaluator(make_coco(), CATEGORY_IDS, backend="faster-coco-eval")
