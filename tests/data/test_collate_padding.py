"""collate_detection: bottom/right zero padding, padding mask True on the padding, targets untouched."""

from __future__ import annotations

import pytest
import torch

from detr_lab.data.collate import collate_detection, pad_images


def test_pads_bottom_right_and_masks_padding():
    first = torch.full((3, 4, 5), 1.0)
    second = torch.full((3, 6, 3), 2.0)
    targets = [{"image_id": torch.tensor(1)}, {"image_id": torch.tensor(2)}]
    images, padding_mask, out_targets = collate_detection([(first, targets[0]), (second, targets[1])])

    assert images.shape == (2, 3, 6, 5) and images.dtype == torch.float32
    assert padding_mask.shape == (2, 6, 5) and padding_mask.dtype == torch.bool
    assert out_targets is not targets and out_targets == targets

    assert (images[0, :, :4, :5] == 1).all() and (images[0, :, 4:, :] == 0).all()
    assert (images[1, :, :6, :3] == 2).all() and (images[1, :, :, 3:] == 0).all()
    expected_mask = torch.ones(2, 6, 5, dtype=torch.bool)
    expected_mask[0, :4, :5] = False
    expected_mask[1, :6, :3] = False
    assert torch.equal(padding_mask, expected_mask)


def test_same_size_images_have_no_padding():
    images, padding_mask = pad_images([torch.randn(3, 8, 8), torch.randn(3, 8, 8)])
    assert images.shape == (2, 3, 8, 8)
    assert not padding_mask.any()


def test_bad_input_raises():
    with pytest.raises(ValueError, match="empty"):
        pad_images([])
    with pytest.raises(ValueError, match=r"image 1 must be \[C, H, W\]"):
        pad_images([torch.zeros(3, 4, 4), torch.zeros(4, 4)])
    with pytest.raises(ValueError, match="image 1 has 1 channels"):
        pad_images([torch.zeros(3, 4, 4), torch.zeros(1, 4, 4)])
