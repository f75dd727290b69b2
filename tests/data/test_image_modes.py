"""Image decoding: every pixel format becomes 8-bit RGB, upright; bad files raise naming the file."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from detr_lab.data.errors import CorruptImageError, MissingImageError
from detr_lab.data.images import load_rgb_image


def _check_rgb(array: np.ndarray, height: int, width: int) -> None:
    assert array.dtype == np.uint8
    assert array.shape == (height, width, 3)


def test_grayscale_becomes_gray_rgb(tmp_path):
    path = tmp_path / "gray.png"
    Image.new("L", (7, 5), 100).save(path)
    array = load_rgb_image(path)
    _check_rgb(array, 5, 7)
    assert (array == 100).all()


def test_rgba_drops_alpha(tmp_path):
    path = tmp_path / "rgba.png"
    Image.new("RGBA", (6, 4), (10, 20, 30, 0)).save(path)
    array = load_rgb_image(path)
    _check_rgb(array, 4, 6)
    assert array[0, 0].tolist() == [10, 20, 30]


def test_palette_with_transparency(tmp_path):
    path = tmp_path / "palette.png"
    image = Image.new("P", (5, 3), 1)
    image.putpalette([0, 0, 0, 200, 50, 10] + [0] * (256 * 3 - 6))
    image.info["transparency"] = 0
    image.save(path, transparency=0)
    assert Image.open(path).mode == "P"
    array = load_rgb_image(path)
    _check_rgb(array, 3, 5)
    assert array[1, 2].tolist() == [200, 50, 10]


def test_sixteen_bit_png_is_scaled_to_eight_bits(tmp_path):
    path = tmp_path / "depth16.png"
    values = np.array([[0, 257 * 100, 65535]], dtype=np.uint16)
    Image.fromarray(values).save(path)
    assert Image.open(path).mode.startswith("I;16")
    array = load_rgb_image(path)
    _check_rgb(array, 1, 3)
    assert array[0, :, 0].tolist() == [0, 100, 255]
    assert (array[..., 0] == array[..., 2]).all()


def test_thirty_two_bit_integer_image(tmp_path):
    wide, narrow = tmp_path / "wide.tif", tmp_path / "narrow.tif"
    Image.fromarray(np.array([[0, 257 * 50, 65535]], dtype=np.int32)).save(wide)
    Image.fromarray(np.array([[0, 50, 255]], dtype=np.int32)).save(narrow)
    assert Image.open(wide).mode == "I"
    assert load_rgb_image(wide)[0, :, 1].tolist() == [0, 50, 255]  # 16-bit range, scaled
    assert load_rgb_image(narrow)[0, :, 1].tolist() == [0, 50, 255]  # 8-bit range, kept


def test_exif_orientation_is_applied(tmp_path):
    # Stored 40 wide x 20 high: left half red, right half blue. Orientation 6 displays it rotated
    # 90 degrees clockwise: 20 wide x 40 high, the stored left half (red) on top.
    stored = np.zeros((20, 40, 3), dtype=np.uint8)
    stored[:, :20] = (255, 0, 0)
    stored[:, 20:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "rotated.jpg"
    Image.fromarray(stored).save(path, exif=exif.tobytes(), quality=95)
    array = load_rgb_image(path)
    _check_rgb(array, 40, 20)
    top, bottom = array[:16].reshape(-1, 3).mean(0), array[24:].reshape(-1, 3).mean(0)
    assert top[0] > 200 and top[2] < 60
    assert bottom[2] > 200 and bottom[0] < 60


def test_missing_file_names_path_and_image_id(tmp_path):
    path = tmp_path / "nowhere.jpg"
    with pytest.raises(MissingImageError, match=r"nowhere\.jpg.*image id 7"):
        load_rgb_image(path, image_id=7)


def test_not_an_image_is_corrupt(tmp_path):
    path = tmp_path / "garbage.jpg"
    path.write_bytes(b"this is not a jpeg at all" * 10)
    with pytest.raises(CorruptImageError, match=r"garbage\.jpg.*image id 3"):
        load_rgb_image(path, image_id=3)


def test_truncated_jpeg_is_corrupt(tmp_path):
    whole, cut = tmp_path / "whole.jpg", tmp_path / "cut.jpg"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(whole, quality=95)
    data = whole.read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(CorruptImageError, match=r"cut\.jpg"):
        load_rgb_image(cut)
