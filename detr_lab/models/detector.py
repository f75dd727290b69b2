"""The detector, assembled from parts: backbone -> neck -> encoder -> query source -> decoder -> head.

One class serves every member; what differs is the parts it is given and the properties the query
source's spec declares (`detr_lab.models.queries.QUERY_SOURCES`):

- DETR: learned query embeddings ("learned"), boxes predicted absolutely;
- Deformable DETR: reference points ("learned_points") or two-stage proposals ("proposals"), boxes
  predicted relative to them, optional iterative box refinement (one head per decoder layer);
- DAB-DETR / DINO: 4-D anchor boxes ("learned_anchors", "mixed_selection") whose sine embedding
  gives every layer's query position, contrastive denoising queries as an extra source in training,
  look-forward-twice;
- ACT: any of these with the clustering attention in the encoder.

Its outputs hold the prediction groups it declares in `groups` (`detr_lab.models.groups`): the main
queries, the auxiliary decoder layers, the encoder proposals and the denoising queries.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

from torch import Tensor, nn

from detr_lab.models.activations import activation_function
from detr_lab.models.backbones import Backbone
from detr_lab.models.classification import Classification
from detr_lab.models.groups import PredictionGroup, denoising_groups, main_groups
from detr_lab.models.queries import QuerySourceSpec
from detr_lab.models.queries.denoising import ContrastiveDenoising, DenoisingLayout
from detr_lab.models.queries.query_set import QuerySet, concat_query_sets
from detr_lab.models.transformer import EncoderOutput, Transformer, refine_boxes


class MLP(nn.Module):
    """`num_layers` linear layers with an activation between them (ReLU, or a name of
    `detr_lab.models.activations.ACTIVATIONS`): `[..., in_dim]` -> `[..., out_dim]`."""

    def __init__(
        self, in_dim: int, hidden_dim: int, out_dim: int, num_layers: int, *, activation: str = "relu"
    ) -> None:
        super().__init__()
        dims = [in_dim] + [hidden_dim] * (num_layers - 1) + [out_dim]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:], strict=True))
        self.activation = activation
        self.act = activation_function(activation)

    def forward(self, x: Tensor) -> Tensor:
        for index, layer in enumerate(self.layers):
            x = layer(x)
            if index < len(self.layers) - 1:
                x = self.act(x)
        return x


def layer_outputs(logits: Sequence[Tensor], boxes: Sequence[Tensor], aux_loss: bool) -> dict:
    """Per-layer predictions (shallowest first) -> the output dict of the last layer with `aux_outputs`."""
    outputs: dict = {"pred_logits": logits[-1], "pred_boxes": boxes[-1]}
    outputs["aux_outputs"] = (
        [{"pred_logits": a, "pred_boxes": b} for a, b in zip(logits[:-1], boxes[:-1], strict=True)]
        if aux_loss
        else []
    )
    return outputs


class Detector(nn.Module):
    """A set-prediction detector assembled from its parts.

    Args:
        backbone: images + padding mask -> feature levels (`Backbone.forward`).
        neck: backbone levels -> encoder levels of width d and their masks (`detr_lab.models.necks`).
        position_encoding: padding mask `[B, H, W]` -> position embeddings `[B, d, H, W]`; None for a
            model whose memory needs no positions (no encoder layers, a decoder reading no keys).
        transformer: a `Transformer` of width d (encoder and decoder with their attention modules).
        query_source: encoder output -> the matching queries' `QuerySet` (`detr_lab.models.queries`).
        query_spec: the source's `QuerySourceSpec`.
        class_embed, bbox_embed: the class head `[..., d]` -> `[..., C]` and the box head (3-layer MLP
            d -> 4), one module shared by every decoder layer, or a `ModuleList` with one per layer
            (two-stage: one more for the proposals, after the layers').
        num_classes: real classes. num_queries: matching queries.
        classification: the strategy of the class logits (`detr_lab.models.classification`).
        box_refine: each decoder layer refines the previous layer's boxes (its box head's deltas).
        aux_loss: also return every earlier decoder layer's predictions.
        look_forward_twice: see `Decoder.forward` (DINO).
        query_pos_head: for sources whose spec has `position_from_boxes`, the head of its
            `position_head` (`detr_lab.models.queries.embedding.POSITION_HEADS`): boxes `[B, Q, 4]`
            -> query positions `[B, Q, d]`.
        denoising: a `ContrastiveDenoising` extra source (training only), or None.
        eval_layers: in eval mode run only the first `eval_layers` decoder layers and predict from the
            last of them (RT-DETR-R50-m: 3 of 6, the official `eval_idx: 2`); None: all.
        refiner: D-FINE's fine-grained distribution refinement (`detr_lab.models.distribution`), which
            replaces the box heads (`bbox_embed` is then unused by the decoder layers) and adds the
            outputs `pred_corners`, `ref_points` per layer and `pre_outputs`; needs `box_refine`.
        query_pos_clamp: clamp the query positions from `query_pos_head` to +-this (D-FINE: 10).

    Attributes besides the parts: `groups`, the declared prediction groups.
    """

    def __init__(
        self,
        *,
        backbone: Backbone,
        neck: nn.Module,
        position_encoding: nn.Module | None,
        transformer: Transformer,
        query_source: nn.Module,
        query_spec: QuerySourceSpec,
        class_embed: nn.Module,
        bbox_embed: nn.Module,
        num_classes: int,
        num_queries: int,
        classification: Classification,
        box_refine: bool = False,
        aux_loss: bool = True,
        look_forward_twice: bool = False,
        query_pos_head: nn.Module | None = None,
        denoising: ContrastiveDenoising | None = None,
        eval_layers: int | None = None,
        refiner: nn.Module | None = None,
        query_pos_clamp: float | None = None,
    ) -> None:
        super().__init__()
        if query_spec.position_from_boxes and query_pos_head is None:
            raise ValueError("a query source with position_from_boxes needs a query_pos_head")
        if box_refine and query_spec.box_dim == 0:
            raise ValueError("box refinement needs a query source with reference points or boxes")
        if denoising is not None and not query_spec.position_from_boxes:
            raise ValueError("denoising queries need a query source whose spec has position_from_boxes")
        if refiner is not None and (not box_refine or query_spec.box_dim != 4):
            raise ValueError("distribution refinement needs box_refine and a query source with boxes")
        self.backbone = backbone
        self.neck = neck
        self.position_encoding = position_encoding
        self.transformer = transformer
        self.query_source = query_source
        self.query_spec = query_spec
        self.query_pos_head = query_pos_head
        self.denoising = denoising
        self.class_embed = class_embed
        self.bbox_embed = bbox_embed
        self.num_classes = num_classes
        self.num_queries = num_queries
        self.classification = classification
        self.box_refine = box_refine
        self.aux_loss = aux_loss
        self.look_forward_twice = look_forward_twice
        self.num_decoder_layers = len(transformer.decoder.layers)
        if eval_layers is not None and not 1 <= eval_layers <= self.num_decoder_layers:
            raise ValueError(f"eval_layers must be in 1..{self.num_decoder_layers}, got {eval_layers}")
        self.eval_layers = eval_layers
        self.refiner = refiner
        self.query_pos_clamp = query_pos_clamp
        num_aux = self.num_decoder_layers - 1 if aux_loss else 0
        pre = refiner is not None and aux_loss
        groups = main_groups(num_aux, proposals=query_spec.proposals, pre=pre)
        if denoising is not None:
            groups += denoising_groups(num_aux, pre=pre)
        self.groups: tuple[PredictionGroup, ...] = tuple(groups)

    @property
    def num_levels(self) -> int:
        return self.neck.num_levels

    def class_head(self, layer: int) -> nn.Module:
        """The class head of decoder layer `layer` (index `num_decoder_layers`: the proposals)."""
        return self.class_embed[layer] if isinstance(self.class_embed, nn.ModuleList) else self.class_embed

    def box_head(self, layer: int) -> nn.Module:
        return self.bbox_embed[layer] if isinstance(self.bbox_embed, nn.ModuleList) else self.bbox_embed

    def feature_levels(
        self, images: Tensor, padding_mask: Tensor
    ) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
        """Encoder input levels, shallowest first.

        Args:
            images: float `[B, 3, H, W]`, normalized, zero-padded bottom/right.
            padding_mask: bool `[B, H, W]`, True = padding.
        Returns:
            features `[B, d, H_l, W_l]`, masks bool `[B, H_l, W_l]` (True = padding) and position
            embeddings `[B, d, H_l, W_l]`, one of each per level (None without a position encoding).
        """
        features, masks = self.neck(self.backbone(images, padding_mask), padding_mask)
        if self.position_encoding is None:
            return features, masks, None
        pos = [
            self.position_encoding(mask).to(feature.dtype)
            for feature, mask in zip(features, masks, strict=True)
        ]
        return features, masks, pos

    def queries(
        self, encoded: EncoderOutput, targets: list[dict] | None
    ) -> tuple[QuerySet, DenoisingLayout | None]:
        """The matching queries, preceded in training by the denoising queries made from `targets`."""
        if self.query_spec.proposal_heads:
            layer = self.num_decoder_layers  # the proposal heads follow the decoder layers' heads
            query_set = self.query_source(encoded, (self.class_head(layer), self.box_head(layer)))
        else:
            query_set = self.query_source(encoded)
        if self.denoising is None or not self.training or targets is None:
            return query_set, None
        dn_set = self.denoising(targets, query_set.num_queries)
        return concat_query_sets(dn_set, query_set), dn_set.meta["dn_layout"]

    def forward(
        self,
        images: Tensor,
        padding_mask: Tensor,
        *,
        targets: list[dict] | None = None,
        return_memory: bool = False,
    ) -> dict:
        """Detect objects in a padded batch.

        Args:
            images: float `[B, 3, H, W]`, ImageNet-normalized, zero-padded bottom/right.
            padding_mask: bool `[B, H, W]`, True = padding.
            targets: in training, B dicts with `labels` int64 `[N_i]` and `boxes` `[N_i, 4]` normalized
                cxcywh, for the extra sources that use them (denoising); ignored otherwise.
            return_memory: also return the encoder output.
        Returns:
            dict with `pred_logits` `[B, Q, C]` (C = num_classes + 1 with softmax, num_classes with
            sigmoid), `pred_boxes` `[B, Q, 4]` (normalized cxcywh, relative to each image's unpadded
            extent), `aux_outputs` (one such dict per earlier decoder layer, shallowest first; empty
            without `aux_loss`); with encoder proposals `enc_outputs` (`pred_logits`, `pred_boxes`);
            when denoising ran, `dn_outputs` (the same structure over the P denoising queries) and
            `dn_meta` (a `DenoisingLayout`); with `return_memory`, `memory` `[B, S, d]` and
            `memory_padding_mask` bool `[B, S]` (True = padding; S = sum of H_l * W_l over the levels).
        """
        features, masks, pos = self.feature_levels(images, padding_mask)
        encoded = self.transformer.encode(features, masks, pos)
        query_set, layout = self.queries(encoded, targets)
        spec = self.query_spec
        box_heads = None
        if self.box_refine and self.refiner is None:
            box_heads = [self.box_head(i) for i in range(self.num_decoder_layers)]
        decoded = self.transformer.decode(
            query_set.queries,
            query_set.query_pos,
            encoded,
            reference_points=query_set.reference_points,
            box_heads=box_heads,
            query_pos_head=self.query_pos_head,
            self_attn_mask=query_set.attn_mask,
            look_forward_twice=self.look_forward_twice,
            logit_eps=spec.logit_eps,
            num_layers=None if self.training else self.eval_layers,
            refiner=self.refiner,
            query_pos_clamp=self.query_pos_clamp,
        )
        hidden = decoded.hidden  # (L, B, P + Q, d)
        if self.denoising is not None and self.training:
            # The label embedding takes part in every step's graph, also when no image has objects
            # (so every rank of a distributed run uses the same parameters), as the official code.
            hidden = hidden + self.denoising.label_embed.weight[0, 0] * 0.0
        pad = layout.pad_size if layout is not None else 0
        if decoded.refinement is not None:
            outputs = self.distribution_outputs(hidden, decoded.refinement, pad)
        else:
            logits, boxes = self.predict(hidden, decoded.references)
            outputs = layer_outputs([x[:, pad:] for x in logits], [x[:, pad:] for x in boxes], self.aux_loss)
            if pad:
                outputs["dn_outputs"] = layer_outputs(
                    [x[:, :pad] for x in logits], [x[:, :pad] for x in boxes], self.aux_loss
                )
        if "enc_outputs" in query_set.meta:
            outputs["enc_outputs"] = query_set.meta["enc_outputs"]
        if layout is not None:
            outputs["dn_meta"] = layout
        if return_memory:
            outputs["memory"] = encoded.memory
            outputs["memory_padding_mask"] = encoded.memory_padding_mask
        return outputs

    def distribution_outputs(self, hidden: Tensor, refinement: dict, pad: int) -> dict:
        """The outputs of a model with distribution refinement (D-FINE).

        Every layer's dict holds `pred_logits` `[B, Q, C]` (after the LQE), `pred_boxes` `[B, Q, 4]`
        (normalized cxcywh), `pred_corners` `[B, Q, 4 * (reg_max + 1)]` (edge-distribution logits) and
        `ref_points` `[B, Q, 4]` (the initial boxes the distances refine); the auxiliary layers also
        `teacher_corners` / `teacher_logits`, the final layer's (for the DDF loss); `pre_outputs` holds
        the first layer's plain prediction (`pred_logits` before the LQE, `pred_boxes` from the
        pre-box head). The first `pad` queries (denoising) go to `dn_outputs` / `dn_pre_outputs`.
        """
        refiner = self.refiner
        logits = [
            refiner.adjust_logits(i, self.class_head(i)(h), corners)
            for i, (h, corners) in enumerate(zip(hidden, refinement["corners"], strict=True))
        ]
        pre_logits = self.class_head(0)(hidden[0])

        def layers(part: slice) -> dict:
            corners = [c[:, part] for c in refinement["corners"]]
            initial = refinement["initial"][:, part]
            layer_dicts = [
                {
                    "pred_logits": lg[:, part],
                    "pred_boxes": bx[:, part],
                    "pred_corners": c,
                    "ref_points": initial,
                }
                for lg, bx, c in zip(logits, refinement["boxes"], corners, strict=True)
            ]
            outputs = dict(layer_dicts[-1])
            outputs["aux_outputs"] = []
            if self.aux_loss:
                teacher = {"teacher_corners": corners[-1], "teacher_logits": logits[-1][:, part]}
                outputs["aux_outputs"] = [{**layer, **teacher} for layer in layer_dicts[:-1]]
                outputs["pre_outputs"] = {
                    "pred_logits": pre_logits[:, part],
                    "pred_boxes": refinement["pre_boxes"][:, part],
                }
            return outputs

        outputs = layers(slice(pad, None))
        if pad:
            dn = layers(slice(0, pad))
            if "pre_outputs" in dn:
                outputs["dn_pre_outputs"] = dn.pop("pre_outputs")
            outputs["dn_outputs"] = dn
        return outputs

    def predict(self, hidden: Tensor, references: list[Tensor] | None) -> tuple[list[Tensor], list[Tensor]]:
        """Every decoder layer's class logits `[B, Q, C]` and boxes `[B, Q, 4]` (normalized cxcywh):
        absolute (`sigmoid(box head)`) without references, else relative to each layer's reference."""
        if references is None:
            if isinstance(self.class_embed, nn.ModuleList):
                return (
                    [self.class_head(i)(h) for i, h in enumerate(hidden)],
                    [self.box_head(i)(h).sigmoid() for i, h in enumerate(hidden)],
                )
            return list(self.class_embed(hidden)), list(self.bbox_embed(hidden).sigmoid())
        eps = self.query_spec.logit_eps
        logits, boxes = [], []
        for layer, (layer_hidden, reference) in enumerate(zip(hidden, references, strict=True)):
            logits.append(self.class_head(layer)(layer_hidden))
            boxes.append(refine_boxes(self.box_head(layer)(layer_hidden), reference, eps=eps))
        return logits, boxes


