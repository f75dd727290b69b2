"""The image files a command line names: files as given, folders walked (sorted, not recursive)."""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from detr_lab.data.images import IMAGE_SUFFIXES
from detr_lab.errors import InputError, InputNotFoundError


@dataclass
class InputImages:
    """What `collect_images` found: readable-looking image paths, and entries that cannot be read at all."""

    paths: list[Path]
    failed: list[dict]  # {"file", "error" (one line naming the file)}: dangling links, link loops, non-files


def _folder_entries(folder: Path) -> tuple[list[Path], list[dict]]:
    """Image files of `folder` (by suffix, sorted, not recursive); broken links and non-files are reported."""
    found, failed = [], []
    for entry in sorted(folder.iterdir()):
        is_image = entry.suffix.lower() in IMAGE_SUFFIXES
        try:
            target = entry.stat()  # follows symbolic links
        except OSError as err:  # dangling link, link loop, permission
            kind = "symbolic link loop" if err.errno == errno.ELOOP else (
                "dangling symbolic link" if entry.is_symlink() else "unreadable entry")
            failed.append({"file": str(entry), "error": f"{entry}: {kind}: {err.strerror or err}"})
            continue
        if not is_image:
            continue
        if stat.S_ISREG(target.st_mode):
            found.append(entry)
        elif not stat.S_ISDIR(target.st_mode):
            failed.append({"file": str(entry), "error": f"{entry}: not a regular file"})
    return found, failed


def collect_images(inputs: Sequence[str | os.PathLike]) -> InputImages:
    """Image files named on the command line; a folder contributes its image files (sorted, not recursive).

    In a folder, a symbolic link that does not resolve (dangling, or a loop) is listed in `failed`
    with its reason, whatever its name; files without an image suffix (`IMAGE_SUFFIXES`) are not
    images and are ignored.
    Raises:
        InputNotFoundError: a named path that does not exist.
        InputError: a folder with neither image files nor broken entries, or no inputs at all.
    """
    paths: list[Path] = []
    failed: list[dict] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found, broken = _folder_entries(path)
            if not found and not broken:
                raise InputError(f"no image files ({', '.join(IMAGE_SUFFIXES)}) in folder {path}")
            paths.extend(found)
            failed.extend(broken)
        elif path.is_file():
            paths.append(path)
        else:
            raise InputNotFoundError(f"image not found: {path}")
    if not paths and not failed:
        raise InputError("no input images given")
    return InputImages(paths, failed)
