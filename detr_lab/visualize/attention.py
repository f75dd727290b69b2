"""Attention pictures of one image: DETR cross-attention, Deformable DETR sampling points, ACT clusters.

Each function runs the model once on a single image with forward hooks on the attention modules (see
`detr_lab.visualize.capture`) and draws on that image as the model saw it (resized, un-normalized,
without padding). The query shown is, unless given, the one with the highest class score;
its predicted box (final decoder layer) is drawn in cyan.

    image, _ = build_eval_transform(cfg.data.augment)(rgb, no_boxes, no_labels)
    cross_attention_picture(model, image, "attn.png", mean=..., std=...)
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from detr_lab.boxes import cxcywh_to_xyxy
from detr_lab.data.collate import pad_images
from detr_lab.models.attention.clustering import AdaptiveClusteringAttention
from detr_lab.models.attention.deformable import MultiScaleDeformableAttention
from detr_lab.models.attention.plain import PlainAttention
from detr_lab.visualize.capture import (
    act_cluster_index,
    deformable_sampling,
    level_map,
    plain_attention_weights,
    record_inputs,
)
from detr_lab.visualize.draw import draw_clusters, draw_heatmap, draw_sampling_points

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class _Pass:
    """One image through the model: the picture, the chosen query and the hooked modules' inputs."""

    picture: np.ndarray  # uint8 [h, w, 3], the model's input without normalization and padding
    query: int
    score: float
    box: np.ndarray  # [4] xyxy pixels of `picture`
    records: list[dict[str, Tensor]]


