"""Training-health monitors: each stays quiet on a healthy run and fires on the problem it watches."""

from __future__ import annotations

import warnings

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from detr_lab.config import load_config
from detr_lab.engine.health import (
    NonFiniteGuard,
    NonFiniteTrainingError,
    QueryUsageMonitor,
    StalledAPMonitor,
    TrainingHealthWarning,
    find_stalled_ap_causes,
    query_concentration,
)
from detr_lab.models.matcher import HungarianMatcher


def make_trainer(tmp_path, callbacks, *, max_epochs=1, **kwargs):
    return L.Trainer(max_epochs=max_epochs, accelerator="cpu", devices=1, logger=False,
                     enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                     default_root_dir=tmp_path, num_sanity_val_steps=0, callbacks=callbacks, **kwargs)


class Batches(DataLoader):
    """A loader yielding prepared batches as they are."""

    def __init__(self, batches):
        super().__init__(batches, batch_size=None, collate_fn=_as_is)
        self.batches = batches


def _as_is(batch):
    return batch


def detection_batches(num_batches, *, objects=1, first_id=0, box=(0.5, 0.5, 0.2, 0.2)):
    """A loader of `(images, padding_mask, targets)` batches of two 8x8 images; image ids count up from
    first_id."""
    batches = []
    for b in range(num_batches):
        targets = [
            {"boxes": torch.tensor([box] * objects), "labels": torch.zeros(objects, dtype=torch.int64),
             "image_id": torch.tensor(first_id + 2 * b + i)}
            for i in range(2)
        ]
        batches.append((torch.rand(2, 3, 8, 8), torch.zeros(2, 8, 8, dtype=torch.bool), targets))
    return Batches(batches)


def health_warnings(record):
    return [str(w.message) for w in record if issubclass(w.category, TrainingHealthWarning)]


# ------------------------------------------------------------------------------------- stalled AP
def annotations(boxes, category_id=1):
    return [{"bbox": list(box), "category_id": category_id} for box in boxes]


def test_stalled_ap_causes_name_what_is_wrong():
    healthy = load_config(overrides=["model.backbone.pretrained=true"])
    good_boxes = annotations([[10, 10, 30, 40]] * 5)
    assert find_stalled_ap_causes(healthy, num_train_images=50_000, train_annotations=good_boxes,
                                  val_annotations=good_boxes, category_ids=[1]) == []

    degenerate = annotations([[10, 10, 0, 0]] * 4 + [[1, 1, 5, 5]])
    (cause,) = find_stalled_ap_causes(None, num_train_images=5, train_annotations=degenerate,
                                      val_annotations=degenerate, category_ids=[1])
    assert "4 of 5 training boxes are degenerate" in cause and "[x, y, width, height]" in cause

    other_ids = annotations([[10, 10, 30, 40]], category_id=7)
    causes = find_stalled_ap_causes(None, num_train_images=5, train_annotations=good_boxes,
                                    val_annotations=other_ids, category_ids=list(range(1, 11)))
    assert any("no category id of the validation annotations ([7])" in c for c in causes)
    assert any("'model.num_classes' is 10" in c and "only 1 category ids" in c for c in causes)

    scratch = load_config(overrides=["model.backbone.pretrained=false", "optim.lr=0.01"])
    causes = find_stalled_ap_causes(scratch, num_train_images=400, train_annotations=good_boxes,
                                    val_annotations=good_boxes, category_ids=[1])
    assert len(causes) == 2
    assert "random weights" in causes[0] and "only 400 images" in causes[0]
    assert "'optim.lr' is 0.01" in causes[1]


class FixedAP(L.LightningModule):
    """Logs a constant val/AP each validation round; `cfg` says the LR is too high."""

    def __init__(self, ap):
        super().__init__()
        self.ap = ap
        self.weight = nn.Parameter(torch.ones(1))
        self.cfg = load_config(overrides=["model.backbone.pretrained=true", "optim.lr=0.05"])

    def training_step(self, batch, batch_idx):
        return (self.weight * batch[0].mean()) ** 2

    def validation_step(self, batch, batch_idx):
        pass

    def on_validation_epoch_end(self):
        self.log("val/AP", self.ap)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


