"""Time COCO box evaluation with pycocotools and faster-coco-eval on a generated set of N images.

    python tools/bench_coco_backends.py --images 5000 [--detections 100] [--repeats 3]

Ground truth in the synthetic set's style (6 classes, 1-8 boxes per 640 x 480 image) and, per image,
`--detections` scored detections as a DETR model returns them: every ground-truth box jittered (some
relabelled), the rest random boxes. Each backend scores the same detections through `CocoEvaluator`
(results loading, evaluate, accumulate, summarize); the wall time of each `compute()` is printed with
its AP, which must agree. faster-coco-eval is the `eval` extra.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import sys
import time

import numpy as np
import torch
from pycocotools.coco import COCO

from detr_lab.engine.cli import add_common_arguments, run_tool
from detr_lab.engine.coco_backends import BACKENDS
from detr_lab.engine.evaluator import CocoEvaluator

CATEGORY_IDS = [1, 2, 3, 5, 8, 13]  # as the synthetic set's
WIDTH, HEIGHT = 640, 480


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="bench_coco_backends.py", description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=5000, help="images in the generated set (default 5000)")
    parser.add_argument("--detections", type=int, default=100, help="detections per image (default 100)")
    parser.add_argument("--repeats", type=int, default=1, help="timed runs per backend; the median is shown")
    parser.add_argument("--seed", type=int, default=0)
    add_common_arguments(parser, overrides=False)
    return parser.parse_args(argv)


def generate(num_images: int, detections: int, seed: int) -> tuple[dict, dict[int, dict[str, torch.Tensor]]]:
    """(COCO instances dict, image id -> post-processor output: boxes xyxy [D, 4], labels [D], scores [D])."""
    rng = np.random.default_rng(seed)
    images, annotations, predictions = [], [], {}
    for image_id in range(1, num_images + 1):
        images.append({"id": image_id, "width": WIDTH, "height": HEIGHT, "file_name": f"{image_id:012d}.jpg"})
        count = int(rng.integers(1, 9))
        size = np.exp(rng.uniform(np.log(16), np.log(300), count))
        wh = np.stack([size * rng.uniform(0.6, 1.0, count), size * rng.uniform(0.6, 1.0, count)], axis=1)
        xy = rng.uniform(0, 1, (count, 2)) * (np.array([WIDTH, HEIGHT]) - wh)
        classes = rng.integers(0, len(CATEGORY_IDS), count)
        for (x, y), (w, h), c in zip(xy, wh, classes, strict=True):
            annotations.append({
                "id": len(annotations) + 1, "image_id": image_id, "iscrowd": 0, "area": float(w * h),
                "category_id": CATEGORY_IDS[c], "bbox": [float(x), float(y), float(w), float(h)],
            })
        found = xy + rng.normal(0, 0.08, (count, 2)) * wh
        found_wh = wh * np.exp(rng.normal(0, 0.1, (count, 2)))
        labels = np.where(rng.random(count) < 0.85, classes, rng.integers(0, len(CATEGORY_IDS), count))
        extra = max(detections - count, 0)
        random_wh = rng.uniform(10, 200, (extra, 2))
        random_xy = rng.uniform(0, 1, (extra, 2)) * (np.array([WIDTH, HEIGHT]) - random_wh)
        xywh = np.concatenate([np.concatenate([found, found_wh], 1),
                               np.concatenate([random_xy, random_wh], 1)])
        scores = np.concatenate([rng.uniform(0.3, 1.0, count), rng.uniform(0.0, 0.6, extra)])
        xyxy = np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], 1)
        all_labels = np.concatenate([labels, rng.integers(0, len(CATEGORY_IDS), extra)])
        predictions[image_id] = {
            "boxes": torch.tensor(xyxy, dtype=torch.float32)[:detections],
            "labels": torch.tensor(all_labels, dtype=torch.int64)[:detections],
            "scores": torch.tensor(scores, dtype=torch.float32)[:detections],
        }
    categories = [{"id": c, "name": f"class{c}"} for c in CATEGORY_IDS]
    return {"images": images, "annotations": annotations, "categories": categories}, predictions


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    def body() -> None:
        start = time.perf_counter()
        dataset, predictions = generate(args.images, args.detections, args.seed)
        print(f"generated {args.images} images, {len(dataset['annotations'])} boxes, "
              f"{args.images * args.detections} detections in {time.perf_counter() - start:.1f} s")
        coco = COCO()
        coco.dataset = dataset
        with contextlib.redirect_stdout(io.StringIO()):
            coco.createIndex()
        rows = []
        for backend in BACKENDS:
            times, stats = [], {}
            for _ in range(args.repeats):
                evaluator = CocoEvaluator(coco, CATEGORY_IDS, backend=backend)
                evaluator.update(predictions)
                start = time.perf_counter()
                stats = evaluator.compute()
                times.append(time.perf_counter() - start)
            rows.append((backend, float(np.median(times)), stats["AP"], stats["AP50"]))
        print("| backend | seconds (median) | AP | AP50 |")
        print("|---|---|---|---|")
        for backend, seconds, ap, ap50 in rows:
            print(f"| {backend} | {seconds:.2f} | {ap:.4f} | {ap50:.4f} |")

    return run_tool("bench_coco_backends.py", body, debug=args.debug)


if __name__ == "__main__":
    sys.exit(main())
