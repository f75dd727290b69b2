"""Samplers.

`EpochSampler` shuffles the training set as a function of (seed, epoch) only and hands the dataset
`(epoch, index)` keys, so that the dataset can draw each sample's augmentation from (seed, epoch,
index): a run resumed from any checkpoint sees the same order and the same augmentations as the run
that was never interrupted.

`SameSizeBatchSampler` batches evaluation images by their size after the evaluation resize. DETR pads
every image of a batch to the batch's largest size, and padding changes the outputs (the backbone
sees zeros past the image border, and the padding mask is downsampled to the feature maps with
rounding: facebookresearch/detr #217), so with padded batching AP depends on batch size and on how images are
split between processes. Images of one size need no padding; an image whose size is unique goes alone.
On COCO this costs little: most images share a handful of sizes (640 x 480 -> 800 x 1066, ...).

`AspectRatioBatchSampler` (`data.train_batching: aspect_ratio`) batches training images of one
orientation (as torchvision's detection references group by aspect ratio): no portrait image is padded
to a landscape one's width, so training sees images somewhat closer to the way same-size evaluation
does (alone, unpadded). Each image's own random scale still makes its batch padded.
"""

from __future__ import annotations

import copy
from collections.abc import Hashable, Iterable, Iterator, Sequence

import torch.distributed as dist
from torch.utils.data import BatchSampler, Dataset, Sampler
from torch.utils.data.distributed import DistributedSampler


class EpochSampler(DistributedSampler):
    """Yields `(epoch, index)`: the indices of `dataset` in an order drawn from (seed, epoch).

    A `DistributedSampler` (shuffle with `torch.Generator().manual_seed(seed + epoch)`), so Lightning
    keeps it under DDP instead of wrapping it, and calls `set_epoch` at every epoch start. In a single
    process it covers the whole dataset; under torch.distributed, this rank's share (the last share
    padded with repeated indices, as DistributedSampler does). `num_replicas` and `rank` default to
    torch.distributed's (1 and 0 without it).
    """

    def __init__(
        self, dataset: Dataset, *, seed: int, shuffle: bool = True, num_replicas: int | None = None,
        rank: int | None = None,
    ) -> None:
        distributed = dist.is_available() and dist.is_initialized()
        if num_replicas is None:
            num_replicas = dist.get_world_size() if distributed else 1
        if rank is None:
            rank = dist.get_rank() if distributed else 0
        super().__init__(
            dataset,
            num_replicas=num_replicas,
            rank=rank,
            shuffle=shuffle,
            seed=seed,
            drop_last=False,
        )

    def __iter__(self) -> Iterator[tuple[int, int]]:  # type: ignore[override]
        epoch = self.epoch
        for index in super().__iter__():
            yield epoch, index


class SameSizeBatchSampler(BatchSampler):
    """Batches of up to `batch_size` indices from `sampler` whose `sizes` are equal.

    Indices are taken in the sampler's order; a batch is emitted as soon as its size group is full,
    and the partial groups at the end in order of their first index. Under DDP Lightning rebuilds this
    sampler around its DistributedSampler (same keyword arguments), so each process batches its own
    share by size; batches are then split until every process has the same number of batches (the
    loss all-reduces at every step, so unequal counts would hang).

    Args:
        sampler: yields dataset indices (e.g. `SequentialSampler(dataset)`).
        batch_size: most indices per batch.
        drop_last: must be False (evaluation sees every image).
        sizes: per dataset index a hashable size key, e.g. (h, w) after the evaluation resize.
    Raises:
        ValueError: `drop_last` True, or a batch size below 1.
    """

    def __init__(
        self, sampler: Sampler[int] | Iterable[int], batch_size: int, drop_last: bool = False, *,
        sizes: Sequence[Hashable],
    ) -> None:
        if drop_last:
            raise ValueError("SameSizeBatchSampler is for evaluation: drop_last must be False")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.sampler = sampler
        self.batch_size = int(batch_size)
        self.drop_last = False
        self.sizes = list(sizes)

    def _group(self, indices: Iterable[int]) -> list[list[int]]:
        groups: dict[Hashable, list[int]] = {}
        batches: list[list[int]] = []
        for index in indices:
            group = groups.setdefault(self.sizes[index], [])
            group.append(index)
            if len(group) == self.batch_size:
                batches.append(list(group))
                group.clear()
        batches.extend(list(group) for group in groups.values() if group)
        return batches

    def _batches(self) -> list[list[int]]:
        batches = self._group(self.sampler)
        # Under DDP every process must run as many batches as the others (the loss all-reduces its
        # box count at every step): split this share's largest batches until it has the most any
        # process has. Every share holds the same number of indices, so this always succeeds.
        if isinstance(self.sampler, DistributedSampler) and self.sampler.num_replicas > 1:
            ranks = range(self.sampler.num_replicas)
            target = max(len(self._group(_share(self.sampler, rank))) for rank in ranks)
            batches = _split_largest(batches, target)
        return batches

    def __iter__(self) -> Iterator[list[int]]:
        yield from self._batches()

    def __len__(self) -> int:
        return len(self._batches())


