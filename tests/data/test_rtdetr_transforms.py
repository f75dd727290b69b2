"""RT-DETR's input pipeline (`data.augment.policy: rtdetr`): each op against torchvision.transforms.v2
(what the official code runs) or hand-computed values, the stop-epoch switch through the dataset, and
the evaluation resize mapped back to original pixels by the real post-processing and Predictor."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
import torchvision.transforms.v2 as T
import torchvision.transforms.v2.functional as TF
from coco_test_files import write_coco_json
from PIL import Image
from torchvision import tv_tensors

from detr_lab.boxes import cxcywh_to_xyxy
from detr_lab.config import AugmentConfig, Config
from detr_lab.data.coco import CocoDetectionDataset
from detr_lab.data.transforms import (
    DetectionTransform,
    RandomIoUCrop,
    RandomPhotometricDistort,
    RandomZoomOut,
    SquareResize,
    StopEpochTransform,
    build_eval_transform,
    build_train_transform,
    eval_resized_size,
)
from detr_lab.engine.detect import detect
from detr_lab.models.postprocess import PostProcess
from detr_lab.predict.infer import same_size_groups
from detr_lab.predict.predictor import Predictor

RED, GREEN = (255, 0, 0), (0, 255, 0)
NO_NORMALIZATION = {"mean": [0.0, 0.0, 0.0], "std": [1.0, 1.0, 1.0]}


def _rtdetr(**changes) -> AugmentConfig:
    return AugmentConfig(policy="rtdetr", **{**NO_NORMALIZATION, **changes})


def _noise(height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def _pixels(image: torch.Tensor) -> np.ndarray:
    """Float `[3, H, W]` in [0, 1] (mean 0, std 1) -> float `[H, W, 3]` grey levels."""
    return image.numpy().transpose(1, 2, 0) * 255.0


def _absolute(boxes: torch.Tensor, height: int, width: int) -> np.ndarray:
    return (cxcywh_to_xyxy(boxes) * torch.tensor([width, height, width, height])).numpy()


def _pil_resize(image: np.ndarray, size: int) -> np.ndarray:
    """The official evaluation resize: torchvision's Resize([size, size]) on a PIL image."""
    return np.asarray(TF.resize(Image.fromarray(image), [size, size]))


# ------------------------------------------------------------------------------------------ the ops
def test_square_resize_is_torchvisions_resize_of_a_pil_image():
    image = _noise(37, 53)
    for size in (24, 64, 90):  # shrink, stretch one side, grow
        ours = SquareResize(size).apply(image)
        assert ours.shape == (size, size, 3)
        np.testing.assert_array_equal(ours, _pil_resize(image, size))


@pytest.mark.parametrize(
    ("params", "reference"),
    [
        ({"brightness_factor": 1.1}, lambda x: TF.adjust_brightness(x, 1.1)),
        ({"contrast_factor": 0.7}, lambda x: TF.adjust_contrast(x, 0.7)),
        ({"saturation_factor": 1.3}, lambda x: TF.adjust_saturation(x, 1.3)),
        ({"hue_factor": 0.04}, lambda x: TF.adjust_hue(x, 0.04)),
        ({"hue_factor": -0.05}, lambda x: TF.adjust_hue(x, -0.05)),
        ({"channel_permutation": [2, 0, 1]}, lambda x: TF.permute_channels(x, [2, 0, 1])),
        (  # all of them, contrast last: brightness, saturation, hue, contrast, permutation
            {"brightness_factor": 0.9, "contrast_factor": 1.4, "contrast_before": False,
             "saturation_factor": 0.6, "hue_factor": 0.03, "channel_permutation": [1, 2, 0]},
            lambda x: TF.permute_channels(TF.adjust_contrast(TF.adjust_hue(TF.adjust_saturation(
                TF.adjust_brightness(x, 0.9), 0.6), 0.03), 1.4), [1, 2, 0]),
        ),
    ],
)
def test_photometric_operations_match_torchvision(params, reference):
    image = _noise(40, 50)
    ours = RandomPhotometricDistort().apply(image.copy(), **params)
    theirs = reference(torch.from_numpy(image).permute(2, 0, 1)).permute(1, 2, 0).numpy()
    difference = np.abs(ours.astype(int) - theirs.astype(int))
    # Rounding only: one operation within a grey level (hue on OpenCV's uint8 HSV would be ~11 off);
    # the chain rounds after each operation and its contrast 1.4 amplifies the earlier rounding.
    chained = len(params) > 1
    assert difference.max() <= (4 if chained else 1) and difference.mean() < (0.8 if chained else 0.3)


