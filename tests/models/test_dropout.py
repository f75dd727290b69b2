"""`detr_lab.models.dropout.Dropout`: the CPU mask keeps each element independently with the stated
probability, scales by its inverse, and has the gradient of `x * mask * scale`."""

from __future__ import annotations

import pytest
import torch

from detr_lab.models.attention.plain import PlainAttention
from detr_lab.models.dropout import Dropout, keep_mask


def test_every_element_is_kept_with_the_stated_probability():
    torch.manual_seed(0)
    keep, kept = keep_mask(torch.Size([1000, 1000]), 0.1, torch.device("cpu"))
    assert kept == 1 - round(0.1 * 2**15) / 2**15
    sigma = (kept * (1 - kept) / (keep.numel() // 4)) ** 0.5
    flat = keep.flatten()
    for lane in range(4):  # the four 16-bit shares of each 64-bit draw, the sign bit's share included
        assert abs(flat[lane::4].float().mean().item() - kept) < 5 * sigma
    # neighbouring elements are independent: both kept as often as kept^2
    pairs = (flat[0::2] & flat[1::2]).float().mean().item()
    assert abs(pairs - kept**2) < 5 * (kept**2 * (1 - kept**2) / (flat.numel() // 2)) ** 0.5
    with pytest.raises(ValueError, match="in \\(0, 1\\)"):
        keep_mask(torch.Size([4]), 1.0, torch.device("cpu"))


def test_output_is_the_input_scaled_where_kept_and_its_gradient_follows():
    torch.manual_seed(1)
    x = torch.rand(64, 300, dtype=torch.float64).add_(0.5).requires_grad_()  # no zeros in x
    dropout = Dropout(0.25).train()
    y = dropout(x)
    kept = y != 0
    scale = 1 / (1 - round(0.25 * 2**15) / 2**15)
    torch.testing.assert_close(y[kept], x[kept] * scale, rtol=1e-15, atol=0)
    assert 0.70 < kept.double().mean().item() < 0.80
    grad = torch.randn_like(x)
    y.backward(grad)
    torch.testing.assert_close(x.grad, grad * kept * scale, rtol=1e-15, atol=0)
    # the expected output is the input
    torch.manual_seed(2)
    ones = torch.ones(2000, 1000)
    assert abs(Dropout(0.1).train()(ones).mean().item() - 1.0) < 2e-3


def test_seeded_masks_repeat_and_eval_mode_and_edge_probabilities_pass_through():
    x = torch.randn(32, 48)
    dropout = Dropout(0.5).train()
    torch.manual_seed(3)
    first = dropout(x)
    torch.manual_seed(3)
    assert torch.equal(dropout(x), first)
    assert torch.equal(Dropout(0.5).eval()(x), x)
    assert torch.equal(Dropout(0.0).train()(x), x)
    assert torch.equal(Dropout(1.0).train()(x), torch.zeros_like(x))
    for p in (1e-6, 1 - 1e-6):  # too close to 0 or 1 for a 15-bit share: nn.Dropout's own draw
        torch.manual_seed(4)
        ours = Dropout(p).train()(x)
        torch.manual_seed(4)
        assert torch.equal(ours, torch.nn.Dropout(p).train()(x))
    inplace = x.clone()
    torch.manual_seed(3)
    assert Dropout(0.5, inplace=True).train()(inplace) is inplace and torch.equal(inplace, first)


def test_plain_attention_drops_attention_weights_with_the_cheap_mask_in_training():
    # The fast (SDPA) path in training on the CPU forms the weights explicitly and drops them with
    # `keep_mask`: recompute it by hand from the same seed, with a key padding mask in play.
    torch.manual_seed(0)
    attention = PlainAttention(32, 4, dropout=0.2).double().train()
    query, key = torch.randn(2, 5, 32, dtype=torch.float64), torch.randn(2, 7, 32, dtype=torch.float64)
    padding = torch.zeros(2, 7, dtype=torch.bool)
    padding[1, 5:] = True
    torch.manual_seed(3)
    out = attention(query, key, key, key_padding_mask=padding)

    q, k, v = attention.project(query, key, key)
    scores = (q @ k.transpose(-2, -1)) / (32 // 4) ** 0.5
    scores = scores.masked_fill(padding[:, None, None, :], float("-inf"))
    torch.manual_seed(3)
    keep, kept = keep_mask(scores.shape, 0.2, torch.device("cpu"))
    weights = scores.softmax(-1) * keep / kept
    expected = attention.out_proj(attention.merge_heads(weights @ v))
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    assert (~keep).any() and keep.any()
    # evaluation, or p = 0: no dropout at all, the SDPA path
    attention.eval()
    no_dropout = attention.out_proj(attention.merge_heads(scores.softmax(-1) @ v))
    torch.testing.assert_close(attention(query, key, key, key_padding_mask=padding), no_dropout)
