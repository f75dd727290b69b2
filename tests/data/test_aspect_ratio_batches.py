"""AspectRatioBatchSampler (`data.train_batching: aspect_ratio`): training batches of one orientation,
every sample once per epoch, the same batches for the same (seed, epoch), equal batch counts per process."""

import pytest
from lightning.fabric.utilities.data import _replace_dunder_methods
from lightning.pytorch.trainer.states import RunningStage
from lightning.pytorch.utilities.data import _update_dataloader
from torch.utils.data import BatchSampler, DataLoader
from torch.utils.data.distributed import DistributedSampler
from torchdata.stateful_dataloader import StatefulDataLoader

from detr_lab.config import load_config
from detr_lab.data.datamodule import DetectionDataModule
from detr_lab.data.samplers import AspectRatioBatchSampler, EpochSampler, orientation_group

from factories import TINY_RUN_YAML

# Upright (h, w) sizes: landscape, portrait, square (landscape group) and an unreadable header.
SIZES = [(6, 8), (8, 6), (8, 6), (5, 5), (6, 9), (9, 4), (7, 8), None, (8, 7), (4, 6), (3, 9)]
GROUPS = [orientation_group(size) for size in SIZES]


def _batches(epoch: int, seed: int = 3, **share) -> list[list[tuple[int, int]]]:
    sampler = EpochSampler(range(len(SIZES)), seed=seed, **share)
    sampler.set_epoch(epoch)
    return list(AspectRatioBatchSampler(sampler, 3, groups=GROUPS, seed=seed))


def test_orientation_groups():
    assert GROUPS == [0, 1, 1, 0, 0, 1, 0, 2, 1, 0, 0]


def test_batches_hold_one_orientation_and_every_sample_once():
    for epoch in (0, 1):
        batches = _batches(epoch)
        keys = [key for batch in batches for key in batch]
        assert sorted(index for _, index in keys) == list(range(len(SIZES)))
        assert {e for e, _ in keys} == {epoch}
        for batch in batches:
            assert len({GROUPS[index] for _, index in batch}) == 1
        assert all(len(batch) == 3 for batch in batches[:2])  # full batches first
    assert _batches(0) == _batches(0)  # a function of (seed, epoch): a resumed run replays it
    assert _batches(0) != _batches(1)
    assert _batches(0) != _batches(0, seed=4)


def test_equal_batch_counts_per_process_and_lightning_sampler_replaced():
    counts, seen = [], []
    for rank in range(3):
        batches = _batches(2, num_replicas=3, rank=rank)
        counts.append(len(batches))
        seen.extend(index for batch in batches for _, index in batch)
        for batch in batches:
            assert len({GROUPS[index] for _, index in batch}) == 1
        # Lightning under DDP passes a DistributedSampler of its own: the share stays the shuffled one.
        given = DistributedSampler(range(len(SIZES)), num_replicas=3, rank=rank, shuffle=False)
        given.set_epoch(2)
        assert list(AspectRatioBatchSampler(given, 3, groups=GROUPS, seed=3)) == batches
    assert len(set(counts)) == 1, counts
    assert set(seen) == set(range(len(SIZES)))  # (the last share repeats an index, as DistributedSampler)


def test_rejects_drop_last_bad_batch_size_and_groups_of_another_length():
    sampler = EpochSampler(range(len(SIZES)), seed=0)
    with pytest.raises(ValueError, match="drop_last"):
        AspectRatioBatchSampler(sampler, 2, True, groups=GROUPS)
    with pytest.raises(ValueError, match="batch_size"):
        AspectRatioBatchSampler(sampler, 0, groups=GROUPS)
    with pytest.raises(ValueError, match="groups has 2 entries"):
        AspectRatioBatchSampler(sampler, 2, groups=[0, 1])


