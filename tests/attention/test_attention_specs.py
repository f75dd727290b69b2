"""The attention spec table: every variant keeps the shared contract; config, validation and the
builder read the table, so a new variant is one table line (plus its file)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from torch import nn

from detr_lab import config as config_module
from detr_lab.config import ConfigError, load_config
from detr_lab.models import build as build_module
from detr_lab.models.attention import ATTENTION_SPECS, AttentionSpec, attention_names, build_attention
from detr_lab.models.attention.deformable import MultiScaleDeformableAttention
from detr_lab.models.attention.plain import PlainAttention
from detr_lab.models.build import attention_arguments, build_model
from detr_lab.models.detector import Detector

from factories import tiny_overrides

TINY = tiny_overrides(num_feature_levels=2)
SHAPES = torch.tensor([[4, 4], [2, 2]])


@pytest.mark.parametrize(
    ("name", "site"), [(name, site) for name, spec in ATTENTION_SPECS.items() for site in spec.sites]
)
def test_every_variant_keeps_the_shared_call_contract(name, site):
    torch.manual_seed(0)
    cfg = load_config(overrides=TINY)
    module = build_attention(name, site=site, **attention_arguments(cfg.model, site)).eval()
    batch, num_queries, num_keys = 2, 5, 20
    query = torch.randn(batch, num_queries, 32, requires_grad=True)
    memory = torch.randn(batch, num_keys, 32)
    padding = torch.zeros(batch, num_keys, dtype=torch.bool)
    padding[1, 16:] = True
    attn_mask = torch.zeros(batch * 4, num_queries, num_keys, dtype=torch.bool)
    attn_mask[:, :, 3] = True
    attn_mask[1, 2] = True  # one fully masked query row (image 0, head 1)
    out = module(
        query,
        memory,
        memory,
        key_padding_mask=padding,
        attn_mask=attn_mask,
        query_padding_mask=torch.zeros(batch, num_queries, dtype=torch.bool),
        reference_points=torch.rand(batch, num_queries, 2, 2),
        spatial_shapes=SHAPES,
        level_start_index=torch.tensor([0, 16]),
    )
    assert out.shape == (batch, num_queries, 32)
    out.square().sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(query.grad).all()
    with pytest.raises(ValueError, match=r"attn_mask has shape \(5, 5\)"):
        module(query, memory, memory, attn_mask=torch.zeros(5, 5, dtype=torch.bool),
               reference_points=torch.rand(batch, num_queries, 2, 2), spatial_shapes=SHAPES)  # fmt: skip


def test_config_choices_come_from_the_table():
    assert attention_names("encoder") == ("plain", "deformable", "deformable_v2", "act")
    assert attention_names("decoder") == ("plain", "deformable", "deformable_v2")
    expected = r"'model.decoder.cross_attention' is 'act'; expected one of: plain, deformable, deformable_v2"
    with pytest.raises(ConfigError, match=expected):
        load_config(overrides=["model.decoder.cross_attention=act"])
    cfg = load_config(overrides=TINY)
    with pytest.raises(ValueError, match=r"'model.decoder.cross_attention' is 'act'; expected one of"):
        build_attention("act", site="decoder", **attention_arguments(cfg.model, "decoder"))


def test_a_new_variant_is_one_table_line(monkeypatch):
    """Two new names with the builders of existing files: the table's properties alone pick the
    config choices, the input side, the final decoder norm, the head and the refinement check."""
    plain_builder = ATTENTION_SPECS["plain"].builder
    sampled = AttentionSpec(
        ATTENTION_SPECS["deformable"].builder,
        sites=("encoder", "decoder"),
        reference_points=True,
        multiscale_inputs=True,
        final_decoder_norm=False,
    )
    monkeypatch.setitem(ATTENTION_SPECS, "dense", AttentionSpec(plain_builder, sites=("decoder",)))
    monkeypatch.setitem(ATTENTION_SPECS, "sampled", sampled)
    tiny = tiny_overrides()  # one level

    cfg = load_config(overrides=[*tiny, "model.decoder.cross_attention=dense"])
    model = build_model(cfg.model)
    assert type(model) is Detector and isinstance(model.transformer.decoder.norm, nn.LayerNorm)
    assert isinstance(model.transformer.decoder.layers[0].cross_attn, PlainAttention)
    assert isinstance(model.neck.input_proj[0], nn.Conv2d)  # one level, no multi-scale input side
    with pytest.raises(ConfigError, match="needs a decoder cross-attention with reference points.*sampled"):
        load_config(overrides=[*tiny, "model.decoder.cross_attention=dense", "model.box_refine=true"])
    with pytest.raises(ConfigError, match="'model.encoder.attention' is 'dense'"):
        load_config(overrides=[*tiny, "model.encoder.attention=dense"])

    cfg = load_config(overrides=[*tiny, "model.decoder.cross_attention=sampled", "model.box_refine=true"])
    model = build_model(cfg.model)
    assert model.query_spec.box_dim == 2 and model.transformer.decoder.norm is None  # reference points
    assert isinstance(model.transformer.decoder.layers[0].cross_attn, MultiScaleDeformableAttention)
    assert isinstance(model.neck.input_proj[0], nn.Sequential)  # GroupNorm projection (multi-scale inputs)
    assert model.transformer.level_embed is not None
    with pytest.raises(ConfigError, match="must be divisible by 32"):
        load_config(overrides=[*tiny, "model.encoder.attention=sampled", "model.hidden_dim=48"])


def test_a_builder_that_cannot_be_imported_is_a_clear_error(monkeypatch):
    ghost = AttentionSpec("detr_lab.models.attention.ghost:build", sites=("encoder",))
    monkeypatch.setitem(ATTENTION_SPECS, "ghost", ghost)
    cfg = load_config(overrides=TINY)
    with pytest.raises(ValueError, match="attention variant 'ghost': cannot import its builder"):
        build_attention("ghost", site="encoder", **attention_arguments(cfg.model, "encoder"))


def test_no_family_test_by_name_outside_the_table():
    """config.py and build.py decide by the spec's properties, never by a variant's name."""
    for module in (config_module, build_module):
        path = Path(module.__file__)
        source = path.read_text()
        for name in ATTENTION_SPECS:
            compared = re.search(rf'[=!]=\s*"{name}"|"{name}"\s*[=!]=|in \([^)]*"{name}"', source)
            assert compared is None, f"{path} tests the attention name {name!r}: {compared.group(0)}"