@pytest.mark.parametrize("ap, fires", [(0.0, True), (0.3, False)])
def test_stalled_ap_monitor_fires_after_n_rounds_only_at_chance_level(tmp_path, ap, fires):
    monitor = StalledAPMonitor(rounds=2, threshold=0.01)
    trainer = make_trainer(tmp_path, [monitor], max_epochs=3)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        trainer.fit(FixedAP(ap), train_dataloaders=detection_batches(1), val_dataloaders=detection_batches(1))
    found = health_warnings(record)
    assert monitor.rounds_seen == 3
    if fires:
        assert len(found) == 1  # once, after round 2
        assert "val/AP is still 0.0000" in found[0] and "after 2 validation rounds" in found[0]
        assert "'optim.lr' is 0.05" in found[0]
    else:
        assert found == []


# ------------------------------------------------------------------------------------ non-finite
class Poisoned(L.LightningModule):
    """A linear model whose loss (or only its gradient) is non-finite on the batches in `bad_batches`."""

    def __init__(self, bad_batches=(), *, gradient_only=False):
        super().__init__()
        self.layer = nn.Linear(3, 1)
        self.bad_batches = set(bad_batches)
        self.gradient_only = gradient_only
        self.weights_before_step = {}

    def training_step(self, batch, batch_idx):
        images = batch[0]
        loss = self.layer(images.mean((2, 3))).pow(2).mean()
        if batch_idx in self.bad_batches:
            if self.gradient_only:
                # sqrt at 0: the value stays 0 (finite), its gradient is infinite
                loss = loss + torch.sqrt((self.layer.weight - self.layer.weight.detach()).sum())
            else:
                loss = loss * float("nan")
        self.weights_before_step[batch_idx] = self.layer.weight.detach().clone()
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=0.1)


def test_non_finite_guard_is_quiet_on_finite_training(tmp_path):
    guard = NonFiniteGuard("error")
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        make_trainer(tmp_path, [guard]).fit(Poisoned(), train_dataloaders=detection_batches(3))
    assert guard.skipped_steps == 0 and health_warnings(record) == []


@pytest.mark.parametrize("gradient_only", [False, True])
def test_non_finite_guard_stops_naming_step_and_image_ids(tmp_path, gradient_only):
    trainer = make_trainer(tmp_path, [NonFiniteGuard("error")])
    with pytest.raises(NonFiniteTrainingError) as caught:
        trainer.fit(Poisoned([2], gradient_only=gradient_only),
                    train_dataloaders=detection_batches(4, first_id=100))
    message = str(caught.value)
    assert "at optimizer step 2 (epoch 0, batch 2)" in message
    assert "image ids of the batch: [104, 105]" in message
    assert ("non-finite gradients in layer.weight" if gradient_only else "non-finite loss (nan)") in message
    assert "trainer.monitors.non_finite=skip" in message


def test_non_finite_guard_can_skip_and_count(tmp_path):
    guard = NonFiniteGuard("skip")
    module = Poisoned([1, 3])
    trainer = make_trainer(tmp_path, [guard])
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        trainer.fit(module, train_dataloaders=detection_batches(5))
    assert guard.skipped_steps == 2 and trainer.global_step == 5
    found = health_warnings(record)
    assert len(found) == 2 and "skipped a step" in found[0] and "image ids of the batch: [2, 3]" in found[0]
    # A skipped step leaves the weights as they were; the others move them; nothing is NaN.
    assert torch.equal(module.weights_before_step[1], module.weights_before_step[2])
    assert torch.equal(module.weights_before_step[3], module.weights_before_step[4])
    assert not torch.equal(module.weights_before_step[0], module.weights_before_step[1])
    assert torch.isfinite(module.layer.weight).all()
    assert trainer.callback_metrics["train/skipped_steps"] == 2


# ----------------------------------------------------------------------------------- query usage
def test_query_concentration():
    assert query_concentration(torch.tensor([5, 5, 5, 5]), 0.25) == (1, 0.25)
    assert query_concentration(torch.tensor([0, 9, 1, 0, 0]), 0.2) == (1, 0.9)
    assert query_concentration(torch.zeros(3, dtype=torch.int64), 0.5) == (2, 0.0)