def to_picture(image: Tensor, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """Normalized float `[3, h, w]` -> uint8 `[h, w, 3]` RGB (the normalization undone)."""
    mean_t = torch.tensor(mean, dtype=image.dtype)[:, None, None]
    std_t = torch.tensor(std, dtype=image.dtype)[:, None, None]
    pixels = ((image.detach().cpu() * std_t + mean_t) * 255.0).clamp(0, 255).round()
    return pixels.byte().permute(1, 2, 0).numpy()


def _select(modules: Sequence[nn.Module], kind: type, index: int, where: str) -> nn.Module:
    chosen = [m for m in modules if isinstance(m, kind)]
    if not chosen:
        raise ValueError(f"the model has no {kind.__name__} in its {where}")
    if not -len(chosen) <= index < len(chosen):
        raise ValueError(f"{where} layer {index} out of range: the model has {len(chosen)}")
    return chosen[index]


def _run(model: nn.Module, image: Tensor, module: nn.Module, query: int | None,
         mean: Sequence[float], std: Sequence[float]) -> _Pass:
    if image.dim() != 3 or image.shape[0] != 3:
        raise ValueError(f"image must be a normalized float [3, H, W] tensor, got shape {tuple(image.shape)}")
    model.eval()
    device = next(model.parameters()).device
    batch, padding_mask = pad_images([image.to(device)])  # [1, 3, H, W], [1, H, W] (no padding)
    with record_inputs([module]) as records, torch.no_grad():
        outputs = model(batch, padding_mask)
    logits = outputs["pred_logits"][0]  # (Q, C)
    probs = model.classification.probabilities(logits)  # (Q, num_classes)
    scores = probs.max(-1).values  # (Q,)
    num_queries = scores.shape[0]
    if query is None:
        query = int(scores.argmax())
    elif not 0 <= query < num_queries:
        raise ValueError(f"query {query} out of range: the model has {num_queries} queries")
    height, width = image.shape[1:]
    scale = torch.tensor([width, height, width, height], dtype=torch.float32)
    box = (cxcywh_to_xyxy(outputs["pred_boxes"][0, query].float().cpu()) * scale).numpy()
    return _Pass(to_picture(image, mean, std), query, float(scores[query]), box, records)


def _upsample(values: Tensor, size: tuple[int, int], mode: str) -> np.ndarray:
    """`[H_l, W_l]` -> `[H, W]` numpy (bilinear for weights, nearest for ids)."""
    resized = F.interpolate(values[None, None].float(), size=size, mode=mode,
                            **({"align_corners": False} if mode == "bilinear" else {}))
    return resized[0, 0].cpu().numpy()


def cross_attention_picture(
    model: nn.Module,
    image: Tensor,
    path: str | os.PathLike,
    *,
    query: int | None = None,
    layer: int = -1,
    level: int = 0,
    head: int | None = None,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> Path:
    """DETR: a decoder layer's cross-attention weights of one query over one feature level.

    Args:
        model: a detector whose decoder cross-attention is `PlainAttention` (DETR, ACT).
        image: normalized float `[3, H, W]` (the evaluation transform's output).
        query: query index; None: the highest-scoring one.
        layer: decoder layer (negative: from the last).
        level: feature level of the memory (DETR has one).
        head: attention head; None: the mean over heads.
    Raises:
        ValueError: no plain cross-attention, or an index out of range.
    """
    decoder = [layer_.cross_attn for layer_ in model.transformer.decoder.layers]
    module = _select(decoder, PlainAttention, layer, "decoder cross-attention (plain)")
    run = _run(model, image, module, query, mean, std)
    record = run.records[0]
    weights = plain_attention_weights(module, record)[0, :, run.query]  # (heads, S)
    weights = weights.mean(0) if head is None else weights[_check_head(head, weights.shape[0])]
    heat = level_map(weights, record["spatial_shapes"], level)  # (H_l, W_l)
    heat_map = _upsample(heat, image.shape[1:], "bilinear")
    heads = "mean of heads" if head is None else f"head {head}"
    title = (f"decoder layer {layer % len(decoder)} cross-attention, query {run.query} "
             f"(score {run.score:.2f}), level {level} ({heat.shape[0]}x{heat.shape[1]}), {heads}")
    return draw_heatmap(run.picture, heat_map, path, box=run.box, title=title)


def sampling_points_picture(
    model: nn.Module,
    image: Tensor,
    path: str | os.PathLike,
    *,
    query: int | None = None,
    layer: int = -1,
    level: int | None = 0,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> Path:
    """Deformable DETR: a decoder layer's sampling points of one query at one level (None: all levels).

    Points are drawn per head (colour) with an area proportional to their attention weight; the
    query's reference point is a white star. Locations are normalized to the padded maps, which
    here (one unpadded image) cover the image: pixels = location * (W, H).
    Raises:
        ValueError: no deformable cross-attention, or an index out of range.
    """
    decoder = [layer_.cross_attn for layer_ in model.transformer.decoder.layers]
    module = _select(decoder, MultiScaleDeformableAttention, layer, "decoder cross-attention (deformable)")
    if level is not None and not 0 <= level < module.num_levels:
        raise ValueError(f"level {level} out of range: the model has {module.num_levels} feature levels")
    run = _run(model, image, module, query, mean, std)
    record = run.records[0]
    locations, weights = deformable_sampling(module, record)
    locations, weights = locations[0, run.query], weights[0, run.query]  # (nh, L, P, 2), (nh, L, P)
    levels = slice(None) if level is None else slice(level, level + 1)
    height, width = image.shape[1:]
    size = torch.tensor([width, height], dtype=locations.dtype)
    points = (locations[:, levels] * size).flatten(1, 2).cpu().numpy()  # (nh, L'*P, 2)
    point_weights = weights[:, levels].flatten(1).cpu().numpy()  # (nh, L'*P)
    reference = record["reference_points"][0, run.query, 0 if level is None else level, :2].cpu() * size
    where = "all levels" if level is None else f"level {level}"
    title = (f"decoder layer {layer % len(decoder)} sampling points, query {run.query} "
             f"(score {run.score:.2f}), {where}: {module.num_heads} heads x {module.num_points} points")
    return draw_sampling_points(run.picture, path, reference=reference.tolist(), points=points,
                                weights=point_weights, box=run.box, title=title)


def clusters_picture(
    model: nn.Module,
    image: Tensor,
    path: str | os.PathLike,
    *,
    layer: int = 0,
    head: int = 0,
    level: int = 0,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> Path:
    """ACT: the clusters of an encoder layer's queries (one head, one level) as regions of the image.

    Raises:
        ValueError: no adaptive clustering attention in the encoder, or an index out of range.
    """
    encoder = [layer_.self_attn for layer_ in model.transformer.encoder.layers]
    module = _select(encoder, AdaptiveClusteringAttention, layer, "encoder self-attention (ACT)")
    run = _run(model, image, module, None, mean, std)
    record = run.records[0]
    clusters = act_cluster_index(module, record)[0]  # (heads, S)
    clusters = clusters[_check_head(head, clusters.shape[0])]
    grid = level_map(clusters, record["spatial_shapes"], level)  # (H_l, W_l)
    count = int(torch.unique(grid).numel())
    title = (f"encoder layer {layer % len(encoder)} ACT clusters, head {head}, level {level}: "
             f"{count} clusters over {grid.numel()} queries ({grid.shape[0]}x{grid.shape[1]})")
    return draw_clusters(run.picture, _upsample(grid, image.shape[1:], "nearest").astype(np.int64), path,
                         title=title)


def _check_head(head: int, heads: int) -> int:
    if not 0 <= head < heads:
        raise ValueError(f"head {head} out of range: the attention has {heads} heads")
    return head
