"""CocoEvaluator: ground truth fed back scores 1.0, results use original ids and COCO xywh, dedupe, errors."""

import contextlib
import io
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from detr_lab.engine.evaluator import STAT_NAMES, CocoEvaluator, xyxy_to_coco_xywh

# Non-contiguous category ids, as in COCO: class index i -> CATEGORY_IDS[i].
CATEGORY_IDS = [3, 7, 12]


def make_coco_dataset() -> dict:
    images = [{"id": i, "width": 320, "height": 240, "file_name": f"{i}.jpg"} for i in (10, 11, 12)]
    boxes = [  # image id, category id, x, y, w, h: small, medium and large objects
        (10, 3, 10.0, 20.0, 30.0, 25.0),
        (10, 7, 100.0, 50.0, 120.0, 90.0),
        (11, 12, 5.0, 5.0, 200.0, 150.0),
        (11, 3, 250.0, 180.0, 40.0, 30.0),
        (12, 7, 60.0, 70.0, 20.0, 12.0),
    ]
    annotations = [
        {"id": k + 1, "image_id": i, "category_id": c, "bbox": [x, y, w, h], "area": w * h, "iscrowd": 0}
        for k, (i, c, x, y, w, h) in enumerate(boxes)
    ]
    categories = [{"id": c, "name": f"class{c}"} for c in CATEGORY_IDS]
    return {"images": images, "annotations": annotations, "categories": categories}


def make_coco(dataset: dict | None = None) -> COCO:
    coco = COCO()
    coco.dataset = dataset or make_coco_dataset()
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def ground_truth_as_predictions(coco: COCO) -> dict:
    """Per image: the annotations as a post-processor would return them (xyxy, class index, score 1)."""
    predictions = {}
    for image_id in coco.getImgIds():
        anns = coco.loadAnns(coco.getAnnIds(imgIds=[image_id]))
        xywh = torch.tensor([a["bbox"] for a in anns]).reshape(-1, 4)
        boxes = torch.cat([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], dim=1)  # x1, y1, x2, y2
        labels = torch.tensor([CATEGORY_IDS.index(a["category_id"]) for a in anns], dtype=torch.int64)
        predictions[image_id] = {"boxes": boxes, "labels": labels, "scores": torch.ones(len(anns))}
    return predictions


def test_xyxy_to_coco_xywh():
    boxes = torch.tensor([[10.0, 20.0, 40.0, 45.0], [0.0, 0.0, 1.5, 2.5]])
    expected = torch.tensor([[10.0, 20.0, 30.0, 25.0], [0.0, 0.0, 1.5, 2.5]])
    assert torch.equal(xyxy_to_coco_xywh(boxes), expected)


def test_ground_truth_fed_back_scores_one():
    coco = make_coco()
    evaluator = CocoEvaluator(coco, CATEGORY_IDS)
    evaluator.update(ground_truth_as_predictions(coco))
    stats = evaluator.compute()
    assert list(stats) == list(STAT_NAMES)
    for name in ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100"):
        assert stats[name] == pytest.approx(1.0), name
    lines = evaluator.summary_text().splitlines()
    assert len(lines) == 12 and lines[0].startswith(" Average Precision  (AP) @[ IoU=0.50:0.95")


def test_written_results_use_original_ids_and_match_pycocotools(tmp_path):
    coco = make_coco()
    predictions = ground_truth_as_predictions(coco)
    # Perturb: shift one box and drop confidence on another so the numbers are not all 1.
    predictions[10]["boxes"][1] += torch.tensor([30.0, 10.0, 30.0, 10.0])
    predictions[11]["scores"][0] = 0.3
    predictions[12] = {"boxes": torch.tensor([[0.0, 0.0, 50.0, 50.0]]), "labels": torch.tensor([2]),
                       "scores": torch.tensor([0.9])}
    evaluator = CocoEvaluator(coco, CATEGORY_IDS)
    evaluator.update(predictions)
    stats = evaluator.compute()
    path = evaluator.write_results(tmp_path / "results.json")
    written = json.loads(path.read_text())
    assert {d["category_id"] for d in written} == {3, 7, 12}
    first = [d for d in written if d["image_id"] == 10 and d["category_id"] == 3][0]
    assert first["bbox"] == [10.0, 20.0, 30.0, 25.0]
    # pycocotools run directly on the written file gives the same numbers, to the last bit.
    with contextlib.redirect_stdout(io.StringIO()):
        coco_eval = COCOeval(coco, coco.loadRes(str(path)), "bbox")
        coco_eval.evaluate()
        coco_eval.accumulate()
        coco_eval.summarize()
    assert [stats[name] for name in STAT_NAMES] == [float(v) for v in coco_eval.stats]
    assert 0.0 < stats["AP"] < 1.0


