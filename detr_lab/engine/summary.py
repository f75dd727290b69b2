"""The end-of-run summary: final validation AP, best checkpoint, an example image and the AP curve.

`RunSummary` records val/AP after every validation round (kept in checkpoints, so a resumed run keeps
its whole curve) and when fit ends writes to `<output_dir>/summary/`:

    ap_over_time.png / .csv   val AP and AP50 against the training step
    example.png               the first validation image: ground truth (left) beside predictions (right)

and prints the final AP, where the best checkpoint is, and both paths. The drawing helpers here are
small and self-contained on purpose (PIL and matplotlib only).
"""

from __future__ import annotations

import csv
import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from matplotlib.figure import Figure
from PIL import Image, ImageDraw, ImageFont

from detr_lab.engine.evaluate import predict_dataset
from detr_lab.engine.evaluator import CocoEvaluator
from detr_lab.engine.inference import class_color
from detr_lab.files import atomic_write, atomic_write_text

SUMMARY_DIR = "summary"


@dataclass
class RunResult:
    final_ap: float
    final_step: int
    best_checkpoint: str  # "" when no best checkpoint was written
    best_ap: float | None
    example_image: Path | None
    ap_plot: Path | None

    def report(self) -> str:
        best = (f"{self.best_checkpoint} (val AP {self.best_ap:.4f})" if self.best_checkpoint
                else "none written")
        return "\n".join([
            "=" * 72,
            f"final COCO AP on the validation set: {self.final_ap:.4f} (step {self.final_step})",
            f"best checkpoint: {best}",
            f"example image (ground truth | predictions): {self.example_image or 'not written'}",
            f"AP over time: {self.ap_plot or 'not written'}",
            "=" * 72,
        ])


def _atomic_save(path: Path, save) -> Path:
    """`save(file)` into a binary file that replaces `path` atomically (`detr_lab.files.atomic_write`)."""
    with atomic_write(path, "wb") as file:
        save(file)
    return path


def draw_ground_truth_and_predictions(
    image: np.ndarray,
    gt_boxes: np.ndarray,
    gt_labels: Sequence[int],
    pred_boxes: np.ndarray,
    pred_labels: Sequence[int],
    pred_scores: Sequence[float],
    class_names: Sequence[str],
    *,
    score_threshold: float,
    min_side: int = 320,
) -> Image.Image:
    """Two copies of uint8 RGB `image` `[H, W, 3]` side by side: ground truth left, predictions right.

    Boxes are absolute (x1, y1, x2, y2) pixels of `image` (`[N, 4]`), labels class indices; each
    prediction is labelled "name score". The canvas is upscaled so its shorter side is >= `min_side`.
    """
    height, width = image.shape[:2]
    scale = max(1.0, min_side / min(height, width))
    size = (round(width * scale), round(height * scale))
    font = ImageFont.load_default()
    header = 14

    def panel(boxes: np.ndarray, labels: Sequence[int], texts: Sequence[str], title: str) -> Image.Image:
        canvas = Image.new("RGB", (size[0], size[1] + header), (255, 255, 255))
        canvas.paste(Image.fromarray(image).convert("RGB").resize(size, Image.BILINEAR), (0, header))
        draw = ImageDraw.Draw(canvas)
        draw.text((2, 1), title, fill=(0, 0, 0), font=font)
        for box, label, text in zip(boxes, labels, texts, strict=True):
            x1, y1, x2, y2 = (float(v) * scale for v in box)
            y1, y2 = y1 + header, y2 + header
            color = class_color(int(label))
            draw.rectangle((x1, y1, x2, y2), outline=color, width=2)
            left, top, right, bottom = draw.textbbox((x1, y1), text, font=font)
            label_top = max(header, y1 - (bottom - top) - 2)
            label_box = (x1, label_top, x1 + (right - left) + 4, label_top + (bottom - top) + 2)
            draw.rectangle(label_box, fill=color)
            draw.text((x1 + 2, label_top), text, fill=(0, 0, 0), font=font)
        return canvas

    gt_texts = [class_names[int(c)] for c in gt_labels]
    gt = panel(gt_boxes, gt_labels, gt_texts, f"ground truth ({len(gt_texts)})")
    texts = [f"{class_names[int(c)]} {s:.2f}" for c, s in zip(pred_labels, pred_scores, strict=True)]
    title = f"predictions, score >= {score_threshold:.2f} ({len(texts)})"
    pred = panel(pred_boxes, pred_labels, texts, title)
    both = Image.new("RGB", (gt.width * 2 + 8, gt.height), (255, 255, 255))
    both.paste(gt, (0, 0))
    both.paste(pred, (gt.width + 8, 0))
    return both