def test_training_loader_batches_one_orientation(tmp_path):
    config_path = tmp_path / "tiny.yaml"
    config_path.write_text(TINY_RUN_YAML.format(root=tmp_path))
    cfg = load_config(config_path, ["data.synthetic.num_train=10", "data.batch_size=3",
                                    "data.train_batching=aspect_ratio"])
    datamodule = DetectionDataModule(cfg)
    datamodule.prepare_data()
    datamodule.setup("fit")
    orientations = {int(image_id): orientation_group(size) for image_id, size in zip(
        datamodule.train_dataset.image_ids, datamodule.train_dataset.upright_sizes(), strict=True)}
    assert len(set(orientations.values())) == 2  # the synthetic set mixes portrait and landscape
    seen = []
    for images, padding_mask, targets in datamodule.train_dataloader():
        ids = [int(target["image_id"]) for target in targets]
        assert len({orientations[i] for i in ids}) == 1, ids
        assert images.shape[0] == padding_mask.shape[0] == len(ids)
        seen.extend(ids)
    assert sorted(seen) == sorted(orientations)


def test_stateful_loader_resumes_mid_epoch_with_the_same_batches():
    # What a run resumed mid-epoch does: a new loader, given the saved loader state, goes on with the
    # batches the uninterrupted loader would have given.
    class Keys:  # a dataset that returns the (epoch, index) key it is read with
        def __len__(self):
            return len(SIZES)

        def __getitem__(self, key):
            return key

    def loader(epoch: int) -> StatefulDataLoader:
        sampler = EpochSampler(Keys(), seed=5)
        sampler.set_epoch(epoch)
        batch_sampler = AspectRatioBatchSampler(sampler, 3, groups=GROUPS, seed=5)
        return StatefulDataLoader(Keys(), batch_sampler=batch_sampler, collate_fn=list)

    whole = list(loader(1))
    assert len(whole) > 3
    first = loader(1)
    iterator = iter(first)
    taken = [next(iterator) for _ in range(2)]
    state = first.state_dict()
    resumed = loader(1)
    resumed.load_state_dict(state)
    assert taken + list(resumed) == whole


def test_lightning_rebuilds_the_training_loader_around_its_distributed_sampler():
    # What Lightning does to the training loader under DDP: the loader's `sampler` is not a
    # DistributedSampler (the batch sampler holds the EpochSampler), so it re-creates the batch sampler
    # around an unshuffled DistributedSampler of its own, with the saved arguments (groups, seed).
    dataset = list(range(len(SIZES)))
    with _replace_dunder_methods(DataLoader, "dataset"), _replace_dunder_methods(BatchSampler):
        sampler = EpochSampler(dataset, seed=3)
        loader = StatefulDataLoader(dataset, batch_sampler=AspectRatioBatchSampler(
            sampler, 3, groups=GROUPS, seed=3))
    for rank in range(2):
        given = DistributedSampler(dataset, num_replicas=2, rank=rank, shuffle=False)
        given.set_epoch(1)
        rebuilt = _update_dataloader(loader, given, mode=RunningStage.TRAINING)
        assert isinstance(rebuilt.batch_sampler, AspectRatioBatchSampler)
        inner = rebuilt.batch_sampler.sampler
        assert isinstance(inner, EpochSampler)
        assert (inner.rank, inner.num_replicas, inner.epoch) == (rank, 2, 1)
        assert list(rebuilt.batch_sampler) == _batches(1, num_replicas=2, rank=rank)


def test_orientation_grouping_is_the_default_and_skipped_under_the_fixed_size_policy(tmp_path):
    config_path = tmp_path / "tiny.yaml"
    config_path.write_text(TINY_RUN_YAML.format(root=tmp_path))
    cfg = load_config(config_path, ["data.synthetic.num_train=10", "data.batch_size=3"])
    assert cfg.data.train_batching == "aspect_ratio"
    datamodule = DetectionDataModule(cfg)
    datamodule.prepare_data()
    datamodule.setup("fit")
    assert isinstance(datamodule.train_dataloader().batch_sampler, AspectRatioBatchSampler)
    # the rtdetr policy resizes every image to one square: mixed batches, nothing to group
    square = load_config(config_path, ["data.synthetic.num_train=10", "data.batch_size=3",
                                       "data.augment.policy=rtdetr"])
    datamodule = DetectionDataModule(square)
    datamodule.prepare_data()
    datamodule.setup("fit")
    assert not isinstance(datamodule.train_dataloader().batch_sampler, AspectRatioBatchSampler)
    padded = load_config(config_path, ["data.synthetic.num_train=10", "data.train_batching=padded"])
    datamodule = DetectionDataModule(padded)
    datamodule.prepare_data()
    datamodule.setup("fit")
    assert not isinstance(datamodule.train_dataloader().batch_sampler, AspectRatioBatchSampler)
