"""Encoder-decoder transformer whose layers receive their attention modules.

Layers are post-norm as in DETR: `x = norm(x + dropout(sublayer(x)))`. Every attention module is
called with the shared contract of `detr_lab.models.attention` (batch-first, `key_padding_mask`
True = padding, multi-scale arguments passed along and ignored by attention that does not need them),
so a new attention variant plugs in without a new layer class.

Token layout: feature levels are flattened row-major and concatenated, shallowest level first; the
flat index of pixel (y, x) of level l is `level_start_index[l] + y * W_l + x`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from detr_lab.models.activations import activation_function
from detr_lab.models.backbones.base import valid_extent
from detr_lab.models.dropout import Dropout


class FeedForward(nn.Module):
    """Position-wise MLP `linear2(dropout(act(linear1(x))))`: `[..., d]` -> `[..., d]`; `act` ReLU, or
    another name of `detr_lab.models.activations.ACTIVATIONS` (DEIM: silu)."""

    def __init__(
        self, embed_dim: int, ffn_dim: int, *, dropout: float = 0.1, activation: str = "relu"
    ) -> None:
        super().__init__()
        self.linear1 = nn.Linear(embed_dim, ffn_dim)
        self.dropout = Dropout(dropout)
        self.linear2 = nn.Linear(ffn_dim, embed_dim)
        self.act = activation_function(activation)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear2(self.dropout(self.act(self.linear1(x))))


class EncoderLayer(nn.Module):
    """Self-attention over the flattened feature tokens, then a feed-forward block (post-norm).

    Args:
        self_attn: an attention module with the shared call contract, width `embed_dim`.
        embed_dim: token width d. ffn_dim: hidden width of the feed-forward block.
        dropout: on the residual branches and inside the feed-forward block.
    """

    def __init__(self, *, self_attn: nn.Module, embed_dim: int, ffn_dim: int, dropout: float = 0.1) -> None:
        super().__init__()
        self.self_attn = self_attn
        self.self_attn_dropout = Dropout(dropout)
        self.self_attn_norm = nn.LayerNorm(embed_dim)
        self.ffn = FeedForward(embed_dim, ffn_dim, dropout=dropout)
        self.ffn_dropout = Dropout(dropout)
        self.ffn_norm = nn.LayerNorm(embed_dim)

    def forward(
        self,
        x: Tensor,
        pos: Tensor,
        *,
        padding_mask: Tensor | None = None,
        reference_points: Tensor | None = None,
        spatial_shapes: Tensor | None = None,
        level_start_index: Tensor | None = None,
    ) -> Tensor:
        """Tokens `x` and their position embeddings `pos` `[B, S, d]` -> `[B, S, d]`.

        `padding_mask` bool `[B, S]` (True = padding) masks the keys and marks the padded queries
        (`key_padding_mask` and `query_padding_mask` of the attention); `reference_points`
        `[B, S, levels, 2]`, `spatial_shapes` `[levels, 2]`, `level_start_index` `[levels]` go to the
        attention module.
        """
        query_key = x + pos
        attended = self.self_attn(
            query=query_key,
            key=query_key,
            value=x,
            key_padding_mask=padding_mask,
            query_padding_mask=padding_mask,  # the queries are the tokens: same padding
            reference_points=reference_points,
            spatial_shapes=spatial_shapes,
            level_start_index=level_start_index,
        )
        x = self.self_attn_norm(x + self.self_attn_dropout(attended))
        return self.ffn_norm(x + self.ffn_dropout(self.ffn(x)))


class GatedFusion(nn.Module):
    """D-FINE's gate (the official `Gate`), replacing the residual + norm after the cross-attention.

    `norm(g1 * x + g2 * y)` with `(g1, g2) = sigmoid(linear([x, y]))` split in halves, so the layer
    chooses per channel how much of the attended memory `y` to take into the queries `x`. It starts at
    g1 = g2 = 0.5 (zero weights, bias logit(0.5) = 0).

    Args:
        embed_dim: d; the gate's linear layer maps 2d -> 2d.
    """

    def __init__(self, embed_dim: int) -> None:
        super().__init__()
        self.gate = nn.Linear(2 * embed_dim, 2 * embed_dim)
        self.norm = nn.LayerNorm(embed_dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.gate.weight)
        nn.init.zeros_(self.gate.bias)

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        """`x`, `y` `[..., d]` -> `[..., d]`."""
        first, second = self.gate(torch.cat((x, y), dim=-1)).sigmoid().chunk(2, dim=-1)
        return self.norm(first * x + second * y)


class DecoderLayer(nn.Module):
    """Query self-attention, cross-attention to the encoder memory, feed-forward (each post-norm).

    Args:
        self_attn: attention among the object queries (plain in every DETR variant).
        cross_attn: attention from the queries to the memory (plain for DETR; deformable attention
            around each query's reference points for Deformable DETR).
        embed_dim: token width d. ffn_dim: hidden width of the feed-forward block.
        dropout: on the residual branches and inside the feed-forward block.
        gate: fuse the cross-attention's result into the queries with D-FINE's `GatedFusion` instead
            of the residual and `cross_attn_norm`.
        activation: the feed-forward block's ("relu"; DEIM "silu").
    """

    def __init__(
        self,
        *,
        self_attn: nn.Module,
        cross_attn: nn.Module,
        embed_dim: int,
        ffn_dim: int,
        dropout: float = 0.1,
        gate: bool = False,
        activation: str = "relu",
    ) -> None:
        super().__init__()
        self.self_attn = self_attn
        self.self_attn_dropout = Dropout(dropout)
        self.self_attn_norm = nn.LayerNorm(embed_dim)
        self.cross_attn = cross_attn
        self.cross_attn_dropout = Dropout(dropout)
        self.cross_attn_norm = None if gate else nn.LayerNorm(embed_dim)
        self.cross_attn_gate = GatedFusion(embed_dim) if gate else None
        self.ffn = FeedForward(embed_dim, ffn_dim, dropout=dropout, activation=activation)
        self.ffn_dropout = Dropout(dropout)
        self.ffn_norm = nn.LayerNorm(embed_dim)

    def forward(
        self,
        queries: Tensor,
        query_pos: Tensor,
        memory: Tensor,
        memory_pos: Tensor | None,
        *,
        memory_padding_mask: Tensor | None = None,
        reference_points: Tensor | None = None,
        spatial_shapes: Tensor | None = None,
        level_start_index: Tensor | None = None,
        self_attn_mask: Tensor | None = None,
    ) -> Tensor:
        """`queries`, `query_pos` `[B, Q, d]`; `memory`, `memory_pos` `[B, S, d]` -> queries `[B, Q, d]`.

        `memory_pos` None: the keys are the memory itself (a model without memory positions, whose
        cross-attention reads no keys: RT-DETR).

        `memory_padding_mask` bool `[B, S]` (True = padding). `reference_points` `[B, Q, levels, 2 or 4]`
        (normalized), `spatial_shapes`, `level_start_index` are passed to the cross-attention.
        `self_attn_mask` bool `[Q, Q]` (True = may NOT attend; e.g. the denoising groups) is passed to
        the self-attention as `attn_mask`.
        """
        query_key = queries + query_pos
        mask_kwargs = {} if self_attn_mask is None else {"attn_mask": self_attn_mask}
        attended = self.self_attn(query=query_key, key=query_key, value=queries, **mask_kwargs)
        queries = self.self_attn_norm(queries + self.self_attn_dropout(attended))
        attended = self.cross_attn(
            query=queries + query_pos,
            key=memory if memory_pos is None else memory + memory_pos,
            value=memory,
            key_padding_mask=memory_padding_mask,
            reference_points=reference_points,
            spatial_shapes=spatial_shapes,
            level_start_index=level_start_index,
        )
        if self.cross_attn_gate is not None:
            queries = self.cross_attn_gate(queries, self.cross_attn_dropout(attended))
        else:
            queries = self.cross_attn_norm(queries + self.cross_attn_dropout(attended))
        return self.ffn_norm(queries + self.ffn_dropout(self.ffn(queries)))


class Encoder(nn.Module):
    """A stack of `EncoderLayer`s (no final norm: post-norm layers end normalized)."""

    def __init__(self, layers: Sequence[nn.Module]) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)

    def forward(self, x: Tensor, pos: Tensor, **attention_kwargs: Tensor | None) -> Tensor:
        """`[B, S, d]` tokens and positions -> memory `[B, S, d]`; kwargs as `EncoderLayer.forward`."""
        for layer in self.layers:
            x = layer(x, pos, **attention_kwargs)
        return x


def inverse_sigmoid(x: Tensor, eps: float = 1e-5) -> Tensor:
    """Logit of `x` clamped to [0, 1], with both probabilities kept >= `eps` (finite at 0 and 1)."""
    x = x.clamp(min=0, max=1)
    return torch.log(x.clamp(min=eps) / (1 - x).clamp(min=eps))


def refine_boxes(deltas: Tensor, reference: Tensor, *, eps: float = 1e-5) -> Tensor:
    """Boxes predicted relative to reference points: `sigmoid(deltas + logit(reference))`.

    Args:
        deltas: `[..., 4]` unnormalized (cx, cy, w, h) offsets in logit space.
        reference: `[..., 4]` normalized boxes (cx, cy, w, h), or `[..., 2]` normalized points (x, y),
            which shift only the centre.
        eps: the logit's clamp (Deformable DETR 1e-5, DINO 1e-3).
    Returns:
        `[..., 4]` normalized cxcywh boxes.
    """
    logits = inverse_sigmoid(reference, eps)
    if reference.shape[-1] == 4:
        return (deltas + logits).sigmoid()
    if reference.shape[-1] != 2:
        raise ValueError(f"reference points must end in 2 or 4 values, got shape {tuple(reference.shape)}")
    return torch.cat((deltas[..., :2] + logits, deltas[..., 2:]), dim=-1).sigmoid()


@dataclass
class DecoderOutput:
    """Every decoder layer's queries and the reference points each layer attended around.

    hidden `[num_layers, B, Q, d]`; references: one `[B, Q, 2 or 4]` per layer, the normalized
    reference points (x, y) or boxes (cx, cy, w, h) *entering* that layer, relative to each image's
    unpadded extent (with box refinement, points become boxes after the first layer); None when the
    decoder ran without reference points. With look-forward-twice, the references of layers after
    the first carry the gradient of the previous layer's refinement (the values are the same).
    refinement: with a refiner (D-FINE), its state: per layer `boxes` `[B, Q, 4]` and `corners`
    `[B, Q, 4 * (reg_max + 1)]`, the first layer's `pre_boxes` and the `initial` boxes `[B, Q, 4]`.
    """

    hidden: Tensor
    references: list[Tensor] | None = None
    refinement: dict | None = None  # a refiner's state (`DistributionRefinement.step`)


class Decoder(nn.Module):
    """A stack of `DecoderLayer`s returning every layer's output, each through the final `norm`.

    Args:
        layers: the decoder layers.
        norm: applied to each layer's output before it is returned (DETR: LayerNorm); None skips it
            (Deformable DETR has no final decoder norm).

    With reference points, every layer receives them scaled to each level's valid area; with
    `box_heads` (iterative box refinement) layer i's output refines them into boxes for layer i+1:
    `sigmoid(box_heads[i](queries) + logit(reference))`, detached so that each layer's box loss
    trains only its own head.
    """

    def __init__(self, layers: Sequence[nn.Module], norm: nn.Module | None = None) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.norm = norm

    @staticmethod
    def level_reference_points(reference_points: Tensor, valid_ratios: Tensor) -> Tensor:
        """`[B, Q, 2 or 4]` relative to the unpadded image -> `[B, Q, levels, 2 or 4]` per level.

        Each level's padded map is larger than the image, so coordinates shrink by its valid ratio
        (`valid_ratios` `[B, levels, 2]`, (x, y)); box sizes shrink the same way.
        """
        if reference_points.shape[-1] == 4:
            valid_ratios = torch.cat((valid_ratios, valid_ratios), dim=-1)  # (B, levels, 4)
        return reference_points[:, :, None] * valid_ratios[:, None]

    def forward(
        self,
        queries: Tensor,
        query_pos: Tensor | None,
        memory: Tensor,
        memory_pos: Tensor,
        *,
        reference_points: Tensor | None = None,
        valid_ratios: Tensor | None = None,
        box_heads: Sequence[nn.Module] | None = None,
        query_pos_head: nn.Module | None = None,
        self_attn_mask: Tensor | None = None,
        look_forward_twice: bool = False,
        logit_eps: float = 1e-5,
        num_layers: int | None = None,
        refiner: nn.Module | None = None,
        query_pos_clamp: float | None = None,
        **kwargs,
    ) -> DecoderOutput:
        """Queries `[B, Q, d]` through every layer.

        Args:
            queries: `[B, Q, d]`. query_pos: `[B, Q, d]`, or None with `query_pos_head`.
            memory, memory_pos: `[B, S, d]`.
            reference_points: `[B, Q, 2]` normalized (x, y) or `[B, Q, 4]` normalized (cx, cy, w, h),
                relative to each image's unpadded extent; needs `valid_ratios` `[B, levels, 2]`.
            box_heads: one module per layer mapping `[B, Q, d]` -> `[B, Q, 4]` box deltas; refines the
                reference points between layers (needs `reference_points`).
            query_pos_head: DAB/DINO: maps each layer's current reference boxes (scaled to the first
                level, `[B, Q, 4]`) to that layer's `query_pos` `[B, Q, d]`, replacing `query_pos`.
            self_attn_mask: bool `[Q, Q]` (True = may NOT attend), given to every layer's self-attention.
            look_forward_twice: DINO: the references returned for layer i + 1 keep the gradient of
                layer i's refinement (the next layer's input stays detached, as the official code).
            logit_eps: clamp of the logit in the box refinement (Deformable DETR 1e-5, DINO 1e-3).
            num_layers: run only the first `num_layers` layers (None: all; RT-DETR-R50-m evaluates
                with 3 of its 6, the official `eval_idx`).
            refiner: D-FINE's `DistributionRefinement` in place of `box_heads`: after every layer its
                `step` turns the layer's queries into the next layer's reference boxes (needs `[B, Q, 4]`
                reference boxes); its state is returned as `DecoderOutput.refinement`.
            query_pos_clamp: clamp every layer's query positions from `query_pos_head` to
                `[-clamp, clamp]` (D-FINE: 10); None leaves them.
            kwargs: passed to every `DecoderLayer.forward` (`memory_padding_mask`, `spatial_shapes`,
                `level_start_index`).
        Raises:
            ValueError: box heads without reference points or too few of them; reference points without
                valid ratios; a `query_pos_head` without reference boxes; neither query_pos nor its head.
        """
        if query_pos_head is not None and (reference_points is None or reference_points.shape[-1] != 4):
            raise ValueError("a query-position head needs [B, Q, 4] reference boxes")
        if query_pos is None and query_pos_head is None:
            raise ValueError("the decoder needs query_pos or a query_pos_head")
        if box_heads is not None and (reference_points is None or len(box_heads) < len(self.layers)):
            raise ValueError(
                f"box refinement needs reference points and one box head per decoder layer "
                f"({len(self.layers)}), got {'no' if box_heads is None else len(box_heads)} heads and "
                f"{'no' if reference_points is None else 'some'} reference points"
            )
        if reference_points is not None and valid_ratios is None:
            raise ValueError("reference points need the valid ratios of the feature levels")
        if refiner is not None and (
            box_heads is not None or reference_points is None or reference_points.shape[-1] != 4
        ):
            raise ValueError("a refiner needs [B, Q, 4] reference boxes and replaces the box heads")
        state = refiner.begin() if refiner is not None else None
        if self_attn_mask is not None:
            kwargs["self_attn_mask"] = self_attn_mask
        outputs, references = [], []
        returned_reference = reference_points  # what the detector predicts relative to
        for index, layer in enumerate(self.layers[:num_layers]):
            level_points = None
            if reference_points is not None:
                references.append(returned_reference)
                level_points = self.level_reference_points(reference_points, valid_ratios)
            if query_pos_head is not None:
                query_pos = query_pos_head(level_points[:, :, 0])  # boxes scaled to the first level
                if query_pos_clamp is not None:
                    query_pos = query_pos.clamp(-query_pos_clamp, query_pos_clamp)
            queries = layer(queries, query_pos, memory, memory_pos, reference_points=level_points, **kwargs)
            outputs.append(self.norm(queries) if self.norm is not None else queries)
            if refiner is not None:
                reference_points = refiner.step(index, outputs[-1], reference_points, state)
                returned_reference = reference_points
            elif box_heads is not None:
                refined = refine_boxes(box_heads[index](queries), reference_points, eps=logit_eps)
                reference_points = refined.detach()
                returned_reference = refined if look_forward_twice else reference_points
        return DecoderOutput(torch.stack(outputs), references if references else None, state)


@dataclass
class EncoderOutput:
    """What the decoder (and distillation) needs from the encoder.

    memory `[B, S, d]`; memory_pos `[B, S, d]` (position + level embeddings; None for a model without
    memory positions); memory_padding_mask
    bool `[B, S]` (True = padding); spatial_shapes int64 `[levels, 2]` (H, W); level_start_index
    int64 `[levels]`; valid_ratios float `[B, levels, 2]` (x, y): the unpadded fraction of each level;
    valid_sizes int64 `[B, levels, 2]` (width, height): the unpadded extent of each level in its pixels.
    """

    memory: Tensor
    memory_pos: Tensor | None
    memory_padding_mask: Tensor
    spatial_shapes: Tensor
    level_start_index: Tensor
    valid_ratios: Tensor
    valid_sizes: Tensor


def flatten_levels(
    features: Sequence[Tensor], masks: Sequence[Tensor], pos: Sequence[Tensor] | None
) -> tuple[Tensor, Tensor | None, Tensor, Tensor, Tensor]:
    """Flatten and concatenate feature levels into one token sequence.

    Args:
        features, pos: per level float `[B, d, H_l, W_l]` (pos may be None: no positions);
        masks: per level bool `[B, H_l, W_l]`.
    Returns:
        tokens `[B, S, d]`, pos `[B, S, d]` (or None), padding_mask `[B, S]` (True = padding),
        spatial_shapes int64 `[levels, 2]` (H, W), level_start_index int64 `[levels]`.
    """
    num_pos = len(features) if pos is None else len(pos)
    if not (len(features) == len(masks) == num_pos) or not features:
        raise ValueError(
            f"need the same non-zero number of feature maps, masks and position maps; got "
            f"{len(features)}, {len(masks)}, {num_pos}"
        )
    tokens = torch.cat([f.flatten(2).transpose(1, 2) for f in features], dim=1)  # (B, S, d)
    flat_pos = None if pos is None else torch.cat([p.flatten(2).transpose(1, 2) for p in pos], dim=1)
    padding_mask = torch.cat([m.flatten(1) for m in masks], dim=1)  # (B, S)
    # One 0-dim tensor per size rather than a list of ints: a traced graph (ONNX export) then reads
    # the level sizes from its input instead of freezing those of the example input.
    spatial_shapes = torch.stack(
        [torch.stack([torch.as_tensor(size, dtype=torch.long) for size in f.shape[-2:]]) for f in features]
    ).to(tokens.device)  # (levels, 2)
    areas = spatial_shapes.prod(1)
    level_start_index = torch.cat((areas.new_zeros(1), areas.cumsum(0)[:-1]))
    return tokens, flat_pos, padding_mask, spatial_shapes, level_start_index


def valid_sizes(masks: Sequence[Tensor]) -> Tensor:
    """Per level bool `[B, H_l, W_l]` (True = padding) -> int64 `[B, levels, 2]`: each level's unpadded
    (width, height) in its own pixels (`valid_extent`)."""
    return torch.stack([valid_extent(mask) for mask in masks], dim=1)


def valid_ratios(masks: Sequence[Tensor]) -> Tensor:
    """Per level bool `[B, H_l, W_l]` (True = padding) -> `[B, levels, 2]` (x, y) unpadded fraction."""
    ratios = []
    for mask in masks:
        height, width = mask.shape[-2:]  # divided as sizes, so a traced graph reads them from its input
        valid_w, valid_h = valid_extent(mask).float().unbind(-1)
        ratios.append(torch.stack((valid_w / width, valid_h / height), dim=-1))
    return torch.stack(ratios, dim=1)


def encoder_reference_points(spatial_shapes: Tensor, ratios: Tensor) -> Tensor:
    """Pixel-centre reference points of every token for multi-scale attention.

    Each token's centre is normalized by its own level's valid extent, then expressed in every
    level's normalized coordinates (multiplied by that level's valid ratio), as Deformable DETR.

    Args:
        spatial_shapes: int64 `[levels, 2]` (H, W). ratios: `[B, levels, 2]` (x, y), from `valid_ratios`.
    Returns:
        `[B, S, levels, 2]` (x, y).
    """
    points = []
    # Traced (ONNX export), the sizes stay 0-dim tensors so that the graph reads them from its input;
    # eager, one host read of all of them.
    sizes = spatial_shapes if torch.jit.is_tracing() else spatial_shapes.tolist()
    for level, (height, width) in enumerate(sizes):
        ys, xs = torch.meshgrid(
            torch.arange(height, dtype=ratios.dtype, device=ratios.device) + 0.5,
            torch.arange(width, dtype=ratios.dtype, device=ratios.device) + 0.5,
            indexing="ij",
        )  # (H, W) each
        x = xs.reshape(1, -1) / (ratios[:, None, level, 0] * width)  # (B, H*W)
        y = ys.reshape(1, -1) / (ratios[:, None, level, 1] * height)
        points.append(torch.stack((x, y), dim=-1))  # (B, H*W, 2)
    reference = torch.cat(points, dim=1)  # (B, S, 2)
    return reference[:, :, None] * ratios[:, None]  # (B, S, levels, 2)


class Transformer(nn.Module):
    """Encoder over flattened multi-level features and a decoder of object queries.

    Args:
        encoder: an `Encoder` (its layers hold their own self-attention modules).
        decoder: a `Decoder`.
        embed_dim: token width d.
        num_levels: when given, a learned level embedding `level_embed` `[num_levels, d]` is added to
            each level's position embedding (multi-scale models); None (DETR) adds nothing.

    `forward` = `encode` + `decode`; models that build their queries from the memory (two-stage)
    call the two halves themselves.
    """

    def __init__(
        self, encoder: Encoder, decoder: Decoder, *, embed_dim: int, num_levels: int | None = None
    ) -> None:
        super().__init__()
        self.encoder = encoder
        self.decoder = decoder
        self.embed_dim = embed_dim
        self.level_embed = nn.Parameter(torch.empty(num_levels, embed_dim)) if num_levels else None
        self.reset_parameters()

    def attention_modules(self) -> list[nn.Module]:
        modules = [layer.self_attn for layer in self.encoder.layers]
        for layer in self.decoder.layers:
            modules += [layer.self_attn, layer.cross_attn]
        return modules

    def reset_parameters(self) -> None:
        # As the reference models: Xavier-uniform for every matrix, then each attention module's own
        # initialisation (which reproduces nn.MultiheadAttention's packed-projection scheme or the
        # deformable sampling-offset grid), then the level embedding ~ N(0, 1).
        for param in self.parameters():
            if param.dim() > 1:
                nn.init.xavier_uniform_(param)
        for module in self.attention_modules():
            if hasattr(module, "reset_parameters"):
                module.reset_parameters()
        for module in self.modules():
            if isinstance(module, GatedFusion):  # D-FINE's gates start as an even mix
                module.reset_parameters()
        if self.level_embed is not None:
            nn.init.normal_(self.level_embed)

    def encode(
        self, features: Sequence[Tensor], masks: Sequence[Tensor], pos: Sequence[Tensor] | None
    ) -> EncoderOutput:
        """Run the encoder on feature levels already projected to width d.

        Args:
            features: per level `[B, d, H_l, W_l]`; masks: per level bool `[B, H_l, W_l]` (True =
                padding); pos: per level position embeddings `[B, d, H_l, W_l]`, or None for a model
                without memory positions (no encoder layers and a decoder that reads no keys).
        Raises:
            ValueError: no positions for a model with encoder layers or a level embedding, or a level
                count other than the level embedding's.
        """
        if pos is None and (self.level_embed is not None or len(self.encoder.layers)):
            raise ValueError("encoder layers and level embeddings need position embeddings")
        if self.level_embed is not None:
            if len(pos) != self.level_embed.shape[0]:
                raise ValueError(
                    f"transformer expects {self.level_embed.shape[0]} feature levels, got {len(pos)}"
                )
            pos = [p + self.level_embed[level].view(1, -1, 1, 1) for level, p in enumerate(pos)]
        tokens, memory_pos, padding_mask, spatial_shapes, level_start_index = flatten_levels(
            features, masks, pos
        )
        ratios = valid_ratios(masks).to(tokens.dtype)
        sizes = valid_sizes(masks)
        memory = tokens
        if len(self.encoder.layers):
            memory = self.encoder(
                tokens,
                memory_pos,
                padding_mask=padding_mask,
                reference_points=encoder_reference_points(spatial_shapes, ratios),
                spatial_shapes=spatial_shapes,
                level_start_index=level_start_index,
            )
        return EncoderOutput(
            memory, memory_pos, padding_mask, spatial_shapes, level_start_index, ratios, sizes
        )

    def decode(
        self,
        queries: Tensor,
        query_pos: Tensor,
        encoded: EncoderOutput,
        *,
        reference_points: Tensor | None = None,
        box_heads: Sequence[nn.Module] | None = None,
        **decoder_options,
    ) -> DecoderOutput:
        """Decode queries `[B, Q, d]` with embeddings `query_pos` `[B, Q, d]` against the memory.

        `reference_points` `[B, Q, 2 or 4]` are normalized to each image's unpadded extent; the
        decoder scales them to every level for the cross-attention. `box_heads` (one per layer)
        turn on iterative box refinement; `decoder_options` (`query_pos_head`, `self_attn_mask`,
        `look_forward_twice`, `logit_eps`) go to `Decoder.forward`.
        """
        return self.decoder(
            queries,
            query_pos,
            encoded.memory,
            encoded.memory_pos,
            reference_points=reference_points,
            valid_ratios=encoded.valid_ratios,
            box_heads=box_heads,
            **decoder_options,
            memory_padding_mask=encoded.memory_padding_mask,
            spatial_shapes=encoded.spatial_shapes,
            level_start_index=encoded.level_start_index,
        )

    def forward(
        self,
        features: Sequence[Tensor],
        masks: Sequence[Tensor],
        pos: Sequence[Tensor],
        queries: Tensor,
        query_pos: Tensor,
        *,
        reference_points: Tensor | None = None,
    ) -> tuple[DecoderOutput, EncoderOutput]:
        """Encode the levels, decode the queries: -> (`DecoderOutput`, `EncoderOutput`)."""
        encoded = self.encode(features, masks, pos)
        return self.decode(queries, query_pos, encoded, reference_points=reference_points), encoded