AP_STYLES = {"AP": "o-", "AP50": "s--", "AP75": "^:"}  # line style of each metric


def plot_ap(
    axes: Any,
    runs: Mapping[str, Sequence[Mapping[str, float]]],
    *,
    x: str,
    x_label: str,
    metrics: Sequence[str] = ("AP", "AP50"),
    annotate: bool = False,
) -> None:
    """Draw COCO AP curves into a matplotlib `axes`: the one AP plot of the run summary, the run
    curves (`detr_lab.visualize.curves`) and `tools/bench_demo_ap.py`.

    Args:
        axes: a matplotlib Axes.
        runs: run label ("" for a single unnamed run) -> rows, each a dict holding the `x` value and
            some of `metrics` (a row without a metric is no point of that metric's line).
        x: the key of the horizontal value in each row (e.g. "step", "epoch", "minutes").
        x_label: the horizontal axis' label.
        metrics: the keys drawn, each with its style from `AP_STYLES`: one colour per metric for a
            single run, one colour per run otherwise.
        annotate: write the first metric's value above each of its points (several runs' labels side
            by side).
    Raises:
        KeyError: a row without `x`.
    """
    for index, (run, rows) in enumerate(runs.items()):
        for number, metric in enumerate(metrics):
            points = [(row[x], row[metric]) for row in rows if metric in row]
            if not points:
                continue
            colour = f"C{index if len(runs) > 1 else number}"
            label = f"{run} {metric}" if run else metric
            alpha = 1.0 if number == 0 or len(runs) == 1 else 0.5
            axes.plot([p[0] for p in points], [p[1] for p in points], AP_STYLES.get(metric, "-"),
                      color=colour, alpha=alpha, label=label, markersize=4)
            if annotate and number == 0:
                shift = (index - (len(runs) - 1) / 2) * 18  # labels of runs that meet side by side
                for point in points:
                    axes.annotate(f"{point[1]:.3f}", point, textcoords="offset points", xytext=(shift, 6),
                                  ha="center", fontsize=7, color=colour)
    axes.set_xlabel(x_label)
    axes.set_ylabel("COCO AP (validation)")
    axes.set_ylim(0, 1)
    axes.grid(alpha=0.3)
    if axes.lines:
        axes.legend(fontsize=8)


def plot_ap_over_time(history: Sequence[dict], path: Path) -> Path:
    """Line plot of `AP` and `AP50` against `step` (one dict per validation round) to `path` (PNG)."""
    figure = Figure(figsize=(6, 4))  # the object-oriented API: no pyplot state, no backend switch
    axes = figure.subplots()
    plot_ap(axes, {"": history}, x="step", x_label="training step")
    axes.set_xlim(left=0)
    figure.tight_layout()
    return _atomic_save(path, lambda file: figure.savefig(file, format="png", dpi=100))


