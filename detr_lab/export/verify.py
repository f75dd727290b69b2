"""Accuracy proof of an export: the exported model (onnxruntime or OpenVINO) against the PyTorch model.

    report = verify_onnx(model, "model.onnx", config=cfg)   # cfg: validation images too (optional)
    report = verify_runtime(model, OpenVinoDetector("model.xml"), config=cfg)   # any ExportedRuntime
    print(report.text()); assert report.passed

Both models see the same batches: random normalized images of random sizes, padded to the batch's
largest like real batches (a fixed-size export: its traced size), and, when a config is given, the
first batches of its validation split. The largest absolute differences of the final-layer
`pred_logits` and `pred_boxes` (normalized cxcywh) are reported; the proof passes when both are
within `tolerance` (1e-4 by default).

Query order: a two-stage member (DINO, RT-DETR, D-FINE) selects its queries by a top-k over encoder
scores, and scores within float rounding of each other may come out in another order in the other
runtime (or at another thread count). The detections are then the same, in other query rows. So when
the rows differ beyond the tolerance, each exported query row of an image is paired with a PyTorch
row by a minimum-cost assignment on the largest difference of (logits, box) (`scipy`'s
`linear_sum_assignment`), and the differences of the pairs are reported instead, with the number of
rows that moved. Outputs that differ in anything but the order still fail.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field

import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn

from detr_lab.config import Config
from detr_lab.data.datamodule import DetectionDataModule
from detr_lab.export.runtime import ExportedRuntime, OnnxDetector, OnnxInputError

DEFAULT_TOLERANCE = 1e-4


@dataclass
class VerifyCase:
    description: str  # e.g. "random 2 x 3 x 72 x 96" or "validation batch 0 (2 images)"
    logits_diff: float
    boxes_diff: float
    reordered: int = 0  # query rows paired with a PyTorch row at another position (near-tied selection)


@dataclass
class VerifyReport:
    tolerance: float
    cases: list[VerifyCase] = field(default_factory=list)
    backend: str = "onnxruntime"  # the runtime compared with PyTorch

    @property
    def logits_diff(self) -> float:
        return max((case.logits_diff for case in self.cases), default=0.0)

    @property
    def boxes_diff(self) -> float:
        return max((case.boxes_diff for case in self.cases), default=0.0)

    @property
    def passed(self) -> bool:
        return bool(self.cases) and self.logits_diff <= self.tolerance and self.boxes_diff <= self.tolerance

    def text(self) -> str:
        """One line per batch, then the verdict line."""
        lines = [
            f"  {case.description}: max |diff| logits {case.logits_diff:.3g}, boxes {case.boxes_diff:.3g}"
            + (f" ({case.reordered} query rows in another order: near-tied selection)" * bool(case.reordered))
            for case in self.cases
        ]
        verdict = "PASSED" if self.passed else "FAILED"
        lines.append(
            f"verify {verdict}: max |{self.backend} - PyTorch| over {len(self.cases)} batches: "
            f"logits {self.logits_diff:.3g}, boxes {self.boxes_diff:.3g} (tolerance {self.tolerance:g})"
        )
        return "\n".join(lines)


def random_batch(
    generator: torch.Generator,
    batch: int,
    sizes: list[tuple[int, int]],
    canvas: tuple[int, int] | None = None,
) -> tuple[Tensor, Tensor]:
    """Random normalized images of the given (h, w) sizes, zero-padded bottom/right to the largest (or to
    `canvas`): `[B, 3, H, W]` and the padding mask `[B, H, W]` (True = padding)."""
    height = canvas[0] if canvas else max(h for h, _ in sizes)
    width = canvas[1] if canvas else max(w for _, w in sizes)
    images = torch.zeros(batch, 3, height, width)
    padding_mask = torch.ones(batch, height, width, dtype=torch.bool)
    for index, (h, w) in enumerate(sizes):
        images[index, :, :h, :w] = torch.randn(3, h, w, generator=generator)
        padding_mask[index, :h, :w] = False
    return images, padding_mask


def _max_diff(a: Tensor, b: Tensor) -> float:
    if a.shape != b.shape:
        return float("inf")
    return float((a.float() - b.float()).abs().max()) if a.numel() else 0.0


def aligned_differences(got: dict, expected: dict) -> tuple[float, float, int]:
    """Largest logit and box differences after pairing the query rows of each image (see the module
    docstring), and the number of rows paired with another position.

    Args:
        got, expected: `pred_logits` `[B, Q, C]` and `pred_boxes` `[B, Q, 4]` of the same shapes.
    """
    logits_diff = boxes_diff = 0.0
    moved = 0
    for image in range(expected["pred_logits"].shape[0]):
        ours = torch.cat((got["pred_logits"][image], got["pred_boxes"][image]), -1).double()
        theirs = torch.cat((expected["pred_logits"][image], expected["pred_boxes"][image]), -1).double()
        cost = torch.cdist(ours, theirs, p=float("inf"))  # [Q, Q]
        rows, columns = (torch.as_tensor(v) for v in linear_sum_assignment(cost.numpy()))
        moved += int((rows != columns).sum())
        logits_diff = max(logits_diff, _max_diff(got["pred_logits"][image][rows],
                                                 expected["pred_logits"][image][columns]))
        boxes_diff = max(boxes_diff, _max_diff(got["pred_boxes"][image][rows],
                                               expected["pred_boxes"][image][columns]))
    return logits_diff, boxes_diff, moved


def verify_onnx(
    model: nn.Module,
    onnx_path: str | os.PathLike,
    *,
    config: Config | None = None,
    num_random: int = 3,
    num_val_batches: int = 2,
    size_range: tuple[int, int] | None = None,
    tolerance: float = DEFAULT_TOLERANCE,
    seed: int = 0,
) -> VerifyReport:
    """Run `model` (PyTorch, as loaded) and the ONNX file on the same batches and compare.

    Args:
        model: the exported PyTorch detector.
        onnx_path: the exported file.
        config: when given, `num_val_batches` batches of its validation split are compared too (its
            `data` section; the model section is not used).
        num_random: random batches (1-2 images each; a fixed-size export: its traced batch and size).
        size_range: (min, max) image side of the random batches of a dynamic export (default: from
            half the model config's `eval_size` to its `eval_max_size`).
        tolerance: the largest accepted absolute difference of logits and of boxes.
    Returns:
        a `VerifyReport` (`passed`, per-batch differences, `text()`).
    """
    return verify_runtime(
        model, OnnxDetector(onnx_path), config=config, num_random=num_random,
        num_val_batches=num_val_batches, size_range=size_range, tolerance=tolerance, seed=seed,
    )


def verify_runtime(
    model: nn.Module,
    detector: ExportedRuntime,
    *,
    config: Config | None = None,
    num_random: int = 3,
    num_val_batches: int = 2,
    size_range: tuple[int, int] | None = None,
    tolerance: float = DEFAULT_TOLERANCE,
    seed: int = 0,
) -> VerifyReport:
    """`verify_onnx` for a loaded runtime (`OnnxDetector`, `OpenVinoDetector`): the same batches, the
    same report (its `backend` names the runtime)."""
    model = model.eval()
    report = VerifyReport(tolerance, backend=detector.backend)
    generator = torch.Generator().manual_seed(seed)
    traced = detector.metadata.traced_size
    augment = detector.metadata.config.data.augment
    low, high = size_range or (max(32, augment.eval_size // 2), augment.eval_max_size)
    for _ in range(num_random):
        if traced is not None:
            batch, height, width = traced
            sizes = [(height, width)] + [
                (int(torch.randint(height // 2, height + 1, (), generator=generator)),
                 int(torch.randint(width // 2, width + 1, (), generator=generator)))
                for _ in range(batch - 1)
            ]
            images, padding_mask = random_batch(generator, batch, sizes, (height, width))
        else:
            batch = int(torch.randint(1, 3, (), generator=generator))
            sizes = [
                tuple(int(v) for v in torch.randint(low, high + 1, (2,), generator=generator))
                for _ in range(batch)
            ]
            images, padding_mask = random_batch(generator, batch, sizes)
        shape = " x ".join(str(v) for v in images.shape)
        report.cases.append(_compare(model, detector, images, padding_mask, f"random {shape}", tolerance))
    if config is not None:
        batches = _validation_batches(config, detector, num_val_batches)
        for index, (images, padding_mask) in enumerate(batches):
            count, height, width = images.shape[0], images.shape[2], images.shape[3]
            description = f"validation batch {index} ({count} images, {height}x{width})"
            report.cases.append(_compare(model, detector, images, padding_mask, description, tolerance))
    return report


@torch.no_grad()
def _compare(
    model: nn.Module, detector: ExportedRuntime, images: Tensor, padding_mask: Tensor, what: str,
    tolerance: float = DEFAULT_TOLERANCE,
) -> VerifyCase:
    traced = detector.metadata.traced_size
    if traced is not None and tuple(images.shape[2:]) != tuple(traced[1:]):
        # both models see the batch padded to the fixed export size (the ONNX runtime would pad it)
        if images.shape[2] > traced[1] or images.shape[3] > traced[2]:
            raise OnnxInputError(
                f"{what}: {images.shape[2]}x{images.shape[3]} images do not fit the fixed export size "
                f"{traced[1]}x{traced[2]}; verify a --dynamic export, or export a larger size"
            )
        canvas = torch.zeros(images.shape[0], 3, traced[1], traced[2])
        canvas[:, :, : images.shape[2], : images.shape[3]] = images
        mask = torch.ones(images.shape[0], traced[1], traced[2], dtype=torch.bool)
        mask[:, : images.shape[2], : images.shape[3]] = padding_mask
        images, padding_mask = canvas, mask
    expected = model(images, padding_mask)
    got = detector(images, padding_mask)
    case = VerifyCase(
        what,
        _max_diff(got["pred_logits"], expected["pred_logits"]),
        _max_diff(got["pred_boxes"], expected["pred_boxes"]),
    )
    same_shapes = all(got[key].shape == expected[key].shape for key in ("pred_logits", "pred_boxes"))
    if max(case.logits_diff, case.boxes_diff) > tolerance and same_shapes:
        logits_diff, boxes_diff, moved = aligned_differences(got, expected)
        if moved:
            case = VerifyCase(what, logits_diff, boxes_diff, reordered=moved)
    return case


def _validation_batches(config: Config, detector: ExportedRuntime, count: int):
    cfg = dataclasses.replace(config, model=detector.metadata.config.model)
    datamodule = DetectionDataModule(cfg, category_ids=detector.metadata.category_ids)
    datamodule.prepare_data()
    datamodule.setup("validate")
    for index, (images, padding_mask, _) in enumerate(datamodule.val_dataloader()):
        if index >= count:
            break
        yield images, padding_mask
