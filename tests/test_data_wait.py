"""`DataWait`: the share of step time spent between training batches, from the batch hooks' clock."""

from __future__ import annotations

import pytest

from detr_lab.benchmark import data_wait
from detr_lab.benchmark.data_wait import DataWait


def test_data_wait_share_counts_the_gaps_between_batches_after_the_warm_up(monkeypatch):
    clock = iter([0.0, 1.0,  # batch 0 (warm-up): left out
                  1.5, 2.5,  # batch 1 and the wait before it (warm-up): left out
                  3.0, 4.0,  # wait 0.5, batch 1.0
                  5.0, 6.0,  # wait 1.0, batch 1.0
                  7.0, 7.5])  # a new epoch: its first gap is not a wait; batch 0.5
    monkeypatch.setattr(data_wait.time, "perf_counter", lambda: next(clock))
    wait = DataWait(skip=2)
    for index in range(5):
        if index == 4:
            wait.on_train_epoch_end(None, None)
        wait.on_train_batch_start(None, None, None, index)
        wait.on_train_batch_end(None, None, None, None, index)
    assert wait.waits == [0.5, 1.0]
    assert wait.steps == [1.0, 1.0, 0.5]
    assert wait.share() == pytest.approx(1.5 / 4.0)
    assert wait.summary()["batches"] == 3 and wait.summary()["waits"] == 2
    assert DataWait().share() == 0.0
