"""Image decoding: any file PIL reads -> 8-bit RGB in its displayed orientation.

The EXIF orientation tag is applied (`ImageOps.exif_transpose`), so the returned array and its size
are those of the image as a viewer displays it; annotation coordinates are taken to refer to that
displayed image. Pixel formats are converted as follows:

- grayscale, palette (with or without transparency), CMYK, YCbCr, LAB, HSV -> RGB;
- an alpha channel is dropped (the colour channels are kept as stored, not blended);
- 16-bit modes (`I;16`, `I;16B`, ...) are scaled to 8 bits (value / 257);
- 32-bit integer `I` and float `F` images are scaled from 16 bits when any value exceeds 255
  (PNG 16-bit grayscale may decode as `I`), else (for `F`: when all values are <= 1, from [0, 1])
  taken as 8-bit values;
- multi-frame files (GIF, TIFF) give their first frame.

`upright_size` reads the displayed size from the header alone; `to_rgb_array` takes a path, a PIL
image or an array; `IMAGE_SUFFIXES` are the file names taken for images in a folder.
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from detr_lab.data.errors import CorruptImageError, MissingImageError

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif")
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")


def _wide_to_uint8(values: np.ndarray, mode: str) -> np.ndarray:
    """2-D array of a 16-bit, 32-bit integer or float image -> uint8 [H, W]."""
    values = values.astype(np.float64)
    if mode in _SIXTEEN_BIT_MODES:
        scaled = values / 257.0
    elif values.size and values.max() > 255:
        scaled = np.clip(values, 0, 65535) / 257.0
    elif mode == "F" and values.size and values.max() <= 1.0:
        scaled = values * 255.0
    else:
        scaled = values
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def pil_to_rgb_array(image: Image.Image) -> np.ndarray:
    """Any PIL image -> contiguous uint8 array [H, W, 3] (RGB), following the module's conversion rules."""
    mode = image.mode
    if mode in _SIXTEEN_BIT_MODES or mode in ("I", "F"):
        gray = _wide_to_uint8(np.asarray(image), mode)
        return np.ascontiguousarray(np.repeat(gray[:, :, None], 3, axis=2))
    if mode == "RGB":
        return np.ascontiguousarray(np.asarray(image, dtype=np.uint8))
    if mode in ("P", "PA"):
        # Going through RGBA keeps palette transparency from producing a PIL warning.
        image = image.convert("RGBA")
    return np.ascontiguousarray(np.asarray(image.convert("RGB"), dtype=np.uint8))


def load_rgb_image(path: str | os.PathLike, image_id: int | None = None) -> np.ndarray:
    """Read an image file as uint8 `[H, W, 3]` RGB, EXIF orientation applied.

    Raises:
        MissingImageError: the file does not exist.
        CorruptImageError: the file cannot be decoded (truncated, not an image, too large...).
    """
    path = Path(path)
    where = f"{path}" + (f" (image id {image_id})" if image_id is not None else "")
    if not path.is_file():
        raise MissingImageError(f"image file not found: {where}")
    try:
        with Image.open(path) as image:
            image.load()  # decode now, so a truncated file fails here
            try:
                upright = ImageOps.exif_transpose(image)
            except Exception as err:  # malformed EXIF: keep the stored orientation
                warnings.warn(f"{where}: unreadable EXIF orientation ({err}); using the stored orientation",
                              stacklevel=2)
                upright = image
            return pil_to_rgb_array(upright)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise CorruptImageError(f"cannot decode image {where}: {type(err).__name__}: {err}") from err


_SWAPPING_ORIENTATIONS = (5, 6, 7, 8)  # EXIF orientations that rotate by 90 or 270 degrees
_EXIF_ORIENTATION = 0x0112


def upright_size(path: str | os.PathLike) -> tuple[int, int]:
    """(width, height) of the image as `load_rgb_image` returns it (EXIF orientation applied), from the
    file header only (no decoding). PIL's order, and that of COCO image records.

    Raises:
        MissingImageError: the file does not exist.
        CorruptImageError: the header cannot be read (not an image PIL can identify, too large...).
    """
    path = Path(path)
    if not path.is_file():
        raise MissingImageError(f"image file not found: {path}")
    try:
        with Image.open(path) as image:
            width, height = image.size
            try:
                orientation = image.getexif().get(_EXIF_ORIENTATION, 1)
            except Exception:  # malformed EXIF: load_rgb_image keeps the stored orientation too
                orientation = 1
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise CorruptImageError(f"cannot read image {path}: {type(err).__name__}: {err}") from err
    return (height, width) if orientation in _SWAPPING_ORIENTATIONS else (width, height)


ImageInput = str | os.PathLike | Image.Image | np.ndarray


def to_rgb_array(image: ImageInput) -> np.ndarray:
    """An image file path, a PIL image or an array -> uint8 `[H, W, 3]` RGB.

    Files are read by `load_rgb_image`, PIL images converted by `pil_to_rgb_array`; arrays may be uint8
    `[H, W, 3]` RGB (returned as they are) or `[H, W]` grayscale (replicated to three channels).
    Raises:
        MissingImageError / CorruptImageError: a missing or unreadable file.
        ValueError: an array of another dtype or shape, or another type of input.
    """
    if isinstance(image, (str, os.PathLike)):
        return load_rgb_image(image)
    if isinstance(image, Image.Image):
        return pil_to_rgb_array(image)
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or not (image.ndim == 2 or (image.ndim == 3 and image.shape[2] == 3)):
            raise ValueError(
                f"image arrays must be uint8 [H, W, 3] RGB or [H, W] gray, got {image.dtype} {image.shape}"
            )
        return np.repeat(image[..., None], 3, axis=2) if image.ndim == 2 else image
    raise ValueError(f"images must be paths, PIL images or numpy arrays, got {type(image).__name__}")