def test_photometric_draws_follow_torchvisions_defaults():
    distort = RandomPhotometricDistort(p=0.5)
    distort.set_random_seed(0)
    draws = [distort.get_params() for _ in range(4000)]
    ranges = {"brightness_factor": (0.875, 1.125), "contrast_factor": (0.5, 1.5),
              "saturation_factor": (0.5, 1.5), "hue_factor": (-0.05, 0.05)}
    for key, (low, high) in ranges.items():
        values = [d[key] for d in draws if d[key] is not None]
        assert 0.46 < len(values) / len(draws) < 0.54, key  # each operation with p = 0.5
        assert low <= min(values) and max(values) <= high
        assert min(values) < low + 0.02 * (high - low) and max(values) > high - 0.02 * (high - low)
    permutations = [d["channel_permutation"] for d in draws if d["channel_permutation"] is not None]
    assert 0.46 < len(permutations) / len(draws) < 0.54
    assert {tuple(p) for p in permutations} == set(itertools.permutations(range(3)))
    assert 0.46 < np.mean([d["contrast_before"] for d in draws]) < 0.54
    never = RandomPhotometricDistort(p=0.0)
    image = _noise(8, 8)
    np.testing.assert_array_equal(never(image=image)["image"], image)


class _Fixed:
    """Mixin: an op with its random parameters replaced by given ones (the apply path stays real)."""

    fixed: dict

    def get_params_dependent_on_data(self, params, data):
        return dict(self.fixed)


class _FixedZoomOut(_Fixed, RandomZoomOut):
    pass


class _FixedCrop(_Fixed, RandomIoUCrop):
    pass


def _one_step(op, image, boxes, labels):
    """`op` alone with the rtdetr policy's box handling (clip, drop under 1 px), no normalization."""
    transform = DetectionTransform([op], **NO_NORMALIZATION, min_box_side=1.0)
    out_image, out_boxes, out_labels = transform(image, boxes, labels)
    height, width = out_image.shape[1:]
    return np.rint(_pixels(out_image)).astype(np.uint8), _absolute(out_boxes, height, width), out_labels


def test_zoom_out_pads_image_and_boxes_as_torchvision():
    image = _noise(30, 40)
    boxes = np.array([[2, 3, 12, 20], [25, 10, 40, 30]], dtype=np.float32)
    op = _FixedZoomOut(p=1.0)
    op.fixed = {"canvas_shape": (75, 100), "offset": (37, 11)}  # left 37, top 11
    out_image, out_boxes, labels = _one_step(op, image, boxes, np.array([4, 7]))
    padding = [37, 11, 100 - 40 - 37, 75 - 30 - 11]  # left, top, right, bottom
    np.testing.assert_array_equal(out_image, TF.pad(torch.from_numpy(image).permute(2, 0, 1), padding, fill=0)
                                  .permute(1, 2, 0).numpy())
    expected = TF.pad(tv_tensors.BoundingBoxes(torch.from_numpy(boxes), format="XYXY", canvas_size=(30, 40)),
                      padding)
    np.testing.assert_allclose(out_boxes, expected.numpy(), atol=1e-3)
    np.testing.assert_allclose(out_boxes, [[39, 14, 49, 31], [62, 21, 77, 41]], atol=1e-3)  # by hand
    assert labels.tolist() == [4, 7]


