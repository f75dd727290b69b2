"""The deformable attention core benchmark helpers, on tiny shapes."""

from __future__ import annotations

import pytest
import torch

from detr_lab.benchmark.deformable_core import benchmark_core, core_inputs
from detr_lab.benchmark.machine import describe_machine

TINY = ((6, 8), (3, 4))


def test_encoder_inputs_have_one_query_per_position_around_its_pixel_centre():
    inputs = core_inputs("encoder", spatial_shapes=TINY, heads=2, head_dim=4, points=2)
    assert inputs["value"].shape == (1, 60, 2, 4)
    locations = inputs["sampling_locations"]
    assert locations.shape == (1, 60, 2, 2, 2, 2)
    assert inputs["level_start_index"].tolist() == [0, 48]
    # Query 9 is pixel (row 1, col 1) of level 0; on level 0 its points scatter around that centre.
    centre = torch.tensor([1.5 / 8, 1.5 / 6])
    spread = (locations[0, 9, :, 0] - centre).abs().max()
    assert 0 < spread < 1.0
    weights = inputs["attention_weights"]
    torch.testing.assert_close(weights.sum((-1, -2)), torch.ones(1, 60, 2))


def test_benchmark_rows_compare_with_the_reference():
    rows = benchmark_core(["reference", "cpu_fast"], "decoder", spatial_shapes=TINY, warmup=0, runs=2)
    assert [(r["pass"], r["impl"]) for r in rows] == [
        ("forward", "reference"),
        ("forward", "cpu_fast"),
        ("forward+backward", "reference"),
        ("forward+backward", "cpu_fast"),
    ]
    for reference, fast in (rows[0:2], rows[2:4]):  # speed-up: reference median / this median
        assert reference["speedup"] == 1.0
        assert fast["speedup"] == pytest.approx(reference["median_ms"] / fast["median_ms"])
    info = describe_machine()
    assert info["torch_threads"] == torch.get_num_threads() and info["cpu_model"]
