"""DEIM's batch mixup (`data.augment.mixup`): the official formula on known tensors, every box and label
kept, the epoch window, the collate unchanged where no batch is mixed, and reproducible draws."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from detr_lab.data.collate import SquareMultiScaleCollate
from detr_lab.data.mixup import MIXUP_RATIO, BatchMixup


def _batch(sizes=(2, 0, 3, 1), side: int = 16, seed: int = 0):
    """Images `[B, 3, side, side]` and targets with `sizes[i]` boxes labelled 10 * i + j."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.rand((len(sizes), 3, side, side), generator=generator)
    targets = []
    for i, count in enumerate(sizes):
        centres = torch.rand((count, 2), generator=generator) * 0.5 + 0.25
        boxes = torch.cat([centres, torch.full((count, 2), 0.2)], 1)
        targets.append({"boxes": boxes, "labels": torch.arange(count) + 10 * i,
                        "image_id": torch.tensor(100 + i), "orig_size": torch.tensor([side, side]),
                        "size": torch.tensor([side, side])})
    return images, targets


def _official(images: torch.Tensor, targets: list[dict], beta: float):
    """DEIM's `apply_mixup` once it has drawn beta: roll the batch by one, blend, append the boxes."""
    mixed = images.roll(shifts=1, dims=0).mul_(1.0 - beta).add_(images.mul(beta))
    pairs = list(zip(targets, targets[-1:] + targets[:-1], strict=True))
    boxes = [torch.cat([own["boxes"], other["boxes"]]) for own, other in pairs]
    labels = [torch.cat([own["labels"], other["labels"]]) for own, other in pairs]
    return mixed, boxes, labels


def test_mixup_is_the_official_blend_and_keeps_every_box_and_label():
    images, targets = _batch()
    kept = [{key: value.clone() for key, value in target.items()} for target in targets]
    mixup = BatchMixup(prob=1.0, seed=3)
    beta = mixup.ratio_for(7, [100, 101, 102, 103])
    assert MIXUP_RATIO[0] <= beta <= MIXUP_RATIO[1] and beta == round(beta, 6)
    mixed, out = mixup(images, targets, epoch=7)
    ref_images, ref_boxes, ref_labels = _official(images.clone(), targets, beta)
    torch.testing.assert_close(mixed, ref_images, rtol=0, atol=1e-6)
    # Image 0 blends with the last image, image i with image i - 1: by hand for two pixels.
    torch.testing.assert_close(mixed[0, :, 0, 0], beta * images[0, :, 0, 0] + (1 - beta) * images[3, :, 0, 0])
    torch.testing.assert_close(mixed[2, :, 5, 9], beta * images[2, :, 5, 9] + (1 - beta) * images[1, :, 5, 9])
    # Labels: own first, then the previous image's; counts 2 + 1, 0 + 2, 3 + 0, 1 + 3.
    assert [t["labels"].tolist() for t in out] == [[0, 1, 30], [0, 1], [20, 21, 22], [30, 20, 21, 22]]
    for target, boxes, labels in zip(out, ref_boxes, ref_labels, strict=True):
        assert torch.equal(target["boxes"], boxes) and torch.equal(target["labels"], labels)
        assert ((target["boxes"] >= 0) & (target["boxes"] <= 1)).all()
    assert [int(t["image_id"]) for t in out] == [100, 101, 102, 103]  # each keeps its own id and sizes
    for target, before in zip(targets, kept, strict=True):  # the inputs are left as they were
        assert all(torch.equal(target[key], before[key]) for key in before)


def test_mixup_window_probability_and_reproducible_draws():
    mixup = BatchMixup(prob=1.0, start_epoch=2, stop_epoch=4, seed=0)
    ids = [5, 6]
    assert [mixup.ratio_for(epoch, ids) is not None for epoch in range(6)] == [False, False, True, True,
                                                                                False, False]
    assert mixup.ratio_for(None, ids) is None  # unknown epoch: never
    assert mixup.ratio_for(2, [5]) is None  # one image: nothing to mix with, left alone
    half = BatchMixup(prob=0.5, seed=1)
    draws = [half.ratio_for(epoch, [i, i + 1]) for epoch in range(10) for i in range(100)]
    assert 0.45 < np.mean([beta is not None for beta in draws]) < 0.55
    betas = [beta for beta in draws if beta is not None]
    assert min(betas) >= 0.45 and max(betas) <= 0.55 and max(betas) - min(betas) > 0.09
    assert draws == [half.ratio_for(epoch, [i, i + 1]) for epoch in range(10) for i in range(100)]
    other_seed = BatchMixup(prob=0.5, seed=2)
    assert draws != [other_seed.ratio_for(epoch, [i, i + 1]) for epoch in range(10) for i in range(100)]
    never = BatchMixup(prob=0.0)
    assert all(never.ratio_for(epoch, [i, i + 1]) is None for epoch in range(5) for i in range(50))
    with pytest.raises(ValueError, match="prob must be in"):
        BatchMixup(prob=1.5)


def test_mixup_draws_do_not_follow_the_batch_size_draws():
    """Mixup and the batch-side draw are seeded by the same (seed, epoch, ids) but separate streams."""
    collate = SquareMultiScaleCollate([480, 800], seed=0, mixup=BatchMixup(prob=0.5, seed=0))
    pairs = [(collate.size_for(epoch, [i, i + 1]), collate.mixup.ratio_for(epoch, [i, i + 1]) is not None)
             for epoch in range(4) for i in range(200)]
    by_size = {size: np.mean([mixed for side, mixed in pairs if side == size]) for size in (480, 800)}
    assert all(0.4 < rate < 0.6 for rate in by_size.values()), by_size


def _samples(epoch: int | None, sizes=(2, 1, 3)):
    images, targets = _batch(sizes)
    out = []
    for image, target in zip(images, targets, strict=True):
        if epoch is not None:
            target = {**target, "epoch": torch.tensor(epoch)}
        out.append((image, target))
    return out


def test_collate_mixes_before_its_resize_and_draws_the_same_sizes():
    plain = SquareMultiScaleCollate([8, 24], stop_epoch=5, seed=4)
    mixing = SquareMultiScaleCollate([8, 24], stop_epoch=5, seed=4, mixup=BatchMixup(1.0, 1, 3, seed=4))
    for epoch in range(6):
        images, mask, targets = mixing(_samples(epoch))
        ref_images, _, ref_targets = plain(_samples(epoch))
        assert images.shape == ref_images.shape and not mask.any()  # mixup leaves the size draw alone
        assert all("epoch" not in target for target in targets)
        if not 1 <= epoch < 3:  # outside the window: exactly the collate without mixup
            torch.testing.assert_close(images, ref_images, rtol=0, atol=0)
            assert [t["labels"].tolist() for t in targets] == [t["labels"].tolist() for t in ref_targets]
            continue
        raw, raw_targets = _batch((2, 1, 3))
        beta = mixing.mixup.ratio_for(epoch, [100, 101, 102])
        expected, _, labels = _official(raw, raw_targets, beta)
        if images.shape[-1] != expected.shape[-1]:
            expected = F.interpolate(expected, size=images.shape[-2:])  # nearest, after the blend
        torch.testing.assert_close(images, expected, rtol=0, atol=1e-6)
        assert [t["labels"].tolist() for t in targets] == [lab.tolist() for lab in labels]
        assert [len(t["boxes"]) for t in targets] == [2 + 3, 1 + 2, 3 + 1]
        assert all(t["size"].tolist() == list(images.shape[-2:]) for t in targets)