def test_zoom_out_draws_canvas_and_offset_by_torchvisions_rule():
    op = RandomZoomOut(side_range=(1.0, 4.0), p=1.0)
    op.set_random_seed(0)
    ratios = []
    for _ in range(500):
        params = op.get_params_dependent_on_data({"shape": (30, 40, 3)}, {})
        (canvas_h, canvas_w), (left, top) = params["canvas_shape"], params["offset"]
        ratio = canvas_w / 40  # int(40 r) / 40: within 1 / 40 below r; int(30 r) from the same r
        assert 1.0 <= ratio < 4.0 and int(30 * ratio) <= canvas_h <= int(30 * (ratio + 1 / 40))
        assert 0 <= left <= canvas_w - 40 and 0 <= top <= canvas_h - 30
        ratios.append(ratio)
    assert min(ratios) < 1.1 and max(ratios) > 3.9
    fixed = RandomZoomOut(side_range=(2.5, 2.5), p=1.0)
    assert fixed.get_params_dependent_on_data({"shape": (30, 41, 3)}, {})["canvas_shape"] == (75, 102)


def test_iou_crop_keeps_boxes_centred_in_the_window_by_hand():
    """100 x 100; box A [10, 10, 30, 30] (centre 20, 20), box B [60, 60, 90, 90] (centre 75, 75)."""
    image = _noise(100, 100)
    boxes = np.array([[10, 10, 30, 30], [60, 60, 90, 90]], dtype=np.float32)
    op = _FixedCrop(p=1.0)
    op.fixed = {"crop_coords": (25, 25, 80, 80), "cropped": True}
    out_image, out_boxes, labels = _one_step(op, image, boxes, np.array([0, 1]))
    # A overlaps the window but its centre is outside: dropped; B clipped to the window.
    np.testing.assert_array_equal(out_image, image[25:80, 25:80])
    assert labels.tolist() == [1]
    np.testing.assert_allclose(out_boxes, [[35, 35, 55, 55]], atol=1e-3)
    op.fixed = {"crop_coords": (0, 0, 50, 50), "cropped": True}
    _, out_boxes, labels = _one_step(op, image, boxes, np.array([0, 1]))
    assert labels.tolist() == [0]
    np.testing.assert_allclose(out_boxes, [[10, 10, 30, 30]], atol=1e-3)


