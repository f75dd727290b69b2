"""The export proof's query pairing (`detr_lab.export.verify`): rows of near-tied queries that come out
in another order pass, with the count reported; anything else still fails."""

from __future__ import annotations

import types

import torch
from torch import nn

from detr_lab.export.verify import VerifyReport, _compare, aligned_differences


def outputs(seed: int, batch: int = 2, queries: int = 6, classes: int = 3) -> dict:
    generator = torch.Generator().manual_seed(seed)
    return {"pred_logits": torch.randn(batch, queries, classes, generator=generator),
            "pred_boxes": torch.rand(batch, queries, 4, generator=generator)}


class Fixed(nn.Module):
    """A 'model' and a 'runtime' that return given outputs whatever the images."""

    def __init__(self, result: dict) -> None:
        super().__init__()
        self.result = result
        self.metadata = types.SimpleNamespace(traced_size=None)

    def forward(self, images, padding_mask):
        return self.result


def swapped(result: dict, image: int, a: int, b: int) -> dict:
    moved = {key: value.clone() for key, value in result.items()}
    for key in moved:
        moved[key][image, [a, b]] = result[key][image, [b, a]]
    return moved


def compare(got: dict, expected: dict):
    images, mask = torch.zeros(2, 3, 8, 8), torch.zeros(2, 8, 8, dtype=torch.bool)
    return _compare(Fixed(expected), Fixed(got), images, mask, "case", 1e-4)


def test_rows_in_another_order_pass_and_are_counted():
    expected = outputs(0)
    got = swapped(expected, image=1, a=2, b=4)
    got["pred_logits"] = got["pred_logits"] + 1e-6  # rounding
    case = compare(got, expected)
    assert case.reordered == 2 and case.logits_diff < 2e-6 and case.boxes_diff == 0.0
    report = VerifyReport(1e-4, cases=[case])
    assert report.passed and "2 query rows in another order" in report.text()


def test_outputs_that_differ_in_more_than_the_order_fail():
    expected = outputs(0)
    got = swapped(expected, image=0, a=0, b=5)
    got["pred_boxes"][0, 3, 1] += 0.01  # one box moved
    case = compare(got, expected)
    assert case.reordered == 2 and abs(case.boxes_diff - 0.01) < 1e-6
    assert not VerifyReport(1e-4, cases=[case]).passed
    # other outputs altogether: no pairing brings them within the tolerance
    assert not VerifyReport(1e-4, cases=[compare(outputs(1), expected)]).passed


def test_rows_in_the_same_order_are_compared_as_they_are():
    expected = outputs(0)
    got = {key: value + 2e-4 for key, value in expected.items()}
    case = compare(got, expected)  # beyond the tolerance and in order: nothing is paired away
    assert case.reordered == 0 and abs(case.logits_diff - 2e-4) < 1e-6
    assert aligned_differences(expected, expected) == (0.0, 0.0, 0)
