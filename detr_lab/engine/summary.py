"""The end-of-run summary: final validation AP, best checkpoint, an example image and the AP curve.

`RunSummary` records val/AP after every validation round (kept in checkpoints, so a resumed run keeps
its whole curve) and when fit ends writes to `<output_dir>/summary/`:

    ap_over_time.png / .csv   val AP and AP50 against the training step
    example.png               the first validation image: ground truth (left) beside predictions (right)

and prints the final AP, where the best checkpoint is, and both paths. The example image is drawn by
`detr_lab.visualize.draw.draw_ground_truth_and_predictions`, the AP plot here (matplotlib only).
"""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from matplotlib.figure import Figure

from detr_lab.data.collate import pad_images
from detr_lab.engine.detect import DEFAULT_SCORE_THRESHOLD, detect
from detr_lab.engine.evaluate import predict_dataset
from detr_lab.engine.evaluator import CocoEvaluator
from detr_lab.files import atomic_write, atomic_write_text
from detr_lab.visualize.curves import plot_ap
from detr_lab.visualize.draw import draw_ground_truth_and_predictions, save_picture

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
        score_threshold: the predictions drawn in the example image (default `DEFAULT_SCORE_THRESHOLD`).
    """

    def __init__(self, output_dir: str | Path, *, score_threshold: float = DEFAULT_SCORE_THRESHOLD) -> None:
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

    def _draw_example(self, datamodule, pl_module: L.LightningModule, path: Path) -> Path:
        dataset = datamodule.val_dataset
        sample = dataset.load_sample(0)  # the image as stored, boxes xyxy px, class indices
        tensor, target = dataset[0]  # the evaluation transform
        images, padding_mask = pad_images([tensor])  # [1, 3, h, w], [1, h, w] (no padding)
        was_training = pl_module.training
        pl_module.eval()
        try:
            detection = detect(pl_module.model, pl_module.postprocess, images, padding_mask,
                               target["orig_size"][None], pl_module.device)[0]
        finally:
            pl_module.train(was_training)
        image = draw_ground_truth_and_predictions(
            sample.image, sample.boxes, sample.labels.tolist(),
            detection["boxes"].cpu().numpy(), detection["labels"].tolist(), detection["scores"].tolist(),
            pl_module.class_names, score_threshold=self.score_threshold,
        )
        return save_picture(image, path)
