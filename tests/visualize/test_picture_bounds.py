"""Every picture has a bounded size, whatever the image's shape."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from detr_lab.visualize.draw import (
    MAX_PICTURE_SIDE,
    TITLE_HEIGHT,
    draw_detections,
    draw_ground_truth_and_predictions,
    draw_heatmap,
)


def _pair(height: int, width: int) -> Image.Image:
    image = np.full((height, width, 3), 90, dtype=np.uint8)
    box = np.array([[width / 2, 0.0, width, height]])  # the right half
    return draw_ground_truth_and_predictions(image, box, [0], box, [0], [0.9], ["thing"], score_threshold=0.5)


@pytest.mark.parametrize(("height", "width"), [(20, 20000), (20000, 20), (3, 9000)])
def test_the_summary_example_of_an_extreme_image_is_bounded(tmp_path, height, width):
    picture = _pair(height, width)
    assert picture.width <= MAX_PICTURE_SIDE + 8
    assert picture.height <= MAX_PICTURE_SIDE // 2 + TITLE_HEIGHT
    path = tmp_path / "example.png"
    picture.save(path)
    assert path.stat().st_size < 5_000_000
    with Image.open(path) as reopened:
        assert reopened.size == picture.size


def test_an_ordinary_image_is_still_upscaled_for_legibility():
    picture = _pair(48, 64)  # shorter side 48 -> 320 by default
    assert picture.size == (2 * round(64 * 320 / 48) + 8, 320 + TITLE_HEIGHT)


def test_boxes_follow_the_shrunk_picture():
    image = np.full((10, 10000, 3), 255, dtype=np.uint8)
    picture = draw_detections(image, [[5000.0, 0.0, 10000.0, 10.0]], [0], ["x"], max_side=1000)
    assert picture.size == (1000, 1)
    row = np.asarray(picture)[0]
    assert (row[:490] == 255).all()  # left of the box: the white image
    assert (row[500:] != 255).any(axis=1).any()  # the box outline lies in the right half


def test_annotated_copies_keep_their_input_size_and_upscaling_is_capped():
    image = np.zeros((30, 5000, 3), dtype=np.uint8)
    assert draw_detections(image, [], [], ["x"]).size == (5000, 30)
    assert draw_detections(image, [], [], ["x"], min_side=400).size == (5000, 30)  # never shrunk by it
    wide = np.zeros((30, 2000, 3), dtype=np.uint8)  # min_side 400 alone would make it 26667 px wide
    assert draw_detections(wide, [], [], ["x"], min_side=400).size == (MAX_PICTURE_SIDE, round(30 * 2.048))


def test_matplotlib_pictures_are_bounded(tmp_path):
    image = np.zeros((5, 12000, 3), dtype=np.uint8)
    path = draw_heatmap(image, np.random.default_rng(0).random((5, 12000)), tmp_path / "heat.png", box=None,
                        title="attention")
    with Image.open(path) as picture:
        assert picture.width <= MAX_PICTURE_SIDE