class FixedQueries(L.LightningModule):
    """Q learned boxes matched by a real HungarianMatcher inside a small criterion."""

    def __init__(self, boxes):
        super().__init__()
        self.boxes = nn.Parameter(torch.tensor(boxes))
        self.criterion = Criterion()

    def training_step(self, batch, batch_idx):
        _, _, targets = batch
        num_queries = self.boxes.shape[0]
        outputs = {"pred_logits": torch.zeros(len(targets), num_queries, 1),
                   "pred_boxes": self.boxes.clamp(0.01, 0.99).expand(len(targets), -1, -1)}
        return self.criterion(outputs, targets)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


class Criterion(nn.Module):
    def __init__(self):
        super().__init__()
        self.matcher = HungarianMatcher(cost_class=0.0, classification="sigmoid")

    def forward(self, outputs, targets):
        final = self.matcher(outputs, targets)
        auxiliary = {**outputs, "pred_boxes": outputs["pred_boxes"].flip(1)}
        self.matcher(auxiliary, targets)  # an "auxiliary layer": not counted by the monitor
        boxes = outputs["pred_boxes"]
        loss = boxes.sum() * 0
        for image, (queries, objects) in enumerate(final):
            loss = loss + (boxes[image, queries] - targets[image]["boxes"][objects]).abs().sum()
        return loss


def spread_batches(num_queries, num_batches):
    """One object per image, cycling over the Q query boxes' positions."""
    batches = detection_batches(num_batches)
    for b, (_, _, targets) in enumerate(batches.batches):
        for i, target in enumerate(targets):
            k = (2 * b + i) % num_queries
            target["boxes"] = torch.tensor([[0.05 + 0.09 * k, 0.5, 0.05, 0.05]])
    return batches


QUERY_BOXES = [[0.05 + 0.09 * k, 0.5, 0.05, 0.05] for k in range(10)]


def run_usage(tmp_path, batches, *, ranked_slots=False):
    monitor = QueryUsageMonitor(top_fraction=0.1, max_share=0.5, ranked_slots=ranked_slots)
    module = FixedQueries(QUERY_BOXES)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        make_trainer(tmp_path, [monitor]).fit(module, train_dataloaders=batches)
    return monitor, health_warnings(record)


def test_query_usage_quiet_when_matches_spread(tmp_path):
    monitor, found = run_usage(tmp_path, spread_batches(10, 20))
    assert found == []
    assert monitor.warned_concentration is False and monitor.warned_overfull is False


def test_query_usage_warns_when_few_slots_take_the_matches(tmp_path):
    # Every object sits on query 3's box: the final layer always matches slot 3 (the flipped
    # "auxiliary" call would pick slot 6 and must not be counted).
    batches = detection_batches(20, box=tuple(QUERY_BOXES[3]))
    _, found = run_usage(tmp_path, batches)
    assert len(found) == 1
    assert "100% of 40 matches went to 1 of 10 query slots ([3])" in found[0]
    assert "9 slots were never matched" in found[0]


def test_query_usage_quiet_on_concentration_when_slots_are_ranked_proposals(tmp_path):
    # Two-stage / mixed query selection: slot 0 holds the best proposal, so a few busy slots are
    # expected; the too-many-objects check still runs.
    batches = detection_batches(20, box=tuple(QUERY_BOXES[3]))
    monitor, found = run_usage(tmp_path, batches, ranked_slots=True)
    assert found == [] and monitor.warned_concentration is False
    crowded = spread_batches(10, 20)
    crowded.batches[4][2][1]["boxes"] = torch.tensor([QUERY_BOXES[0]] * 12)
    crowded.batches[4][2][1]["labels"] = torch.zeros(12, dtype=torch.int64)
    _, found = run_usage(tmp_path / "crowded", crowded, ranked_slots=True)
    assert len(found) == 1 and "more objects than the 10 queries" in found[0]


def test_query_usage_warns_when_images_have_more_objects_than_queries(tmp_path):
    batches = spread_batches(10, 20)
    crowded = batches.batches[4][2][1]
    crowded["boxes"] = torch.tensor([QUERY_BOXES[0]] * 12)
    crowded["labels"] = torch.zeros(12, dtype=torch.int64)
    _, found = run_usage(tmp_path, batches)
    assert len(found) == 1
    expected = "1 training images in epoch 0 have more objects than the 10 queries (up to 12, image id 9)"
    assert expected in found[0]
