"""DEIM's batch mixup (Dense O2O, Huang et al. 2025), applied by the rtdetr policy's training collate.

Followed: ShihuaHuang95/DEIM, engine/data/dataloader.py (`BatchImageCollateFunction.apply_mixup`, with
`mixup_prob` and `mixup_epochs` from configs/base/deim.yml and the model configs). Written anew; no
official code is copied.

The rule. When a batch is mixed (probability `prob`, epoch in [start_epoch, stop_epoch)), one ratio
beta = round(uniform(0.45, 0.55), 6) serves the whole batch, and image i becomes
beta * image_i + (1 - beta) * image_(i-1), the previous image of the batch (image 0 takes the last
one: the official `images.roll(shifts=1, dims=0)`). Target i keeps its own boxes and labels and takes
those of image i - 1 after them (`torch.cat([own, previous])`); its other keys (`image_id`, sizes)
stay its own. Images must share one size (the rtdetr policy resizes every image to the square), so
the normalized cxcywh boxes of both images stay valid on the blend. The official collate blends
pixels / 255, these are normalized with mean / std; the blend commutes with that affine map (the
weights sum to 1), so the result is the same. The official targets also carry `area` (concatenated
alike) and per-box blend weights `mixup` (beta for its own boxes, 1 - beta for the others), which no
official loss reads; neither is produced here.

One deliberate difference: a batch of one image is left as it is (the official roll would blend the
image with itself and repeat every box, two identical targets for one-to-one matching).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

MIXUP_RATIO = (0.45, 0.55)  # the official range of beta, the weight of each image's own pixels
_MIXUP_STREAM = 1  # SeedSequence spawn key: apart from the collate's batch-size draw


class BatchMixup:
    """DEIM's mixup of a batch `(images [B, 3, H, W], targets)`; see the module docstring.

    The draws (whether, beta) come from a generator seeded by (seed, epoch, the batch's image ids), so
    DataLoader workers and resumed runs mix exactly the batches of an uninterrupted run.

    Args:
        prob: probability that a batch in the window is mixed.
        start_epoch, stop_epoch: the window [start_epoch, stop_epoch) of 0-based epochs (stop None: no
            end). A batch of unknown epoch (None) is never mixed.
        seed: the run's seed.
    """

    def __init__(
        self, prob: float, start_epoch: int = 0, stop_epoch: int | None = None, seed: int = 0
    ) -> None:
        if not 0.0 <= prob <= 1.0:
            raise ValueError(f"prob must be in [0, 1], got {prob}")
        if start_epoch < 0:
            raise ValueError(f"start_epoch must be >= 0, got {start_epoch}")
        self.prob, self.start_epoch, self.stop_epoch = float(prob), int(start_epoch), stop_epoch
        self.seed = int(seed)

    def in_window(self, epoch: int | None) -> bool:
        if epoch is None or epoch < self.start_epoch:
            return False
        return self.stop_epoch is None or epoch < self.stop_epoch

    def ratio_for(self, epoch: int | None, image_ids: Sequence[int]) -> float | None:
        """beta for this batch, or None when it is not mixed."""
        if len(image_ids) < 2 or not self.in_window(epoch):
            return None
        entropy = [self.seed % 2**32, epoch + 1, *(i % 2**64 for i in image_ids)]
        rng = np.random.default_rng(np.random.SeedSequence(entropy, spawn_key=(_MIXUP_STREAM,)))
        if not rng.random() < self.prob:
            return None
        return round(float(rng.uniform(*MIXUP_RATIO)), 6)

    def __call__(
        self, images: Tensor, targets: list[dict[str, Tensor]], epoch: int | None
    ) -> tuple[Tensor, list[dict[str, Tensor]]]:
        """`images [B, 3, H, W]`, targets with `boxes [N_i, 4]` normalized cxcywh, `labels [N_i]` and
        `image_id` -> the mixed batch (new tensors and dicts; the inputs are not changed), or the
        inputs themselves when the batch is not mixed. Mixed target i has N_i + N_(i-1) boxes."""
        beta = self.ratio_for(epoch, [int(target["image_id"]) for target in targets])
        if beta is None:
            return images, targets
        mixed = images * beta + images.roll(shifts=1, dims=0) * (1.0 - beta)
        previous = targets[-1:] + targets[:-1]
        out = []
        for own, other in zip(targets, previous, strict=True):
            target = dict(own)
            target["boxes"] = torch.cat([own["boxes"], other["boxes"]])
            target["labels"] = torch.cat([own["labels"], other["labels"]])
            out.append(target)
        return mixed, out
