from __future__ import annotations

import math

import pytest
import torch

from detr_lab.models.position import LearnedPositionEncoding, SinePositionEncoding


def _expected_sine(
    position: float, extent: float, channel: int, num_feats: int, offset: float = 0.0
) -> float:
    angle = (position + offset) / (extent + 1e-6) * 2 * math.pi / 10000 ** (2 * (channel // 2) / num_feats)
    return math.sin(angle) if channel % 2 == 0 else math.cos(angle)


@pytest.mark.parametrize("offset", [0.0, -0.5])
def test_sine_values_by_formula(offset):
    num_feats, height, width = 8, 3, 5
    pos = SinePositionEncoding(num_feats, offset=offset)(torch.zeros(1, height, width, dtype=torch.bool))
    assert tuple(pos.shape) == (1, 2 * num_feats, height, width)
    for y, x in [(0, 0), (1, 3), (2, 4)]:
        for channel in range(num_feats):
            # first half encodes the row, second half the column; positions are 1-based
            expected_y = _expected_sine(y + 1, height, channel, num_feats, offset)
            expected_x = _expected_sine(x + 1, width, channel, num_feats, offset)
            assert pos[0, channel, y, x].item() == pytest.approx(expected_y, abs=1e-5)
            assert pos[0, num_feats + channel, y, x].item() == pytest.approx(expected_x, abs=1e-5)


def test_sine_ignores_padding_extent():
    encoding = SinePositionEncoding(16)
    padded = torch.zeros(1, 6, 9, dtype=torch.bool)
    padded[:, 4:, :] = True
    padded[:, :, 7:] = True
    alone = encoding(torch.zeros(1, 4, 7, dtype=torch.bool))
    torch.testing.assert_close(encoding(padded)[..., :4, :7], alone)


def test_sine_without_normalization_uses_raw_positions():
    pos = SinePositionEncoding(2, normalize=False)(torch.zeros(1, 1, 3, dtype=torch.bool))
    # channel 2 is the x sine at frequency 1: sin(x + 1)
    assert pos[0, 2, 0].tolist() == pytest.approx([math.sin(1), math.sin(2), math.sin(3)], abs=1e-6)


def test_learned_layout_and_limit():
    torch.manual_seed(0)
    encoding = LearnedPositionEncoding(4, max_size=6)
    pos = encoding(torch.zeros(2, 3, 5, dtype=torch.bool))
    assert tuple(pos.shape) == (2, 8, 3, 5)
    torch.testing.assert_close(pos[1, :4, 2, 3], encoding.col_embed.weight[3])  # first half: column
    torch.testing.assert_close(pos[0, 4:, 2, 3], encoding.row_embed.weight[2])  # second half: row
    with pytest.raises(ValueError, match="up to 6x6, got 3x7"):
        encoding(torch.zeros(1, 3, 7, dtype=torch.bool))