def test_iou_crop_boxes_match_torchvision_crop_and_sanitize():
    rng = np.random.default_rng(3)
    height, width = 60, 80
    sanitize = T.SanitizeBoundingBoxes(min_size=1, labels_getter=lambda sample: sample[1])
    for _ in range(30):
        corners = rng.uniform(0, [width, height], size=(8, 2))
        sides = rng.uniform(0.5, 30, size=(8, 2))
        boxes = np.concatenate([corners, np.minimum(corners + sides, [width, height])], 1).astype(np.float32)
        left, top = int(rng.integers(0, 40)), int(rng.integers(0, 30))
        right = left + int(rng.integers(5, width - left + 1))
        bottom = top + int(rng.integers(5, height - top + 1))
        op = _FixedCrop(p=1.0)
        op.fixed = {"crop_coords": (left, top, right, bottom), "cropped": True}
        _, ours, labels = _one_step(op, _noise(height, width), boxes, np.arange(8))

        tv_boxes = tv_tensors.BoundingBoxes(torch.from_numpy(boxes), format="XYXY",
                                            canvas_size=(height, width))
        cropped = TF.crop(tv_boxes, top, left, bottom - top, right - left)
        centre_x, centre_y = (boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2
        outside = ~((left < centre_x) & (centre_x < right) & (top < centre_y) & (centre_y < bottom))
        cropped[torch.from_numpy(outside)] = 0  # what torchvision's RandomIoUCrop does
        theirs, their_labels = sanitize((cropped, torch.arange(8)))
        assert labels.tolist() == their_labels.tolist()
        np.testing.assert_allclose(ours, theirs.numpy(), atol=1e-3)


def _iou(box: np.ndarray, window: tuple[int, int, int, int]) -> float:
    left, top, right, bottom = window
    overlap_w = max(0.0, min(box[2], right) - max(box[0], left))
    overlap = overlap_w * max(0.0, min(box[3], bottom) - max(box[1], top))
    union = (box[2] - box[0]) * (box[3] - box[1]) + (right - left) * (bottom - top) - overlap
    return overlap / union


def test_iou_crop_windows_follow_the_ssd_rules():
    height, width = 90, 120
    boxes = np.array([[10, 10, 50, 40], [70, 30, 115, 85], [0, 0, 120, 90]], dtype=np.float64)
    normalized = np.concatenate([boxes / [width, height, width, height], np.zeros((3, 1))], 1)  # + label
    op = RandomIoUCrop(sampler_options=(0.5, 1.0), p=1.0)
    op.set_random_seed(0)
    cropped = 0
    for _ in range(300):
        params = op.get_params_dependent_on_data({"shape": (height, width, 3)}, {"bboxes": normalized})
        if not params["cropped"]:
            assert params["crop_coords"] == (0, 0, width, height)
            continue
        cropped += 1
        left, top, right, bottom = window = params["crop_coords"]
        new_w, new_h = right - left, bottom - top
        assert 0 <= left and right <= width and 0 <= top and bottom <= height
        assert int(0.3 * width) <= new_w <= width and int(0.3 * height) <= new_h <= height
        assert 0.5 <= new_w / new_h <= 2.0
        centre_x, centre_y = (boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2
        inside = (left < centre_x) & (centre_x < right) & (top < centre_y) & (centre_y < bottom)
        assert max(_iou(box, window) for box in boxes[inside]) >= 0.5
    assert 100 < cropped < 200  # "leave as is" drawn about half the time (options 0.5, 1.0)
    empty = op.get_params_dependent_on_data({"shape": (height, width, 3)}, {"bboxes": np.zeros((0, 5))})
    assert not empty["cropped"]  # no box can have its centre inside: the image is left as it is


# ----------------------------------------------------------------------------- the whole pipeline
def _rectangles(height: int = 120, width: int = 160) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    image = np.zeros((height, width, 3), dtype=np.uint8)
    image[20:60, 30:90] = RED
    image[70:110, 100:150] = GREEN
    return image, np.array([[30, 20, 90, 60], [100, 70, 150, 110]], dtype=np.float32), np.array([0, 1])


def _extent(rgb: np.ndarray, channel: int) -> list[float] | None:
    others = [c for c in range(3) if c != channel]
    mask = (rgb[..., channel] > 127.5) & (rgb[..., others] < 127.5).all(-1)
    if not mask.any():
        return None
    rows, cols = np.nonzero(mask)
    return [cols.min(), rows.min(), cols.max() + 1, rows.max() + 1]


def test_training_pipeline_keeps_boxes_on_their_pixels():
    """Zoom-out, IoU crop, flip and the square resize (no colour change here), 40 draws."""
    aug = _rtdetr(square_size=96, photometric_prob=0.0, zoom_out_prob=1.0, iou_crop_prob=1.0)
    transform = build_train_transform(aug, seed=0)
    image, boxes, labels = _rectangles()
    zoomed = matched = 0
    for _ in range(40):
        out_image, out_boxes, out_labels = transform(image, boxes, labels)
        assert out_image.shape == (3, 96, 96) and out_image.dtype == torch.float32
        assert 0.0 <= out_image.min() and out_image.max() <= 1.0
        assert ((out_boxes >= 0) & (out_boxes <= 1)).all()
        rgb, absolute = _pixels(out_image), _absolute(out_boxes, 96, 96)
        zoomed += (rgb.sum(-1) == 0).mean() > 0.5  # mostly black: the canvas of a large zoom-out
        for label, channel in ((0, 0), (1, 1)):
            extent = _extent(rgb, channel)
            kept = (out_labels == label).nonzero().flatten().tolist()
            assert len(kept) <= 1
            if not kept:  # cropped away, or its centre outside the crop window (then dropped even if seen)
                continue
            if extent is None or min(extent[2] - extent[0], extent[3] - extent[1]) < 3:
                assert (absolute[kept[0], 2:] - absolute[kept[0], :2]).min() < 4  # a sliver
                continue
            np.testing.assert_allclose(absolute[kept[0]], extent, atol=1.5)
            matched += 1
    assert zoomed > 5 and matched > 40


def test_boxes_under_one_pixel_after_the_resize_are_dropped():
    """The official SanitizeBoundingBoxes(min_size=1) after Resize: 1.5 px wide at 100 px is 0.75 px at 50."""
    aug = _rtdetr(square_size=50, photometric_prob=0.0, zoom_out_prob=0.0, iou_crop_prob=0.0, hflip_prob=0.0)
    boxes = np.array([[10, 10, 11.5, 30], [50, 50, 60, 60]], dtype=np.float32)
    image, out_boxes, labels = build_train_transform(aug, seed=0)(_noise(100, 100), boxes, np.array([3, 4]))
    assert labels.tolist() == [4]
    np.testing.assert_allclose(_absolute(out_boxes, 50, 50), [[25, 25, 30, 30]], atol=1e-4)
    np.testing.assert_allclose(_pixels(image), _pil_resize(_noise(100, 100), 50), atol=1e-3)


def _write_noise_set(root, sizes=((48, 64), (40, 30), (50, 50))) -> CocoDetectionDataset:
    """PNG images of noise (h, w) with one box each; the dataset reads them with sample seeds."""
    folder = root / "images"
    folder.mkdir(parents=True)
    images, annotations = [], []
    for i, (height, width) in enumerate(sizes, start=1):
        Image.fromarray(_noise(height, width, seed=i)).save(folder / f"{i}.png")
        images.append({"id": i, "file_name": f"{i}.png", "width": width, "height": height})
        annotations.append({"id": i, "image_id": i, "category_id": 1, "iscrowd": 0,
                            "bbox": [4, 6, width // 2, height // 2]})
    write_coco_json(root / "set.json", images, annotations, [{"id": 1, "name": "thing"}])
    return folder, root / "set.json"


def test_stop_epoch_turns_the_distortion_zoom_out_and_crop_off_from_that_epoch(tmp_path):
    folder, annotations = _write_noise_set(tmp_path)
    transform = build_train_transform(_rtdetr(square_size=32, stop_epoch=2))
    assert isinstance(transform, StopEpochTransform)
    dataset = CocoDetectionDataset(folder, annotations, transforms=transform, sample_seed=5)
    raw = [dataset.load_sample(i).image for i in range(len(dataset))]
    # Without the stopped ops, a sample is the official resize of the image or of its mirror image.
    plain = [[_pil_resize(image, 32), _pil_resize(np.ascontiguousarray(image[:, ::-1]), 32)] for image in raw]

    def is_plain(epoch: int, index: int) -> bool:
        image, target = dataset[(epoch, index)]
        assert image.shape == (3, 32, 32) and int(target["epoch"]) == epoch
        return any(np.abs(_pixels(image) - reference).max() < 1e-3 for reference in plain[index])

    for epoch in (2, 3, 7):
        assert all(is_plain(epoch, index) for index in range(len(dataset)))
    augmented = [not is_plain(epoch, index) for epoch in (0, 1) for index in range(len(dataset))]
    assert sum(augmented) >= 4  # 6 samples, each left plain with probability < 1 / 32
    # Read by plain index (no epoch): augmenting, as the official dataset's epoch -1; no "epoch" key.
    _, target = dataset[0]
    assert "epoch" not in target and transform.epoch is None and not transform.stopped


def test_detr_policy_transforms_and_targets_are_unchanged(tmp_path):
    folder, annotations = _write_noise_set(tmp_path)
    transform = build_train_transform(AugmentConfig(), seed=0)
    assert isinstance(transform, DetectionTransform) and not hasattr(transform, "set_epoch")
    dataset = CocoDetectionDataset(folder, annotations, transforms=transform, sample_seed=5)
    _, target = dataset[(3, 0)]
    assert set(target) == {"boxes", "labels", "image_id", "orig_size", "size"}


# -------------------------------------------------------------------------------------- evaluation
def test_eval_resize_to_a_square_and_back_to_the_original_pixels(tmp_path):
    """A box of each original (non-square) image -> eval transform -> normalized cxcywh -> the real
    `detect` + `PostProcess` with `orig_size` -> the same pixels (x scales by w, y by h)."""
    folder, annotations = _write_noise_set(tmp_path)
    aug = _rtdetr(square_size=40)
    dataset = CocoDetectionDataset(folder, annotations, transforms=build_eval_transform(aug))
    expected = {1: [4, 6, 4 + 32, 6 + 24], 2: [4, 6, 4 + 15, 6 + 20], 3: [4, 6, 4 + 25, 6 + 25]}  # xyxy
    postprocess = PostProcess("softmax")
    for index in range(len(dataset)):
        image, target = dataset[index]
        height, width = target["orig_size"].tolist()
        assert image.shape == (3, 40, 40) and target["size"].tolist() == [40, 40]
        assert eval_resized_size(height, width, aug) == (40, 40)
        original = dataset.load_sample(index).image
        np.testing.assert_allclose(_pixels(image), _pil_resize(original, 40), atol=1e-3)
        logits = torch.tensor([[[5.0, 0.0]]])  # one query, class 0
        outputs = {"pred_logits": logits, "pred_boxes": target["boxes"][None]}  # the normalized box

        def model(images, padding_mask, outputs=outputs):
            assert images.shape == (1, 3, 40, 40) and not padding_mask.any()
            return outputs

        detection = detect(model, postprocess, image[None], torch.zeros(1, 40, 40, dtype=torch.bool),
                           target["orig_size"][None], torch.device("cpu"))[0]
        box = expected[int(target["image_id"])]
        np.testing.assert_allclose(detection["boxes"][0].numpy(), box, atol=1e-3)


class _FixedDetector(torch.nn.Module):
    """One detection at normalized cxcywh (0.5, 0.5, 0.5, 0.5); records the input shapes."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple] = []

    def forward(self, images, padding_mask):
        self.seen.append((tuple(images.shape), bool(padding_mask.any())))
        batch = images.shape[0]
        return {"pred_logits": torch.tensor([[[5.0, 0.0]]]).repeat(batch, 1, 1),
                "pred_boxes": torch.full((batch, 1, 4), 0.5)}


def test_predictor_uses_the_square_eval_resize_of_an_rtdetr_config():
    cfg = Config()
    cfg.data.augment = _rtdetr(square_size=48)
    model = _FixedDetector()
    predictor = Predictor(model, cfg, [1], ["thing"], torch.device("cpu"), optimize=False)
    wide, tall = _noise(30, 80), _noise(70, 20, seed=1)
    np.testing.assert_allclose(_pixels(predictor.preprocess(wide)), _pil_resize(wide, 48), atol=1e-3)
    results = predictor.predict([wide, tall])
    assert model.seen == [((2, 3, 48, 48), False)]  # one batch, no padding
    # cxcywh (0.5, 0.5, 0.5, 0.5) of each original image: x by its width, y by its height.
    np.testing.assert_allclose(results[0]["boxes"][0].numpy(), [20, 7.5, 60, 22.5], atol=1e-3)
    np.testing.assert_allclose(results[1]["boxes"][0].numpy(), [5, 17.5, 15, 52.5], atol=1e-3)
    groups = same_size_groups([("a", wide), ("b", tall)], cfg.data.augment)
    assert [[path for path, _ in group] for group in groups] == [["a", "b"]]  # one size: one batch
    detr = same_size_groups([("a", wide), ("b", tall)], AugmentConfig())
    assert len(detr) == 2  # the shorter-side resize gives them different sizes