class RunSummary(Callback):
    """Record val/AP per validation round; when fit ends, evaluate if needed, draw and print the summary.

    The final AP is that of the last validation round when it ran at the final step (Lightning validates
    after a stop by `max_time`, early stopping or the last epoch); otherwise the validation set is
    evaluated once more with the final weights (the EMA weights when EMA is on: Lightning copies them
    into the model when training ends). Runs on rank zero; nothing is written after an interrupted fit.

    Args:
        output_dir: the run directory; files go to `<output_dir>/summary/`.
        score_threshold: the predictions drawn in the example image.
    """

    def __init__(self, output_dir: str | Path, *, score_threshold: float = 0.3) -> None:
        self.output_dir = Path(output_dir)
        self.score_threshold = score_threshold
        self.history: list[dict] = []  # {"epoch", "step", "AP", "AP50"}
        self.result: RunResult | None = None

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        metrics = trainer.callback_metrics
        if trainer.sanity_checking or "val/AP" not in metrics:
            return
        self.history.append({
            "epoch": trainer.current_epoch,
            "step": trainer.global_step,
            "AP": float(metrics["val/AP"]),
            "AP50": float(metrics.get("val/AP50", float("nan"))),
        })

    def state_dict(self) -> dict[str, Any]:
        return {"history": [dict(row) for row in self.history]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = [dict(row) for row in state_dict["history"]]

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.interrupted or not trainer.is_global_zero:
            return
        datamodule = trainer.datamodule
        directory = self.output_dir / SUMMARY_DIR
        if self.history and self.history[-1]["step"] == trainer.global_step:
            final_ap = self.history[-1]["AP"]
        else:
            stats = self._evaluate(datamodule, pl_module)
            final_ap = stats["AP"]
            self.history.append({"epoch": trainer.current_epoch, "step": trainer.global_step,
                                 "AP": stats["AP"], "AP50": stats["AP50"]})
        self._write_history_csv(directory / "ap_over_time.csv")
        ap_plot = self._attempt("the AP plot",
                                lambda: plot_ap_over_time(self.history, directory / "ap_over_time.png"))
        example = self._attempt("the example image",
                                lambda: self._draw_example(datamodule, pl_module, directory / "example.png"))
        checkpoint = trainer.checkpoint_callback
        best_path = getattr(checkpoint, "best_model_path", "") or ""
        best_score = getattr(checkpoint, "best_model_score", None)
        self.result = RunResult(
            final_ap=final_ap,
            final_step=trainer.global_step,
            best_checkpoint=best_path,
            best_ap=float(best_score) if best_score is not None else None,
            example_image=example,
            ap_plot=ap_plot,
        )
        rank_zero_info(self.result.report())

    # --------------------------------------------------------------------------------------- helpers
    @staticmethod
    def _attempt(what: str, make) -> Path | None:
        # A finished run is not failed by its summary pictures: the reason is printed instead.
        try:
            return make()
        except Exception as err:  # an unreadable image, a plotting backend problem, ...
            rank_zero_warn(f"run summary: {what} was not written: {type(err).__name__}: {err}")
            return None

    def _write_history_csv(self, path: Path) -> None:
        text = io.StringIO(newline="")
        writer = csv.DictWriter(text, fieldnames=["epoch", "step", "AP", "AP50"])
        writer.writeheader()
        writer.writerows(self.history)
        atomic_write_text(path, text.getvalue())

    @staticmethod
    def _evaluate(datamodule, pl_module: L.LightningModule) -> dict[str, float]:
        evaluator = CocoEvaluator(datamodule.val_dataset.coco, pl_module.category_ids)
        was_training = pl_module.training
        pl_module.eval()
        try:
            predict_dataset(pl_module.model, pl_module.postprocess, datamodule.val_dataloader(), evaluator,
                            pl_module.device)
        finally:
            pl_module.train(was_training)
        return evaluator.compute()

    @torch.inference_mode()
    def _draw_example(self, datamodule, pl_module: L.LightningModule, path: Path) -> Path:
        dataset = datamodule.val_dataset
        sample = dataset.load_sample(0)  # the image as stored, boxes xyxy px, class indices
        tensor, target = dataset[0]  # the evaluation transform
        was_training = pl_module.training
        pl_module.eval()
        try:
            images = tensor.unsqueeze(0).to(pl_module.device)  # [1, 3, h, w]
            padding_mask = torch.zeros(1, *tensor.shape[-2:], dtype=torch.bool, device=pl_module.device)
            outputs = pl_module.model(images, padding_mask)
            orig_size = target["orig_size"].unsqueeze(0).to(pl_module.device)  # [1, 2] (h, w)
            detection = {k: v.cpu() for k, v in pl_module.postprocess(outputs, orig_size)[0].items()}
        finally:
            pl_module.train(was_training)
        keep = detection["scores"] >= self.score_threshold
        image = draw_ground_truth_and_predictions(
            sample.image, sample.boxes, sample.labels.tolist(),
            detection["boxes"][keep].numpy(), detection["labels"][keep].tolist(),
            detection["scores"][keep].tolist(), pl_module.class_names,
            score_threshold=self.score_threshold,
        )
        return _atomic_save(path, lambda file: image.save(file, format="PNG"))
