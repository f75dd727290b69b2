"""DEIM's mosaic (`data.augment.mosaic`): the canvas by hand, the affine and the box rule against
torchvision (what the official code runs), boxes inside the image with their labels, the epoch policy,
the unchanged pipeline where no mosaic is drawn, and the same mosaic for the same (seed, epoch, index)."""

from __future__ import annotations

import dataclasses

import albumentations as A
import numpy as np
import pytest
import torch
import torchvision.transforms.v2 as T
import torchvision.transforms.v2.functional as TF
from coco_test_files import write_coco_json
from PIL import Image
from torchvision import tv_tensors
from yolo_test_files import write_yolo_set

from detr_lab.boxes import cxcywh_to_xyxy
from detr_lab.config import AugmentConfig, MosaicConfig
from detr_lab.data.coco import CocoDetectionDataset
from detr_lab.data.mosaic import MosaicTransform, mosaic_affine, mosaic_canvas, resized_tile_size
from detr_lab.data.transforms import DetectionTransform, StopEpochTransform, build_train_transform
from detr_lab.data.yolo import YoloDetectionDataset

NO_NORMALIZATION = {"mean": [0.0, 0.0, 0.0], "std": [1.0, 1.0, 1.0]}
# One colour per label: a box's pixels can be found again after the mosaic and the affine.
COLOURS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (255, 0, 255), (0, 255, 255)]
STILL = {"degrees": 0.0, "translate": [0.0, 0.0], "scale": [1.0, 1.0]}  # the identity affine


