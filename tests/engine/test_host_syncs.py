"""Device-to-host synchronizations of a training step, counted on the CPU (`host_syncs.HostSyncCounter`):
per step, one for each matcher call (its cost matrix goes to the host to be solved) and one for the
training-health check (non-finite losses and gradients, one combined flag), nothing else in the
model, the criterion, the module, the callbacks or Lightning's loop, for every member of the family."""

from __future__ import annotations

from collections import Counter

import lightning as L
import pytest
import torch
from host_syncs import HostSyncCounter
from tiny_members import MEMBERS, fit_steps, member_config, member_module

from detr_lab.engine.module import DetectionModule

MATCHER = "detr_lab/models/matcher.py:_match"
GUARD = "detr_lab/engine/health.py:on_before_optimizer_step"
# Paths taken only when the tensors are on the CPU, where there is no device to wait for: the
# deformable attention's CPU kernel and its padding shortcut (`value.device.type == "cpu"`).
CPU_ONLY = (
    "detr_lab/models/attention/kernels/cpu_fast.py:", "detr_lab/models/attention/deformable.py:project_value"
)


class CountingWindow(L.Callback):
    """Counts from the start of each training batch to its end (forward, loss, backward, optimizer step)."""

    def __init__(self, counter: HostSyncCounter, module: DetectionModule) -> None:
        self.counter = counter
        self.matcher_calls = 0
        module.criterion.matcher.register_forward_hook(self._matched)

    def _matched(self, *args) -> None:
        self.matcher_calls += int(self.counter.active)

    def on_train_batch_start(self, *args) -> None:
        self.counter.active = True

    def on_train_batch_end(self, *args) -> None:
        self.counter.active = False


def count_training_syncs(member: str, steps: int = 2) -> tuple[Counter, int]:
    module = member_module(member_config(member))
    counter = HostSyncCounter()
    window = CountingWindow(counter, module)
    with counter:
        trainer = fit_steps(module, steps, [window])
    assert trainer.global_step == steps
    events = Counter({site: n for site, n in counter.events.items() if not site.startswith(CPU_ONLY)})
    return events, window.matcher_calls


@pytest.mark.slow  # a tiny model of each member trains two steps through Lightning
@pytest.mark.parametrize("member", sorted(MEMBERS))
def test_a_training_step_reads_the_device_only_for_matching_and_one_health_check(member):
    events, matcher_calls = count_training_syncs(member)
    assert matcher_calls >= 2 * 2  # the final layer and at least one auxiliary layer, per step
    assert events == Counter({MATCHER: matcher_calls, GUARD: 2}), dict(events)


def test_the_counter_counts_host_reads_of_device_values_only():
    device_values = torch.arange(6.0)
    with HostSyncCounter() as counter:
        counter.active = True
        _ = device_values.sum().item()
        _ = bool(device_values.max() > 2)
        _ = device_values.tolist()
        _ = device_values[device_values > 2]  # boolean mask: a data-dependent size
        _ = torch.unique(device_values)
        host = device_values.cpu()  # the transfer counts, reading its copy does not
        _ = host.sum().item()
        _ = host.tolist()
        _ = torch.tensor([1.0, 2.0]).max().item()  # made from Python data on the host
        _ = device_values[torch.tensor([0, 2])] * 2.0  # integer indexing: no read
        counter.active = False
        _ = device_values.sum().item()  # outside the window
    site = "tests/engine/test_host_syncs.py:test_the_counter_counts_host_reads_of_device_values_only"
    assert counter.events == Counter({site: 6})