def test_repeated_image_counts_once():
    coco = make_coco()
    predictions = ground_truth_as_predictions(coco)
    evaluator = CocoEvaluator(coco, CATEGORY_IDS)
    evaluator.update(predictions)
    evaluator.update({11: predictions[11]})  # as a padded distributed sampler would repeat it
    assert len(evaluator.detections()) == 5
    assert evaluator.compute()["AP"] == pytest.approx(1.0)


def test_no_detections_gives_zero_ap():
    coco = make_coco()
    evaluator = CocoEvaluator(coco, CATEGORY_IDS)
    empty = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64),
             "scores": torch.zeros(0)}
    evaluator.update({i: empty for i in coco.getImgIds()})
    assert evaluator.compute()["AP"] == 0.0


def test_bad_predictions_are_named():
    coco = make_coco()
    evaluator = CocoEvaluator(coco, CATEGORY_IDS)
    one = {"boxes": torch.zeros(1, 4), "labels": torch.tensor([3]), "scores": torch.ones(1)}
    with pytest.raises(ValueError, match="image_id 10.*from 3 to 3"):
        evaluator.update({10: one})
    with pytest.raises(ValueError, match="image_id 999"):
        evaluator.update({999: {**one, "labels": torch.tensor([0])}})
    with pytest.raises(ValueError, match="before any update"):
        evaluator.compute()


WORKER = textwrap.dedent(
    """
    import json, sys, torch, torch.distributed as dist
    sys.path.insert(0, sys.argv[1])
    from test_coco_evaluator import CATEGORY_IDS, ground_truth_as_predictions, make_coco
    from detr_lab.engine.evaluator import CocoEvaluator
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    coco = make_coco()
    predictions = ground_truth_as_predictions(coco)
    # Rank 0 sees images 10 and 11, rank 1 sees 12 and (padding) 10 again.
    mine = [10, 11] if rank == 0 else [12, 10]
    evaluator = CocoEvaluator(coco, CATEGORY_IDS)
    evaluator.update({i: predictions[i] for i in mine})
    evaluator.gather()
    print(json.dumps({"rank": rank, "images": sorted(evaluator.results), "n": len(evaluator.detections()),
                      "AP": evaluator.compute()["AP"]}))
    dist.destroy_process_group()
    """
)


@pytest.mark.slow  # two gloo processes
def test_gather_across_two_processes(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(29500 + os.getpid() % 1000),
           "WORLD_SIZE": "2"}
    here = os.path.dirname(__file__)
    procs = [subprocess.Popen([sys.executable, str(script), here], env={**env, "RANK": str(r)},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(2)]
    outputs = [p.communicate(timeout=120) for p in procs]
    for p, (_, err) in zip(procs, outputs, strict=True):
        assert p.returncode == 0, err
    reports = [json.loads(out.strip().splitlines()[-1]) for out, _ in outputs]
    for report in reports:
        assert report["images"] == [10, 11, 12]
        assert report["n"] == 5  # image 10 seen twice, counted once
        assert report["AP"] == pytest.approx(1.0)


@pytest.mark.parametrize("first_id", [0, -7, 2**40], ids=["zero", "negative", "very_large"])
def test_ground_truth_scores_one_whatever_the_annotation_ids(first_id):
    # pycocotools' match table uses 0 for "unmatched": a GT annotation with id 0 was never found
    # (AP 0.252 instead of 1.0 on a two-box set, cocoapi #664).
    dataset = make_coco_dataset()
    for k, ann in enumerate(dataset["annotations"]):
        ann["id"] = first_id + k
    coco = make_coco(dataset)
    evaluator = CocoEvaluator(coco, CATEGORY_IDS)
    evaluator.update(ground_truth_as_predictions(coco))
    stats = evaluator.compute()
    assert stats["AP"] == pytest.approx(1.0)
    assert stats["AR100"] == pytest.approx(1.0)
    # the caller's index keeps its ids
    assert sorted(coco.anns) == [first_id + k for k in range(len(dataset["annotations"]))]


def test_two_box_set_with_annotation_id_zero_scores_one():
    # The case of the bug report: ids 0 and 1 gave AP 0.252.
    dataset = {
        "images": [{"id": 1, "width": 100, "height": 100, "file_name": "a.jpg"}],
        "annotations": [
            {"id": 0, "image_id": 1, "category_id": 3, "bbox": [10.0, 10.0, 30.0, 30.0], "area": 900.0,
             "iscrowd": 0},
            {"id": 1, "image_id": 1, "category_id": 7, "bbox": [50.0, 40.0, 40.0, 50.0], "area": 2000.0,
             "iscrowd": 0},
        ],
        "categories": [{"id": c, "name": f"class{c}"} for c in CATEGORY_IDS],
    }
    coco = make_coco(dataset)
    evaluator = CocoEvaluator(coco, CATEGORY_IDS)
    evaluator.update(ground_truth_as_predictions(coco))
    assert evaluator.compute()["AP"] == pytest.approx(1.0)
