"""Sliced inference (Predictor.predict(slice_size=, overlap=)): window layout, class-wise merging of an
object cut by a window border, and AP on large generated images with small objects.

The detector here is a stand-in with a finite input resolution, like a real one: it finds bright blobs
in the network input (after the evaluation resize to `eval_size`) and returns their bounding boxes as
DETR outputs, one query per blob. Small objects shrink to a pixel or vanish in a whole large image
resized to `eval_size`, and keep their size in a window, which is what slicing is for.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from scipy import ndimage

pytest.importorskip("sahi", reason="the export extra (sahi) is not installed")

from detr_lab.config import load_config  # noqa: E402
from detr_lab.errors import InputError  # noqa: E402
from detr_lab.predict import Predictor  # noqa: E402
from detr_lab.predict.slicing import merge_detections, slice_windows  # noqa: E402

from factories import load_tool, tiny_overrides  # noqa: E402

NUM_QUERIES = 40
EVAL_SIZE = 128


class BlobDetector:
    """(images [B, 3, H, W] normalized, padding_mask [B, H, W]) -> DETR outputs: one query per
    connected bright region (channel mean above 0), class 0, normalized cxcywh of its pixel extent."""

    def __call__(self, images: torch.Tensor, padding_mask: torch.Tensor) -> dict[str, torch.Tensor]:
        batch = images.shape[0]
        logits = torch.full((batch, NUM_QUERIES, 2), -10.0)
        logits[..., 1] = 10.0  # "no object"
        boxes = torch.full((batch, NUM_QUERIES, 4), 0.5)
        for b in range(batch):
            height = int((~padding_mask[b]).any(1).sum())
            width = int((~padding_mask[b]).any(0).sum())
            bright = (images[b, :, :height, :width].mean(0) > 0.0).numpy()
            regions, _ = ndimage.label(bright)
            for q, (rows, cols) in enumerate(ndimage.find_objects(regions)[:NUM_QUERIES]):
                logits[b, q] = torch.tensor([10.0, -10.0])
                boxes[b, q] = torch.tensor([
                    (cols.start + cols.stop) / 2 / width, (rows.start + rows.stop) / 2 / height,
                    (cols.stop - cols.start) / width, (rows.stop - rows.start) / height,
                ])
        return {"pred_logits": logits, "pred_boxes": boxes}


@pytest.fixture(scope="module")
def predictor():
    sizes = (f"data.augment.eval_size={EVAL_SIZE}", f"data.augment.eval_max_size={EVAL_SIZE}")
    overrides = tiny_overrides(*sizes, num_classes=1, num_queries=NUM_QUERIES)
    cfg = load_config("configs/detr_r50.yaml", overrides)
    return Predictor(BlobDetector(), cfg, [1], ["blob"], torch.device("cpu"), optimize=False)


def _image(size: int, squares: list[tuple[int, int, int]]) -> np.ndarray:
    """A dark uint8 [size, size, 3] image with white squares (x, y, side)."""
    image = np.full((size, size, 3), 20, np.uint8)
    for x, y, side in squares:
        image[y : y + side, x : x + side] = 255
    return image


def test_windows_cover_the_image_with_the_requested_overlap():
    windows = slice_windows(200, 300, 100, 0.2)
    assert all(x2 - x1 == 100 and y2 - y1 == 100 for x1, y1, x2, y2 in windows)
    covered = np.zeros((200, 300), bool)
    for x1, y1, x2, y2 in windows:
        covered[y1:y2, x1:x2] = True
    assert covered.all()
    starts = sorted({x1 for x1, _, _, _ in windows})
    assert starts[:2] == [0, 80]  # 20 % of 100 pixels shared by neighbours
    with pytest.raises(InputError, match="overlap"):
        slice_windows(200, 300, 100, 0.95)


def test_merge_keeps_one_box_per_object_and_class():
    boxes = torch.tensor([[10.0, 10, 50, 50], [10, 10, 30, 50], [10, 10, 30, 50], [100, 100, 120, 120]])
    scores = torch.tensor([0.9, 0.8, 0.7, 0.6])
    labels = torch.tensor([0, 0, 1, 0])
    merged = merge_detections(boxes, scores, labels)  # the cut part (index 1) lies inside the whole box
    assert merged["scores"].tolist() == pytest.approx([0.9, 0.7, 0.6])
    assert merged["labels"].tolist() == [0, 1, 0]  # another class is never merged away
    enclosing = merge_detections(boxes[[1, 3]], scores[[1, 3]], labels[[1, 3]], method="nmm")
    assert enclosing["boxes"].tolist() == [[10, 10, 30, 50], [100, 100, 120, 120]]


def test_object_cut_by_a_window_border_comes_back_as_one_box(predictor):
    # windows of 128 with overlap 0.25 start at 0 and 96: x = 120..136 crosses the first border (128)
    image = _image(224, [(120, 40, 16), (30, 150, 12)])
    whole_windows = slice_windows(224, 224, 128, 0.25)
    assert any(x1 < 120 < x2 < 136 for x1, _, x2, _ in whole_windows)  # a window cuts the square
    found = predictor.predict(image, score_threshold=0.5, slice_size=128, overlap=0.25)[0]
    boxes = sorted(found["boxes"].tolist())
    assert boxes == [pytest.approx([30, 150, 42, 162]), pytest.approx([120, 40, 136, 56])]
    assert found["class_names"] == ["blob", "blob"]
    # NMS also leaves one box per object (which one: the best scored; here the scores are equal)
    kept = predictor.predict(image, score_threshold=0.5, slice_size=128, overlap=0.25, slice_merge="nms")[0]
    assert len(kept["boxes"]) == 2


def _coco_ap(images: list[np.ndarray], truth: list[list[tuple[int, int, int]]], found: list[dict]) -> float:
    dataset = {"images": [], "annotations": [], "categories": [{"id": 1, "name": "blob"}]}
    for index, (image, squares) in enumerate(zip(images, truth, strict=True)):
        dataset["images"].append({"id": index + 1, "height": image.shape[0], "width": image.shape[1]})
        for x, y, side in squares:
            dataset["annotations"].append({"id": len(dataset["annotations"]) + 1, "image_id": index + 1,
                                           "category_id": 1, "bbox": [x, y, side, side],
                                           "area": side * side, "iscrowd": 0})
    coco = COCO()
    coco.dataset = dataset
    coco.createIndex()
    results = [{"image_id": index + 1, "category_id": 1, "bbox": [x1, y1, x2 - x1, y2 - y1], "score": score}
               for index, detection in enumerate(found)
               for (x1, y1, x2, y2), score in zip(detection["boxes"].tolist(), detection["scores"].tolist(),
                                                  strict=True)]
    if not results:
        return 0.0
    evaluation = COCOeval(coco, coco.loadRes(results), "bbox")
    evaluation.evaluate()
    evaluation.accumulate()
    evaluation.summarize()
    return float(evaluation.stats[0])


def test_sliced_ap_beats_whole_image_ap_on_small_objects(predictor, capsys):
    """Four 512 x 512 images with 10 squares of 4-8 pixels each; the detector sees 128 x 128 inputs, so
    the whole image is shrunk 4 times and each 128-pixel window is seen at full resolution."""
    rng = np.random.default_rng(0)
    images, truth = [], []
    for _ in range(4):
        squares = []
        while len(squares) < 10:
            side = int(rng.integers(4, 9))
            x, y = (int(v) for v in rng.integers(4, 512 - 16, 2))
            if all(abs(x - u) > 16 or abs(y - v) > 16 for u, v, _ in squares):
                squares.append((x, y, side))
        images.append(_image(512, squares))
        truth.append(squares)
    whole = predictor.predict(images, score_threshold=0.5)
    sliced = [predictor.predict(image, score_threshold=0.5, slice_size=128, overlap=0.2)[0]
              for image in images]
    whole_ap, sliced_ap = _coco_ap(images, truth, whole), _coco_ap(images, truth, sliced)
    with capsys.disabled():
        print(f"\nsmall objects, 512 px images, 128 px detector input: whole-image AP {whole_ap:.3f}, "
              f"sliced AP {sliced_ap:.3f}")
    assert sliced_ap > whole_ap + 0.3
    assert sliced_ap > 0.8


def test_infer_refuses_slicing_options_without_slice(tmp_path, capsys):
    with pytest.raises(SystemExit) as usage:
        load_tool("infer").main([str(tmp_path / "a.jpg"), "--checkpoint", str(tmp_path / "c.ckpt"),
                                 "--overlap", "0.3"])
    assert usage.value.code == 2 and "add --slice" in capsys.readouterr().err