def prediction_heads(
    class_head: nn.Module,
    box_head: MLP,
    *,
    num_layers: int,
    per_layer: bool,
    proposal_heads: bool = False,
    initial_size_bias: float | None = None,
) -> tuple[nn.Module, nn.Module]:
    """The detector's class and box heads from one initialised pair.

    Args:
        class_head, box_head: the pair every copy starts from.
        num_layers: decoder layers.
        per_layer: one (deep-copied) pair per decoder layer, else the pair shared by all.
        proposal_heads: one more pair after the layers' (two-stage proposals; needs `per_layer`).
        initial_size_bias: the first box head's size bias (`bias[2:]` of its last layer): Deformable
            DETR starts sizes at sigmoid(-2) where reference points become boxes; None leaves it.
    Returns:
        (class_embed, bbox_embed): modules, or `ModuleList`s with `per_layer`.
    """
    if not per_layer:
        if proposal_heads:
            raise ValueError("proposal heads need one head pair per decoder layer")
        if initial_size_bias is not None:
            nn.init.constant_(box_head.layers[-1].bias[2:], initial_size_bias)
        return class_head, box_head
    count = num_layers + (1 if proposal_heads else 0)
    class_embed = nn.ModuleList(copy.deepcopy(class_head) for _ in range(count))
    bbox_embed = nn.ModuleList(copy.deepcopy(box_head) for _ in range(count))
    if initial_size_bias is not None:
        nn.init.constant_(bbox_embed[0].layers[-1].bias[2:], initial_size_bias)
    return class_embed, bbox_embed
