"""The step-by-step ("math") plain attention path agrees with the SDPA one and is switchable model-wide."""

from __future__ import annotations

import pytest
import torch

from detr_lab.config import load_config
from detr_lab.models.attention.clustering import AdaptiveClusteringAttention
from detr_lab.models.attention.plain import PlainAttention, set_plain_attention_impl
from detr_lab.models.build import build_model

from factories import tiny_overrides


def test_math_path_matches_sdpa_with_padding():
    torch.manual_seed(0)
    attention = PlainAttention(32, 4).eval()
    query, key = torch.randn(2, 5, 32), torch.randn(2, 7, 32)
    value = torch.randn(2, 7, 32)
    padding = torch.zeros(2, 7, dtype=torch.bool)
    padding[1, 4:] = True
    fused = attention(query, key, value, key_padding_mask=padding)
    attention.impl = "math"
    step_by_step = attention(query, key, value, key_padding_mask=padding)
    assert torch.allclose(step_by_step, fused, atol=1e-5, rtol=1e-5)
    # Padded keys get no weight: changing them changes nothing.
    value[1, 4:] = 100.0
    changed = attention(query, key, value, key_padding_mask=padding)
    assert torch.allclose(changed[1], step_by_step[1], atol=1e-5)


def test_math_path_gradients_match_sdpa():
    torch.manual_seed(1)
    attention = PlainAttention(16, 2, dropout=0.0).train()
    x = torch.randn(1, 6, 16, requires_grad=True)
    grads = []
    for impl in ("sdpa", "math"):
        attention.impl = impl
        x.grad = None
        attention(x, x, x).square().sum().backward()
        grads.append(x.grad.clone())
    assert torch.allclose(grads[0], grads[1], atol=1e-5, rtol=1e-5)


def test_math_path_applies_dropout_in_training_only():
    torch.manual_seed(2)
    attention = PlainAttention(16, 2, dropout=0.5, impl="math").train()
    x = torch.randn(1, 6, 16)
    assert not torch.allclose(attention(x, x, x), attention(x, x, x))
    attention.eval()
    assert torch.allclose(attention(x, x, x), attention(x, x, x))


def test_set_impl_switches_plain_attention_but_not_act():
    overrides = tiny_overrides(
        decoder__num_layers=1, encoder__attention="act", num_queries=None, num_classes=None
    )
    model = build_model(load_config(overrides=overrides).model)
    assert set_plain_attention_impl(model, "math") == 2  # decoder self- and cross-attention
    act = [m for m in model.modules() if isinstance(m, AdaptiveClusteringAttention)]
    assert len(act) == 1 and act[0].impl == "sdpa"
    with pytest.raises(ValueError, match="impl must be one of"):
        set_plain_attention_impl(model, "flash")
    with pytest.raises(ValueError, match="impl must be one of"):
        PlainAttention(32, 4, impl="fused")