def _noise(height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def _absolute(boxes: torch.Tensor, height: int, width: int) -> np.ndarray:
    return (cxcywh_to_xyxy(boxes) * torch.tensor([width, height, width, height])).numpy()


def _painted(height: int, width: int, boxes, labels) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A dark grey image with each box filled in its label's colour."""
    image = np.full((height, width, 3), 40, dtype=np.uint8)
    for (x0, y0, x1, y1), label in zip(boxes, labels, strict=True):
        image[y0:y1, x0:x1] = COLOURS[label]
    return image, np.array(boxes, dtype=np.float32).reshape(-1, 4), np.array(labels, dtype=np.int64)


# Four samples of different sizes and shapes; 6 boxes, labels 0..5 once each.
SAMPLES = [
    _painted(40, 60, [[6, 4, 30, 20]], [0]),
    _painted(20, 20, [[0, 0, 8, 20], [12, 5, 18, 11]], [1, 2]),
    _painted(30, 15, [[3, 3, 12, 9]], [3]),
    _painted(10, 40, [[20, 2, 36, 8], [2, 2, 10, 8]], [4, 5]),
]


def _extent(rgb: np.ndarray, colour) -> np.ndarray | None:
    mask = (np.abs(rgb.astype(int) - np.array(colour)) < 60).all(-1)
    if not mask.any():
        return None
    rows, cols = np.nonzero(mask)
    return np.array([cols.min(), rows.min(), cols.max() + 1, rows.max() + 1])


def _iou(a, b) -> float:
    overlap = max(0.0, min(a[2], b[2]) - max(a[0], b[0])) * max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - overlap
    return overlap / union


class _Source:
    """A sample source over fixed raw samples that records the indices it is asked for."""

    def __init__(self, samples) -> None:
        self.samples, self.asked = samples, []

    def __call__(self, index: int):
        self.asked.append(index)
        return self.samples[index]


# -------------------------------------------------------------------------------------- the canvas
def test_tile_size_is_torchvisions_resize_of_the_shorter_side():
    for height, width in ((40, 60), (60, 40), (20, 20), (30, 15), (10, 40), (7, 333)):
        expected = TF.resize(Image.fromarray(_noise(height, width)), 20).size[::-1]  # PIL: (w, h)
        assert resized_tile_size(height, width, 20) == expected


def test_canvas_layout_by_hand():
    canvas, boxes, labels = mosaic_canvas(SAMPLES, output_size=20, fill=7)
    # Resized: (20, 30), (20, 20), (40, 20), (20, 80) -> quadrant 40 x 80, canvas 80 x 160.
    assert canvas.shape == (80, 160, 3) and canvas.dtype == np.uint8
    expected = [
        [3, 2, 15, 10],  # sample 0 at (0, 0), x 0.5
        [80, 0, 88, 20], [92, 5, 98, 11],  # sample 1 at (80, 0), unchanged size
        [4, 44, 16, 52],  # sample 2 at (0, 40), x 4 / 3
        [80 + 40, 40 + 4, 80 + 72, 40 + 16], [80 + 4, 40 + 4, 80 + 20, 40 + 16],  # sample 3 at (80, 40), x 2
    ]
    np.testing.assert_allclose(boxes, expected, atol=1e-4)
    assert labels.tolist() == [0, 1, 2, 3, 4, 5]
    tiles = [((0, 0), (20, 30)), ((0, 80), (20, 20)), ((40, 0), (40, 20)), ((40, 80), (20, 80))]
    covered = np.zeros(canvas.shape[:2], dtype=bool)
    for (image, _, _), ((top, left), (height, width)) in zip(SAMPLES, tiles, strict=True):
        resized = np.asarray(TF.resize(Image.fromarray(image), 20))  # the official resize of a PIL image
        np.testing.assert_array_equal(canvas[top : top + height, left : left + width], resized)
        covered[top : top + height, left : left + width] = True
    assert (canvas[~covered] == 7).all()


def _official_mosaic(samples, size: int, angle: float, translate: tuple[int, int], scale: float):
    """DEIM's `Mosaic` (use_cache False) with fixed affine parameters, on torchvision: resize the PIL
    images and their boxes, paste at the quadrant corners of a black canvas, shift the boxes, affine,
    then `SanitizeBoundingBoxes(min_size=1)` as the pipeline runs next."""
    images, shifted, labels = [], [], []
    for image, boxes, sample_labels in samples:
        tv_boxes = tv_tensors.BoundingBoxes(torch.from_numpy(boxes), format="XYXY",
                                            canvas_size=image.shape[:2])
        pil, tv_boxes = T.Resize(size)(Image.fromarray(image), tv_boxes)
        images.append(pil)
        shifted.append(tv_boxes.as_subclass(torch.Tensor))
        labels.append(torch.from_numpy(sample_labels))
    cell_w, cell_h = max(im.size[0] for im in images), max(im.size[1] for im in images)
    canvas = Image.new("RGB", (2 * cell_w, 2 * cell_h), color=0)
    for k, im in enumerate(images):
        offset = ((k % 2) * cell_w, (k // 2) * cell_h)
        canvas.paste(im, offset)
        shifted[k] = shifted[k] + torch.tensor(offset * 2, dtype=torch.float32)
    boxes = tv_tensors.BoundingBoxes(torch.cat(shifted), format="XYXY", canvas_size=(2 * cell_h, 2 * cell_w))
    params = {"angle": angle, "translate": list(translate), "scale": scale, "shear": [0.0, 0.0]}
    canvas, boxes = TF.affine(canvas, **params), TF.affine(boxes, **params)
    sanitize = T.SanitizeBoundingBoxes(min_size=1, labels_getter=lambda sample: sample[1])
    boxes, kept = sanitize((boxes, torch.cat(labels)))
    return np.asarray(canvas), boxes.numpy(), kept.numpy()


def _fixed_affine(angle: float, translate: tuple[int, int], scale: float) -> A.Affine:
    """`mosaic_affine` (its interpolation, fill, box rule) with the draws pinned."""
    args = mosaic_affine(10, [0.1, 0.1], [0.5, 1.5]).get_transform_init_args()
    args.update(rotate=(angle, angle), scale=(scale, scale), translate_percent=None,
                translate_px={"x": (translate[0],) * 2, "y": (translate[1],) * 2})
    return A.Affine(**args)


def test_affine_configuration_is_the_official_random_affine():
    args = mosaic_affine(10, [0.1, 0.2], [0.5, 1.5], fill=3).get_transform_init_args()
    assert args["rotate"] == (-10.0, 10.0) and args["scale"] == {"x": (0.5, 1.5), "y": (0.5, 1.5)}
    assert args["translate_percent"] == {"x": (-0.1, 0.1), "y": (-0.2, 0.2)}
    assert args["keep_ratio"] and not args["balanced_scale"] and not args["fit_output"]
    assert args["shear"] == {"x": (0.0, 0.0), "y": (0.0, 0.0)} and args["fill"] == 3.0
    assert args["rotate_method"] == "largest_box" and args["interpolation"] == 0  # nearest, as torchvision


@pytest.mark.parametrize(
    ("angle", "translate", "scale", "dropped"),
    [(7.3, (4, -3), 1.2, 8), (-9.0, (-30, 12), 0.6, 0), (3.0, (50, 25), 1.45, 7), (0.0, (0, 0), 1.0, 0)],
)
def test_mosaic_boxes_and_pixels_match_the_official_op(angle, translate, scale, dropped):
    """Same parameters (A.Affine's angle is torchvision's with the sign flipped): the same boxes, kept
    and dropped alike (clipped to the canvas, < 1 px dropped), labels with them, pixels but for ties."""
    rng = np.random.default_rng(1)
    samples = []
    for k, (height, width) in enumerate(((48, 64), (40, 40), (70, 30), (24, 90))):
        corners = rng.uniform(0, [width - 2, height - 2], size=(5, 2))
        ends = np.minimum(corners + rng.uniform(1, 30, size=(5, 2)), [width, height])
        samples.append((_noise(height, width, seed=k), np.concatenate([corners, ends], 1).astype(np.float32),
                        np.arange(5 * k, 5 * k + 5)))
    ref_image, ref_boxes, ref_labels = _official_mosaic(samples, 32, -angle, translate, scale)
    canvas, boxes, labels = mosaic_canvas(samples, output_size=32)
    step = DetectionTransform([_fixed_affine(angle, translate, scale)], **NO_NORMALIZATION, min_box_side=1.0)
    image, out_boxes, out_labels = step(canvas, boxes, labels)
    height, width = canvas.shape[:2]
    assert image.shape == (3, height, width)
    assert out_labels.tolist() == ref_labels.tolist()
    assert len(ref_labels) == 20 - dropped  # boxes pushed off the canvas: the rule is exercised
    np.testing.assert_allclose(_absolute(out_boxes, height, width), ref_boxes, atol=2e-3)
    pixels = np.rint(image.numpy().transpose(1, 2, 0) * 255).astype(np.uint8)
    assert (pixels != ref_image).any(-1).mean() < 0.01  # nearest-neighbour ties only


# ------------------------------------------------------------------------------- boxes and labels
def _mosaic_transform(aug: AugmentConfig, samples=SAMPLES, seed: int = 0) -> tuple[MosaicTransform, _Source]:
    transform = build_train_transform(aug, seed=seed)
    assert isinstance(transform, MosaicTransform)
    source = _Source(samples)
    transform.set_sample_source(source, len(samples))
    transform.set_epoch(0)
    return transform, source


def test_every_box_and_label_of_the_four_images_is_kept_on_known_inputs():
    """Identity affine, no flip or colour: the output holds exactly the six labels, at the canvas boxes."""
    aug = AugmentConfig(policy="rtdetr", square_size=64, photometric_prob=0.0, hflip_prob=0.0,
                        mosaic=MosaicConfig(prob=1.0, output_size=20, **STILL), **NO_NORMALIZATION)
    transform, source = _mosaic_transform(aug)
    for seed in range(10):
        transform.set_random_seed(seed)
        image, boxes, labels = transform(*SAMPLES[0])
        assert len(source.asked) == 3 * (seed + 1)  # three partners per mosaic
        assert image.shape == (3, 64, 64) and ((boxes >= 0) & (boxes <= 1)).all()
        partners = [SAMPLES[index] for index in source.asked[-3:]]
        canvas, expected_boxes, expected_labels = mosaic_canvas([SAMPLES[0], *partners], 20)
        assert labels.tolist() == expected_labels.tolist()  # all of them, in the canvas order
        np.testing.assert_allclose(_absolute(boxes, *canvas.shape[:2]), expected_boxes, atol=1e-3)
    assert len(set(source.asked)) > 1


def test_random_mosaics_keep_boxes_inside_and_on_their_pixels():
    """The official ranges (10 degrees, 10 % shift, scale 0.5-1.5): every box inside the image, no label
    invented, each kept box on the pixels of its label's colour."""
    aug = AugmentConfig(policy="rtdetr", square_size=160, photometric_prob=0.0, hflip_prob=0.5,
                        mosaic=MosaicConfig(prob=1.0, output_size=40), **NO_NORMALIZATION)
    transform, source = _mosaic_transform(aug)
    dropped = matched = 0
    for seed in range(30):
        transform.set_random_seed(seed)
        image, boxes, labels = transform(*SAMPLES[0])
        assert ((boxes >= 0) & (boxes <= 1)).all() and (boxes[:, 2:] > 0).all()
        partners = [SAMPLES[index] for index in source.asked[-3:]]
        available = np.concatenate([SAMPLES[0][2], *(labels for _, _, labels in partners)])
        for label in set(labels.tolist()):
            assert labels.tolist().count(label) <= available.tolist().count(label)
        dropped += len(available) - len(labels)
        rgb = np.rint(image.numpy().transpose(1, 2, 0) * 255)
        for box, label in zip(_absolute(boxes, 160, 160), labels.tolist(), strict=True):
            if available.tolist().count(label) > 1 or min(box[2] - box[0], box[3] - box[1]) < 8:
                continue  # two boxes of one colour, or a sliver the square resize blurs away
            extent = _extent(rgb, COLOURS[label])
            assert extent is not None, (seed, label)
            # The box encloses the rotated rectangle: its colour lies inside (up to the resize's blur)
            # and fills most of it (the thin corners of a rotated rectangle blur away).
            assert (extent[:2] >= box[:2] - 2).all() and (extent[2:] <= box[2:] + 2).all(), (box, extent)
            assert _iou(box, extent) > 0.7, (box, extent)
            matched += 1
    assert matched > 30 and dropped > 0  # some boxes leave the canvas and are dropped with their labels


def test_detr_policy_mosaic_keeps_every_label_and_draws_a_detr_size():
    aug = AugmentConfig(train_scales=[64, 80], max_size=200, crop_prob=0.0, hflip_prob=0.0,
                        mosaic=MosaicConfig(prob=1.0, output_size=20, **STILL), **NO_NORMALIZATION)
    transform, source = _mosaic_transform(aug)
    for seed in range(5):
        transform.set_random_seed(seed)
        image, boxes, labels = transform(*SAMPLES[0])
        expected = np.concatenate([SAMPLES[0][2], *(SAMPLES[i][2] for i in source.asked[-3:])])
        assert sorted(labels.tolist()) == sorted(expected.tolist())
        assert min(image.shape[1:]) in (64, 80) and ((boxes >= 0) & (boxes <= 1)).all()


# ---------------------------------------------------------------------------------- epoch policy
def _write_set(root, count: int = 6) -> tuple:
    """`count` noise images of different sizes, one box each (label 0)."""
    folder = root / "images"
    folder.mkdir(parents=True)
    images, annotations = [], []
    for i in range(1, count + 1):
        height, width = 30 + 4 * i, 50 - 3 * i
        Image.fromarray(_noise(height, width, seed=i)).save(folder / f"{i}.png")
        images.append({"id": i, "file_name": f"{i}.png", "width": width, "height": height})
        bbox = [4, 5, width // 2, height // 2]
        annotations.append({"id": i, "image_id": i, "category_id": 1, "bbox": bbox})
    return folder, write_coco_json(root / "set.json", images, annotations, [{"id": 1, "name": "thing"}])


def _rtdetr(**changes) -> AugmentConfig:
    return AugmentConfig(policy="rtdetr", square_size=32, **{**NO_NORMALIZATION, **changes})


def _dataset(files, aug: AugmentConfig, sample_seed: int = 5) -> CocoDetectionDataset:
    return CocoDetectionDataset(*files, transforms=build_train_transform(aug), sample_seed=sample_seed)


def _same(first, second) -> bool:
    (image, target), (other_image, other_target) = first, second
    return (torch.equal(image, other_image) and torch.equal(target["boxes"], other_target["boxes"])
            and torch.equal(target["labels"], other_target["labels"]))


def test_epoch_policy_switches_mosaic_on_and_off_and_the_final_epochs_are_plain(tmp_path):
    """DEIM's stages with start 1, mosaic [2, 4), stop 6: plain, augmenting, mosaic, augmenting, plain."""
    files = _write_set(tmp_path)
    mosaic = MosaicConfig(prob=1.0, start_epoch=2, stop_epoch=4, output_size=24, **STILL)
    dataset = _dataset(files, _rtdetr(start_epoch=1, stop_epoch=6, mosaic=mosaic))
    # The same ops without mosaic, and the plain pipeline (no distortion, zoom-out, crop) alone.
    without = _dataset(files, _rtdetr(start_epoch=1, stop_epoch=6))
    plain = _dataset(files, _rtdetr(stop_epoch=0))  # every epoch is "stopped"
    augmented = []
    for epoch in range(9):
        for index in range(len(dataset)):
            sample = dataset[(epoch, index)]
            if 2 <= epoch < 4:  # a mosaic: the sample's box and three more (nothing leaves a still affine)
                assert len(sample[1]["labels"]) == 4, (epoch, index)
                continue
            assert len(sample[1]["labels"]) == 1
            assert _same(sample, without[(epoch, index)])
            if epoch < 1 or epoch >= 6:  # DEIM's first stage and the final epochs: the plain pipeline
                assert _same(sample, plain[(epoch, index)]), (epoch, index)
            else:
                augmented.append(not _same(sample, plain[(epoch, index)]))
    assert sum(augmented) >= len(augmented) - 2  # 18 samples, each left plain with probability < 1 / 100


def test_mosaic_probability_and_a_window_bounded_by_the_policy_epochs(tmp_path):
    """A mosaic window with no bounds of its own stays inside [start_epoch, stop_epoch) of the policy."""
    files = _write_set(tmp_path)
    mosaic = MosaicConfig(prob=0.5, start_epoch=0, stop_epoch=None, output_size=24, **STILL)
    dataset = _dataset(files, _rtdetr(start_epoch=1, stop_epoch=5, mosaic=mosaic))
    without = _dataset(files, _rtdetr(start_epoch=1, stop_epoch=5))
    drawn = []
    for epoch in range(8):
        for index in range(len(dataset)):
            sample = dataset[(epoch, index)]
            is_mosaic = len(sample[1]["labels"]) == 4
            if epoch < 1 or epoch >= 5:  # DEIM's first stage and the final no-augmentation epochs: never
                assert not is_mosaic, (epoch, index)
            else:
                drawn.append(is_mosaic)
            if not is_mosaic:  # a sample that draws no mosaic is exactly the pipeline without mosaic
                assert _same(sample, without[(epoch, index)])
    assert 0.3 < np.mean(drawn) < 0.7  # 24 draws at p = 0.5
    assert dataset[0][1]["labels"].tolist() == [0]  # read by plain index (no epoch): no mosaic


def test_options_off_leave_the_pipeline_and_its_output_unchanged(tmp_path):
    """prob 0 builds the previous objects; a configured window outside the epochs read gives, sample for
    sample, the output of the previous pipeline (same seed): the mosaic draws do not touch its draws."""
    assert isinstance(build_train_transform(_rtdetr(stop_epoch=3)), StopEpochTransform)
    assert isinstance(build_train_transform(AugmentConfig()), DetectionTransform)
    files = _write_set(tmp_path)
    for policy in ("rtdetr", "detr"):
        base = _rtdetr(stop_epoch=4) if policy == "rtdetr" else AugmentConfig(
            train_scales=[32, 40], max_size=64, crop_resize_scales=[36], crop_min_size=20, crop_max_size=30,
            **NO_NORMALIZATION)
        later = MosaicConfig(prob=1.0, start_epoch=3, stop_epoch=4)
        previous = _dataset(files, base)
        with_mosaic = _dataset(files, dataclasses.replace(base, mosaic=later))
        assert isinstance(with_mosaic.transforms, MosaicTransform)
        for epoch in (0, 1, 2, 4, 5):
            for index in range(len(previous)):
                assert _same(with_mosaic[(epoch, index)], previous[(epoch, index)]), (policy, epoch, index)
        assert not _same(with_mosaic[(3, 0)], previous[(3, 0)])


# ------------------------------------------------------------------------------ resume exactness
def test_same_seed_epoch_and_index_give_the_same_mosaic_in_any_order_or_process(tmp_path):
    files = _write_set(tmp_path)
    aug = _rtdetr(mosaic=MosaicConfig(prob=1.0, output_size=24))
    first, second = _dataset(files, aug), _dataset(files, aug)
    keys = [(epoch, index) for epoch in range(3) for index in range(len(first))]
    expected = {key: first[key] for key in keys}
    for key in reversed(keys):  # another order, another instance (a worker, a resumed run)
        assert _same(second[key], expected[key]), key
    assert not _same(first[(0, 0)], first[(1, 0)])  # another epoch, another mosaic
    assert not _same(_dataset(files, aug, sample_seed=6)[(0, 0)], expected[(0, 0)])  # another seed


def test_yolo_format_sets_give_their_images_to_the_mosaic(tmp_path):
    """YOLO set: a.png has labels 0 and 1 (and b.png none), so a mosaic holds pairs of them."""
    aug = _rtdetr(mosaic=MosaicConfig(prob=1.0, output_size=16, **STILL))
    dataset = YoloDetectionDataset(write_yolo_set(tmp_path), "train", transforms=build_train_transform(aug),
                                   sample_seed=0)
    counts = []
    for epoch in range(6):
        labels = dataset[(epoch, 1)][1]["labels"].tolist()  # b.png plus three partners
        assert labels.count(0) == labels.count(1)
        counts.append(len(labels))
    assert max(counts) >= 2  # a.png was drawn as a partner


def test_a_corrupt_partner_is_skipped_when_corrupt_images_are_skipped(tmp_path):
    folder, annotations = _write_set(tmp_path, count=3)
    (folder / "2.png").write_bytes(b"not an image")
    aug = _rtdetr(mosaic=MosaicConfig(prob=1.0, output_size=24))
    dataset = CocoDetectionDataset(folder, annotations, transforms=build_train_transform(aug),
                                   skip_corrupt_images=True, sample_seed=0)
    assert dataset.raw_sample(1)[0].shape == (42, 41, 3)  # the next image (3.png) instead
    for index in (0, 2):
        dataset[(0, index)]
    strict = CocoDetectionDataset(folder, annotations, transforms=build_train_transform(aug), sample_seed=0)
    with pytest.raises(Exception, match="2.png"):
        strict.raw_sample(1)
