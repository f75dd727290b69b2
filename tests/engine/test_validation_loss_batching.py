"""`val/loss` and the `val/<term>` values do not depend on the validation batch size (issue #25, kind 6).

Validation logs the mean over images of each image's loss alone (`per_image_losses`). The criterion on
a whole batch normalizes by the batch's box count and averages the classification term over the
batch's queries, so its mean over batches changed with the batch size; the tests below check that it
does, so that they can tell the two apart.
"""

from __future__ import annotations

import pytest
import torch

from detr_lab.config import load_config
from detr_lab.data.datamodule import DetectionDataModule
from detr_lab.engine.module import DetectionModule
from detr_lab.engine.trainer import build_trainer
from detr_lab.models.build import build_criterion, build_model
from detr_lab.models.criterion import image_outputs, per_image_losses

from factories import TINY_RUN_YAML, tiny_overrides

# Four 64 x 64 images holding 2, 0, 3 and 1 objects.
COUNTS = (2, 0, 3, 1)
FAMILIES = {
    "detr": ("configs/detr_r50.yaml", []),  # softmax, "no object" weight
    "two_stage": ("configs/deformable_refine_two_stage.yaml", ["model.hidden_dim=64"]),  # sigmoid, proposals
    "dino": ("configs/dino_4scale.yaml", ["model.hidden_dim=64", "model.ffn_dim=64"]),
    "dfine": ("configs/dfine_n.yaml", []),  # union matching, FGL and DDF
}
# The tiny model's keys that a family keeps from its config (D-FINE: its HGNetv2 backbone and width).
KEEP = {"dfine": {"backbone__name": None, "hidden_dim": None, "ffn_dim": None}}


def _batch() -> tuple[torch.Tensor, list[dict]]:
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(len(COUNTS), 3, 64, 64, generator=generator)
    targets = []
    for count in COUNTS:
        centers = 0.25 + 0.5 * torch.rand(count, 2, generator=generator)
        sizes = 0.1 + 0.3 * torch.rand(count, 2, generator=generator)
        labels = torch.randint(0, 3, (count,), generator=generator)
        targets.append({"labels": labels, "boxes": torch.cat([centers, sizes], dim=1)})
    return images, targets


def _split_means(losses_of, splits: list[list[int]]) -> dict[str, float]:
    """Per value, the mean over batches (each weighted by its image count, as Lightning averages
    `self.log(..., batch_size=len(batch))` over an epoch); `losses_of(split)` is called once per batch."""
    sums: dict[str, float] = {}
    for split in splits:
        for name, value in losses_of(split).items():
            sums[name] = sums.get(name, 0.0) + len(split) * float(value)
    count = sum(len(split) for split in splits)
    return {name: total / count for name, total in sums.items()}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_per_image_losses_do_not_depend_on_the_batch_split(family):
    base, extra = FAMILIES[family]
    changes = {"num_classes": 3, "num_heads": 2, "dropout": 0.0, "num_queries": 7, **KEEP.get(family, {})}
    cfg = load_config(base, tiny_overrides(*extra, **changes))
    torch.manual_seed(0)
    model = build_model(cfg.model).eval()
    criterion = build_criterion(cfg.model, cfg.loss)
    images, targets = _batch()
    with torch.no_grad():
        cache = {}

        def outputs_of(split):  # eval mode, no padding: an image's outputs do not depend on its batch
            if tuple(split) not in cache:
                cache[tuple(split)] = model(images[split], torch.zeros(len(split), 64, 64, dtype=torch.bool))
            return cache[tuple(split)]

        def per_image(split):
            return per_image_losses(criterion, outputs_of(split), [targets[i] for i in split])

        def whole_batch(split):
            return criterion(outputs_of(split), [targets[i] for i in split])

        whole = per_image([0, 1, 2, 3])
        names = [name for name in criterion.weight_dict if name in whole]
        assert "loss_bbox" in names and "loss_giou" in names and len(names) > 3
        for splits in ([[0], [1], [2], [3]], [[0, 1], [2, 3]], [[0, 1, 2], [3]]):
            means = _split_means(per_image, splits)
            for name in names:
                assert means[name] == pytest.approx(float(whole[name]), rel=1e-4), (splits, name)
        # The whole-batch criterion, averaged the same way, moves with the split (box-count normalizer).
        pairs = _split_means(whole_batch, [[0, 1], [2, 3]])
        singles = _split_means(whole_batch, [[0], [1], [2], [3]])
        assert max(abs(pairs[name] - singles[name]) for name in names) > 1e-3

def test_image_outputs_slices_the_batch_dimension_only():
    outputs = {"pred_logits": torch.arange(24.0).view(2, 3, 4), "scale": torch.tensor([0.5]),
               "aux_outputs": [{"pred_boxes": torch.arange(8.0).view(2, 1, 4)}], "name": "x"}
    second = image_outputs(outputs, 1, 2)
    assert torch.equal(second["pred_logits"], outputs["pred_logits"][1:2])
    assert torch.equal(second["aux_outputs"][0]["pred_boxes"], outputs["aux_outputs"][0]["pred_boxes"][1:2])
    assert torch.equal(second["scale"], outputs["scale"]) and second["name"] == "x"
    with pytest.raises(ValueError, match="dn_meta"):
        image_outputs({**outputs, "dn_meta": object()}, 0, 2)


def test_val_loss_does_not_depend_on_the_batch_size(tmp_path):
    # Six validation images resized to one size (the rtdetr policy's square), so that same-size
    # batching fills every batch: 6 x 1, 3 x 2, 2 x 3 and 4 + 2 images.
    config_path = tmp_path / "tiny.yaml"
    config_path.write_text(TINY_RUN_YAML.format(root=tmp_path))
    square = ["data.synthetic.num_val=6", "data.augment.policy=rtdetr", "data.augment.square_size=64",
              "trainer.summary=false"]
    torch.manual_seed(0)
    cfg = load_config(config_path, square)
    datamodule = DetectionDataModule(cfg)
    weights = DetectionModule(cfg, datamodule.category_ids, datamodule.class_names).model.state_dict()
    logged = {}
    for batch_size in (1, 2, 3, 4):
        cfg = load_config(config_path, [*square, f"data.batch_size={batch_size}"])
        datamodule = DetectionDataModule(cfg)
        module = DetectionModule(cfg, datamodule.category_ids, datamodule.class_names)
        module.model.load_state_dict(weights)
        trainer = build_trainer(cfg, progress_bar=False, loggers=False)
        logged[batch_size] = trainer.validate(module, datamodule=datamodule, verbose=False)[0]
    for batch_size in (2, 3, 4):
        for name in ("val/loss", "val/loss_ce", "val/loss_bbox", "val/loss_giou", "val/loss_ce_0"):
            assert logged[batch_size][name] == pytest.approx(logged[1][name], rel=1e-4), (batch_size, name)
