"""Decoder extensions for query sources: a per-call self-attention mask and a per-layer query-position
head fed with each layer's current (refined) boxes."""

from __future__ import annotations

import torch
from torch import nn

from detr_lab.models.attention.plain import PlainAttention
from detr_lab.models.queries.query_set import QuerySet, concat_query_sets
from detr_lab.models.transformer import Decoder, DecoderLayer, refine_boxes

D, HEADS = 16, 2


def _decoder(layers: int = 2) -> Decoder:
    torch.manual_seed(0)
    return Decoder(
        [
            DecoderLayer(
                self_attn=PlainAttention(D, HEADS),
                cross_attn=PlainAttention(D, HEADS),
                embed_dim=D,
                ffn_dim=32,
                dropout=0.0,
            )
            for _ in range(layers)
        ],
        nn.LayerNorm(D),
    )


def _inputs():
    torch.manual_seed(1)
    queries, query_pos = torch.randn(1, 3, D), torch.randn(1, 3, D)
    memory, memory_pos = torch.randn(1, 5, D), torch.randn(1, 5, D)
    return queries, query_pos, memory, memory_pos


def test_self_attention_mask_hides_queries_in_every_layer():
    decoder = _decoder().eval()
    queries, query_pos, memory, memory_pos = _inputs()
    mask = torch.zeros(3, 3, dtype=torch.bool)
    mask[0, 2] = mask[1, 2] = True  # queries 0 and 1 may not attend to query 2
    changed = queries.clone()
    changed[0, 2] += 5.0
    with torch.no_grad():
        a = decoder(queries, query_pos, memory, memory_pos, self_attn_mask=mask).hidden
        b = decoder(changed, query_pos, memory, memory_pos, self_attn_mask=mask).hidden
        c = decoder(changed, query_pos, memory, memory_pos).hidden
    torch.testing.assert_close(a[:, :, :2], b[:, :, :2])  # hidden from query 2 in every layer
    assert not torch.allclose(a[:, :, 2], b[:, :, 2])
    assert not torch.allclose(a[:, :, :2], c[:, :, :2])  # without the mask it leaks


class RecordingHead(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(4, D)
        self.seen: list[torch.Tensor] = []

    def forward(self, boxes):
        self.seen.append(boxes.detach().clone())
        return self.proj(boxes)


def test_query_pos_head_sees_each_layers_refined_boxes():
    decoder = _decoder(layers=3).eval()
    queries, _, memory, memory_pos = _inputs()
    boxes = torch.tensor([[[0.5, 0.5, 0.2, 0.2], [0.3, 0.6, 0.1, 0.3], [0.7, 0.2, 0.4, 0.1]]])
    torch.manual_seed(2)
    box_heads = [nn.Linear(D, 4) for _ in range(3)]
    head = RecordingHead()
    ratios = torch.tensor([[[1.0, 0.5]]])  # (B, levels, 2): level 0 half padded in height
    with torch.no_grad():
        out = decoder(
            queries, None, memory, memory_pos, reference_points=boxes, valid_ratios=ratios,
            box_heads=box_heads, query_pos_head=head, logit_eps=1e-3,
        )  # fmt: skip
    assert len(head.seen) == 3
    scale = torch.tensor([1.0, 0.5, 1.0, 0.5])
    torch.testing.assert_close(head.seen[0], boxes * scale)  # scaled to level 0, as DINO
    for layer in range(1, 3):
        torch.testing.assert_close(head.seen[layer], out.references[layer] * scale)
    # layer 1's boxes are layer 0's refinement of the anchors (on the un-normed layer output)
    assert not torch.allclose(out.references[1], boxes)


def test_denoising_set_goes_first_and_its_mask_covers_both():
    first = QuerySet(
        torch.zeros(1, 2, D), torch.full((1, 2, 4), 0.5), torch.ones(5, 5, dtype=torch.bool), {"a": 1}
    )
    second = QuerySet(torch.ones(1, 3, D), torch.full((1, 3, 4), 0.25), None, {"b": 2})
    both = concat_query_sets(first, second)
    assert both.num_queries == 5 and both.meta == {"a": 1, "b": 2}
    assert torch.equal(both.queries[0, :2], first.queries[0]) and both.attn_mask.all()
    only_second = concat_query_sets(QuerySet(torch.zeros(1, 0, D), torch.zeros(1, 0, 4)), second)
    assert only_second.attn_mask is None


def test_refine_boxes_logit_clamp():
    # logit(0) and logit(1) are clamped at eps = 1e-3 (DINO): sigmoid(log(eps / 1)) = eps / (1 + eps)
    reference = torch.tensor([[0.0, 1.0, 0.5, 0.5]])
    refined = refine_boxes(torch.zeros(1, 4), reference, eps=1e-3)
    expected = torch.tensor([[1e-3 / (1 + 1e-3), 1 / (1 + 1e-3), 0.5, 0.5]])
    torch.testing.assert_close(refined, expected, atol=1e-7, rtol=0)
