"""`detections.json`, the file `run_inference` writes, and the records of the images that failed.

    {"checkpoint", "score_threshold", "images_to_process", "complete",
     "images": [{"file", "width", "height", "annotated",
                 "detections": [{"box": [x1, y1, x2, y2], "score", "category_id", "class_name"}]}],
     "failed": [{"file", "error"}]}

Boxes are absolute pixels of the original image; "complete" is false while the run goes on and when
it stopped on an error or an interrupt; "images_to_process" counts the images found in the inputs.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from detr_lab.files import atomic_write_text

DETECTIONS_FILE = "detections.json"


def detection_records(detection: dict) -> list[dict]:
    """The json's "detections" of one image: `Predictor.predict`'s result for it (filtered and best
    first) as `{"box": [x1, y1, x2, y2] (absolute pixels, 2 decimals), "score", "category_id",
    "class_name"}` records, in the same order."""
    rows = zip(detection["boxes"].tolist(), detection["scores"].tolist(), detection["category_ids"].tolist(),
               detection["class_names"], strict=True)
    return [
        {"box": [round(v, 2) for v in box], "score": round(score, 4), "category_id": category_id,
         "class_name": name}
        for box, score, category_id, name in rows
    ]


def failure_record(path: Path, err: BaseException) -> dict:
    """{"file", "error"} for an image that could not be processed; the error is one line naming the file."""
    message = str(err).strip().splitlines()[0] if str(err).strip() else ""
    if str(path) not in message:
        message = f"{path}: {type(err).__name__}: {message}"
    return {"file": str(path), "error": message}


class DetectionsWriter:
    """Keeps the results and rewrites the json atomically: once at the start (`start`), then whenever
    `every_images` more images are done or `interval_s` seconds have passed since the last write (at
    the next `flush`), and on `flush(force=True)`. A run killed midway keeps what it had done, and an
    earlier run's json in the same folder is replaced before the first new picture is written, so it
    never stands beside this run's pictures as if it were this run's.

    Args:
        path: the json file. header: the keys written before "complete" (checkpoint, threshold, ...).
        interval_s: seconds between writes at most (while images are being done).
        every_images: images (done or failed) between writes at most.
    """

    def __init__(self, path: Path, header: dict, interval_s: float = 10.0, every_images: int = 16) -> None:
        self.path = path
        self.header = header
        self.interval_s = interval_s
        self.every_images = every_images
        self.images: list[dict] = []  # as in the json's "images"
        self.failed: list[dict] = []  # as in the json's "failed"
        self._last_write = time.monotonic()
        self._written_count = -1  # images + failures in the json on disk (-1: not written yet)

    def start(self) -> None:
        """Write the json with no result yet ("complete": false), replacing an earlier run's.

        Raises:
            FileWriteError: the file cannot be written (the message names it).
        """
        self.flush(force=True)

    def flush(self, *, force: bool = False, complete: bool = False) -> None:
        """Write the json when forced, or when `every_images` images or `interval_s` seconds have passed
        since the last write.

        Raises:
            FileWriteError: the file cannot be written (the message names it).
        """
        done = len(self.images) + len(self.failed)
        due = (done - self._written_count >= self.every_images
               or time.monotonic() - self._last_write >= self.interval_s)
        if not force and (done == self._written_count or not due):
            return
        payload = {**self.header, "complete": complete, "images": self.images, "failed": self.failed}
        atomic_write_text(self.path, json.dumps(payload, indent=2))
        self._last_write = time.monotonic()
        self._written_count = done
