from __future__ import annotations

import pytest
import torch
from torch import nn

from detr_lab.models.attention.plain import PlainAttention
from detr_lab.models.transformer import (
    Decoder,
    DecoderLayer,
    Encoder,
    EncoderLayer,
    Transformer,
    encoder_reference_points,
    flatten_levels,
    valid_ratios,
)

D, HEADS, FFN = 16, 4, 32


class RecordingAttention(nn.Module):
    """Returns zeros and remembers the keyword arguments of its last call."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def forward(self, query, key, value, **kwargs):
        self.calls.append({"query": query, "key": key, "value": value, **kwargs})
        return torch.zeros_like(query)


def _copy_attention(ours: PlainAttention, mha: nn.MultiheadAttention) -> None:
    with torch.no_grad():
        mha.in_proj_weight.copy_(torch.cat([ours.q_proj.weight, ours.k_proj.weight, ours.v_proj.weight]))
        mha.in_proj_bias.copy_(torch.cat([ours.q_proj.bias, ours.k_proj.bias, ours.v_proj.bias]))
        mha.out_proj.load_state_dict(ours.out_proj.state_dict())


def _randomize(module: nn.Module) -> None:
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0, 0.3)


def test_encoder_layer_matches_torch_post_norm_layer():
    torch.manual_seed(0)
    layer = EncoderLayer(self_attn=PlainAttention(D, HEADS), embed_dim=D, ffn_dim=FFN).eval()
    _randomize(layer)
    reference = nn.TransformerEncoderLayer(D, HEADS, FFN, batch_first=True, norm_first=False).eval()
    _copy_attention(layer.self_attn, reference.self_attn)
    reference.linear1.load_state_dict(layer.ffn.linear1.state_dict())
    reference.linear2.load_state_dict(layer.ffn.linear2.state_dict())
    reference.norm1.load_state_dict(layer.self_attn_norm.state_dict())
    reference.norm2.load_state_dict(layer.ffn_norm.state_dict())
    x = torch.randn(2, 7, D)
    mask = torch.zeros(2, 7, dtype=torch.bool)
    mask[1, 5:] = True
    ours = layer(x, torch.zeros_like(x), padding_mask=mask)
    torch.testing.assert_close(ours, reference(x, src_key_padding_mask=mask), atol=1e-5, rtol=1e-5)


def test_decoder_layer_matches_torch_post_norm_layer():
    torch.manual_seed(0)
    layer = DecoderLayer(
        self_attn=PlainAttention(D, HEADS), cross_attn=PlainAttention(D, HEADS), embed_dim=D, ffn_dim=FFN
    ).eval()
    _randomize(layer)
    reference = nn.TransformerDecoderLayer(D, HEADS, FFN, batch_first=True, norm_first=False).eval()
    _copy_attention(layer.self_attn, reference.self_attn)
    _copy_attention(layer.cross_attn, reference.multihead_attn)
    reference.linear1.load_state_dict(layer.ffn.linear1.state_dict())
    reference.linear2.load_state_dict(layer.ffn.linear2.state_dict())
    reference.norm1.load_state_dict(layer.self_attn_norm.state_dict())
    reference.norm2.load_state_dict(layer.cross_attn_norm.state_dict())
    reference.norm3.load_state_dict(layer.ffn_norm.state_dict())
    queries, memory = torch.randn(2, 3, D), torch.randn(2, 6, D)
    mask = torch.zeros(2, 6, dtype=torch.bool)
    mask[0, 4:] = True
    ours = layer(
        queries, torch.zeros_like(queries), memory, torch.zeros_like(memory), memory_padding_mask=mask
    )
    expected = reference(queries, memory, memory_key_padding_mask=mask)
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)


def test_layers_call_attention_with_the_shared_contract():
    encoder_attn, self_attn, cross_attn = RecordingAttention(), RecordingAttention(), RecordingAttention()
    x, pos = torch.randn(1, 4, D), torch.randn(1, 4, D)
    mask = torch.tensor([[False, False, False, True]])
    extras = {
        "reference_points": torch.rand(1, 4, 1, 2),
        "spatial_shapes": torch.tensor([[2, 2]]),
        "level_start_index": torch.tensor([0]),
    }
    EncoderLayer(self_attn=encoder_attn, embed_dim=D, ffn_dim=FFN)(x, pos, padding_mask=mask, **extras)
    call = encoder_attn.calls[0]
    torch.testing.assert_close(call["query"], x + pos)
    torch.testing.assert_close(call["key"], x + pos)
    torch.testing.assert_close(call["value"], x)
    assert call["key_padding_mask"] is mask and call["reference_points"] is extras["reference_points"]
    assert call["spatial_shapes"] is extras["spatial_shapes"]
    assert call["level_start_index"] is extras["level_start_index"]

    queries, query_pos = torch.randn(1, 2, D), torch.randn(1, 2, D)
    layer = DecoderLayer(self_attn=self_attn, cross_attn=cross_attn, embed_dim=D, ffn_dim=FFN)
    layer(queries, query_pos, x, pos, memory_padding_mask=mask, **extras)
    torch.testing.assert_close(self_attn.calls[0]["query"], queries + query_pos)
    torch.testing.assert_close(self_attn.calls[0]["value"], queries)
    cross = cross_attn.calls[0]
    # the attention returned zeros, so the cross-attention saw the normalized queries
    torch.testing.assert_close(cross["query"], layer.self_attn_norm(queries) + query_pos)
    torch.testing.assert_close(cross["key"], x + pos)
    torch.testing.assert_close(cross["value"], x)
    assert cross["key_padding_mask"] is mask and cross["reference_points"] is extras["reference_points"]


def test_decoder_returns_every_layer_through_the_final_norm():
    torch.manual_seed(0)
    layers = [
        DecoderLayer(
            self_attn=PlainAttention(D, HEADS), cross_attn=PlainAttention(D, HEADS), embed_dim=D, ffn_dim=FFN
        )
        for _ in range(3)
    ]
    norm = nn.LayerNorm(D)
    _randomize(norm)
    decoder = Decoder(layers, norm).eval()
    queries, query_pos, memory = torch.randn(2, 5, D), torch.randn(2, 5, D), torch.randn(2, 6, D)
    memory_pos = torch.randn(2, 6, D)
    stacked = decoder(queries, query_pos, memory, memory_pos).hidden
    assert tuple(stacked.shape) == (3, 2, 5, D)
    x = queries
    for index, layer in enumerate(layers):
        x = layer(x, query_pos, memory, memory_pos)
        torch.testing.assert_close(stacked[index], norm(x))
    raw = Decoder(layers, None).eval()(queries, query_pos, memory, memory_pos).hidden
    torch.testing.assert_close(raw[-1], x)


def test_flatten_levels_layout():
    features = [torch.randn(2, D, 2, 3), torch.randn(2, D, 1, 2)]
    pos = [torch.randn(2, D, 2, 3), torch.randn(2, D, 1, 2)]
    masks = [torch.zeros(2, 2, 3, dtype=torch.bool), torch.zeros(2, 1, 2, dtype=torch.bool)]
    masks[1][1, 0, 1] = True
    tokens, flat_pos, mask, shapes, starts = flatten_levels(features, masks, pos)
    assert shapes.tolist() == [[2, 3], [1, 2]] and starts.tolist() == [0, 6]
    assert tuple(tokens.shape) == (2, 8, D)
    torch.testing.assert_close(tokens[1, 0 + 1 * 3 + 2], features[0][1, :, 1, 2])
    torch.testing.assert_close(flat_pos[0, 6 + 1], pos[1][0, :, 0, 1])
    assert mask[1].tolist() == [False] * 7 + [True]
    with pytest.raises(ValueError, match="same non-zero number"):
        flatten_levels(features, masks[:1], pos)


def test_valid_ratios_and_reference_points():
    mask = torch.zeros(1, 4, 4, dtype=torch.bool)
    mask[:, 2:, :] = True  # bottom half padded
    mask[:, :, 3:] = True  # last column padded
    ratios = valid_ratios([mask, torch.zeros(1, 2, 2, dtype=torch.bool)])
    torch.testing.assert_close(ratios, torch.tensor([[[0.75, 0.5], [1.0, 1.0]]]))

    single = encoder_reference_points(torch.tensor([[2, 2]]), torch.ones(1, 1, 2))
    expected = torch.tensor([[0.25, 0.25], [0.75, 0.25], [0.25, 0.75], [0.75, 0.75]])
    torch.testing.assert_close(single, expected[None, :, None, :])

    points = encoder_reference_points(torch.tensor([[4, 4], [2, 2]]), ratios)
    assert tuple(points.shape) == (1, 20, 2, 2)
    # token (y=1, x=2) of level 0: centre (2.5, 1.5) over the valid extent (3, 2), then per level
    # scaled by that level's valid ratio
    x, y = 2.5 / 3, 1.5 / 2
    torch.testing.assert_close(points[0, 1 * 4 + 2], torch.tensor([[x * 0.75, y * 0.5], [x, y]]))


def test_transformer_level_embedding_and_outputs():
    torch.manual_seed(0)
    encoder = Encoder([EncoderLayer(self_attn=PlainAttention(D, HEADS), embed_dim=D, ffn_dim=FFN)])
    decoder = Decoder(
        [
            DecoderLayer(
                self_attn=PlainAttention(D, HEADS),
                cross_attn=PlainAttention(D, HEADS),
                embed_dim=D,
                ffn_dim=FFN,
            )
        ],
        nn.LayerNorm(D),
    )
    transformer = Transformer(encoder, decoder, embed_dim=D, num_levels=2).eval()
    features = [torch.randn(1, D, 2, 2), torch.randn(1, D, 1, 1)]
    pos = [torch.randn(1, D, 2, 2), torch.randn(1, D, 1, 1)]
    masks = [torch.zeros(1, 2, 2, dtype=torch.bool), torch.zeros(1, 1, 1, dtype=torch.bool)]
    queries, query_pos = torch.zeros(1, 3, D), torch.randn(1, 3, D)
    decoded, encoded = transformer(features, masks, pos, queries, query_pos)
    assert decoded.references is None
    assert tuple(decoded.hidden.shape) == (1, 1, 3, D) and tuple(encoded.memory.shape) == (1, 5, D)
    torch.testing.assert_close(encoded.memory_pos[0, 4], pos[1][0, :, 0, 0] + transformer.level_embed[1])
    torch.testing.assert_close(encoded.memory_pos[0, 1], pos[0][0, :, 0, 1] + transformer.level_embed[0])
    with pytest.raises(ValueError, match="expects 2 feature levels, got 1"):
        transformer.encode(features[:1], masks[:1], pos[:1])


def test_reset_parameters_follows_the_reference_initialisation():
    torch.manual_seed(0)
    d = 64
    encoder = Encoder([EncoderLayer(self_attn=PlainAttention(d, 8), embed_dim=d, ffn_dim=128)])
    decoder = Decoder(
        [
            DecoderLayer(
                self_attn=PlainAttention(d, 8), cross_attn=PlainAttention(d, 8), embed_dim=d, ffn_dim=128
            )
        ]
    )
    transformer = Transformer(encoder, decoder, embed_dim=d)
    attention = transformer.encoder.layers[0].self_attn
    # packed q/k/v projections: Xavier bound of a [3d, d] matrix; others: Xavier of their own shape
    assert attention.q_proj.weight.abs().max() <= (6 / (4 * d)) ** 0.5
    assert attention.q_proj.weight.abs().max() > 0.9 * (6 / (4 * d)) ** 0.5
    assert attention.out_proj.weight.abs().max() > 0.9 * (6 / (2 * d)) ** 0.5
    assert attention.q_proj.bias.abs().max() == 0
    linear1 = transformer.encoder.layers[0].ffn.linear1.weight
    assert (6 / (d + 128)) ** 0.5 * 0.9 < linear1.abs().max() <= (6 / (d + 128)) ** 0.5