def _split_largest(batches: list[list], target: int) -> list[list]:
    """`batches` with the largest split in two (first half rounded up) until there are `target`."""
    batches = list(batches)
    while len(batches) < target:
        largest = max(range(len(batches)), key=lambda i: len(batches[i]))
        batch = batches[largest]
        half = (len(batch) + 1) // 2
        batches[largest : largest + 1] = [batch[:half], batch[half:]]
    return batches


def _share(sampler: DistributedSampler, rank: int) -> list:
    """The indices `sampler` yields on process `rank` (same epoch, seed and padding)."""
    other = copy.copy(sampler)
    other.rank = rank
    return list(iter(other))


def orientation_group(size: tuple[int, int] | None) -> int:
    """The aspect-ratio group of an image of upright size (h, w): 0 landscape or square (w >= h),
    1 portrait, 2 unknown (a header that could not be read)."""
    if size is None:
        return 2
    height, width = size
    return 0 if width >= height else 1


class AspectRatioBatchSampler(BatchSampler):
    """Training batches of up to `batch_size` `(epoch, index)` keys of `sampler` whose `groups` are equal.

    Keys are taken in the sampler's order (drawn from (seed, epoch), see `EpochSampler`); a batch is
    emitted as soon as its group is full, and the partial batches of the groups at the end, in order of
    their first key, so every sample of the epoch is seen once and the batches are a function of
    (seed, epoch): a resumed run replays them. Under DDP each process groups its own share, and its
    largest batches are split until every process has as many batches as the most any has (as
    `SameSizeBatchSampler` does). Lightning rebuilds this sampler around a
    DistributedSampler of its own (same keyword arguments); that one is replaced here by an
    `EpochSampler` with `seed`, so that each process still shuffles its share by (seed, epoch).

    Args:
        sampler: an `EpochSampler` (or a DistributedSampler, see above).
        batch_size: most keys per batch.
        drop_last: must be False.
        groups: per dataset index its group, e.g. `orientation_group` of the upright size.
        seed: the `EpochSampler` seed (used when Lightning passes its own sampler).
    Raises:
        ValueError: `drop_last` True, a batch size below 1, or `groups` not one per dataset index.
    """

    def __init__(
        self, sampler: Sampler, batch_size: int, drop_last: bool = False, *, groups: Sequence[Hashable],
        seed: int = 0,
    ) -> None:
        if drop_last:
            raise ValueError("AspectRatioBatchSampler keeps every sample: drop_last must be False")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if isinstance(sampler, DistributedSampler) and not isinstance(sampler, EpochSampler):
            epoch = sampler.epoch
            sampler = EpochSampler(sampler.dataset, seed=seed, num_replicas=sampler.num_replicas,
                                   rank=sampler.rank)
            sampler.set_epoch(epoch)
        dataset = getattr(sampler, "dataset", None)
        if dataset is not None and len(groups) != len(dataset):
            raise ValueError(f"groups has {len(groups)} entries for a dataset of {len(dataset)} samples")
        self.sampler = sampler
        self.batch_size = int(batch_size)
        self.drop_last = False
        self.groups = list(groups)
        self.seed = int(seed)

    def set_epoch(self, epoch: int) -> None:
        """Forwarded to the sampler (Lightning calls it at every epoch start)."""
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)

    def _group(self, keys: Iterable) -> list[list]:
        pending: dict[Hashable, list] = {}
        batches: list[list] = []
        for key in keys:
            index = key[1] if isinstance(key, tuple) else key
            group = pending.setdefault(self.groups[index], [])
            group.append(key)
            if len(group) == self.batch_size:
                batches.append(list(group))
                group.clear()
        batches.extend(list(group) for group in pending.values() if group)
        return batches

    def _batches(self) -> list[list]:
        batches = self._group(self.sampler)
        # Under DDP every process must run as many steps as the others (gradients all-reduce at every
        # step): split this share's largest batches until it has the most any process has.
        if isinstance(self.sampler, DistributedSampler) and self.sampler.num_replicas > 1:
            ranks = range(self.sampler.num_replicas)
            batches = _split_largest(batches, max(len(self._group(_share(self.sampler, r))) for r in ranks))
        return batches

    def __iter__(self) -> Iterator[list]:
        yield from self._batches()

    def __len__(self) -> int:
        return len(self._batches())
