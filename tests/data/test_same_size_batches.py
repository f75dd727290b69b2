"""SameSizeBatchSampler: batches hold one size only, every index once, full groups first emitted in order."""

import pytest
from torch.utils.data import SequentialSampler
from torch.utils.data.distributed import DistributedSampler

from detr_lab.data.samplers import SameSizeBatchSampler


def test_batches_hold_one_size_and_every_index_once():
    sizes = [(8, 10), (8, 10), (6, 10), (8, 10), (6, 10), (9, 9), (8, 10), (8, 10)]
    sampler = SameSizeBatchSampler(SequentialSampler(range(len(sizes))), 3, sizes=sizes)
    batches = list(sampler)
    assert batches == [[0, 1, 3], [6, 7], [2, 4], [5]]
    assert len(sampler) == len(batches)
    for batch in batches:
        assert len({sizes[i] for i in batch}) == 1


@pytest.mark.parametrize("replicas", [2, 3])
def test_follows_a_distributed_share_with_equal_batch_counts(replicas):
    # Rank 0 gets sizes 1, 1, 1, 1 (one batch of 4), rank 1 sizes 2, 3, 2, 3 (two batches) before
    # balancing: every rank must run as many batches as the others (the loss all-reduces per step).
    sizes = [1, 2, 1, 3, 1, 2, 1, 3, 4, 5, 6, 1]
    seen, counts = [], []
    for rank in range(replicas):
        share = DistributedSampler(range(len(sizes)), num_replicas=replicas, rank=rank, shuffle=False)
        sampler = SameSizeBatchSampler(share, 4, sizes=sizes)
        batches = list(sampler)
        counts.append(len(batches))
        assert len(sampler) == len(batches)
        for batch in batches:
            assert len({sizes[i] for i in batch}) == 1
            seen.extend(batch)
    assert len(set(counts)) == 1, counts
    assert sorted(set(seen)) == list(range(len(sizes)))


def test_rejects_drop_last_and_bad_batch_size():
    with pytest.raises(ValueError, match="drop_last"):
        SameSizeBatchSampler(range(3), 2, True, sizes=[1, 1, 1])
    with pytest.raises(ValueError, match="batch_size"):
        SameSizeBatchSampler(range(3), 0, sizes=[1, 1, 1])


def test_lightning_rebuilds_it_around_a_distributed_sampler():
    # What Lightning does to a validation loader under DDP: re-create the batch sampler around a
    # DistributedSampler with the saved constructor arguments (so `sizes` survives).
    from lightning.fabric.utilities.data import _replace_dunder_methods
    from lightning.pytorch.trainer.states import RunningStage
    from lightning.pytorch.utilities.data import _update_dataloader
    from torch.utils.data import BatchSampler, DataLoader

    sizes = [(1, 1), (2, 2), (2, 2), (1, 1), (2, 2), (3, 3)]
    data = list(range(len(sizes)))
    with _replace_dunder_methods(DataLoader, "dataset"), _replace_dunder_methods(BatchSampler):
        loader = DataLoader(data, batch_sampler=SameSizeBatchSampler(SequentialSampler(data), 2, sizes=sizes))
    seen = []
    for rank in range(2):
        share = DistributedSampler(data, num_replicas=2, rank=rank, shuffle=False)
        rebuilt = _update_dataloader(loader, share, mode=RunningStage.VALIDATING)
        assert isinstance(rebuilt.batch_sampler, SameSizeBatchSampler)
        for batch in rebuilt:
            assert len({sizes[int(i)] for i in batch}) == 1
            seen.extend(int(i) for i in batch)
    assert sorted(seen) == data
