"""Checkpoints: safe loading, detr_lab's own format, Lightning checkpoints and official weights.

    loaded = load_checkpoint("runs/x/model.pt")               # detr_lab, Lightning or official file
    model, cfg = load_official("detr-r50-e632da11.pth")       # official DETR -> detr_lab model
    model, cfg = load_official("r50_deformable_detr-checkpoint.pth")  # official Deformable DETR
    save_checkpoint("model.pt", model, cfg, category_ids, class_names)

Every file goes through `safe_load` (`torch.load(weights_only=True)`): a file that would need to run
pickled code is refused. Official checkpoints (facebookresearch/detr, fundamentalvision/
Deformable-DETR) are converted by an explicit key map per detector family (`OFFICIAL_FAMILIES`); a
key left unmapped or a parameter left unfilled is an error, so a partial load cannot pass silently.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import pickle
import re
import tempfile
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from torch import Tensor, nn

from detr_lab.config import Config, ConfigError, config_from_dict, config_to_dict
from detr_lab.models.build import build_model

FORMAT_NAME = "detr_lab"
FORMAT_VERSION = 1
LIGHTNING_META_KEY = "detr_lab"  # the entry the training engine adds to Lightning checkpoints
LIGHTNING_MODEL_PREFIX = "model."

# COCO 2017 category id -> name (80 categories with gaps in 1..90).
COCO_CATEGORY_NAMES = {
    1: "person", 2: "bicycle", 3: "car", 4: "motorcycle", 5: "airplane", 6: "bus", 7: "train",
    8: "truck", 9: "boat", 10: "traffic light", 11: "fire hydrant", 13: "stop sign",
    14: "parking meter", 15: "bench", 16: "bird", 17: "cat", 18: "dog", 19: "horse", 20: "sheep",
    21: "cow", 22: "elephant", 23: "bear", 24: "zebra", 25: "giraffe", 27: "backpack",
    28: "umbrella", 31: "handbag", 32: "tie", 33: "suitcase", 34: "frisbee", 35: "skis",
    36: "snowboard", 37: "sports ball", 38: "kite", 39: "baseball bat", 40: "baseball glove",
    41: "skateboard", 42: "surfboard", 43: "tennis racket", 44: "bottle", 46: "wine glass",
    47: "cup", 48: "fork", 49: "knife", 50: "spoon", 51: "bowl", 52: "banana", 53: "apple",
    54: "sandwich", 55: "orange", 56: "broccoli", 57: "carrot", 58: "hot dog", 59: "pizza",
    60: "donut", 61: "cake", 62: "chair", 63: "couch", 64: "potted plant", 65: "bed",
    67: "dining table", 70: "toilet", 72: "tv", 73: "laptop", 74: "mouse", 75: "remote",
    76: "keyboard", 77: "cell phone", 78: "microwave", 79: "oven", 80: "toaster", 81: "sink",
    82: "refrigerator", 84: "book", 85: "clock", 86: "vase", 87: "scissors", 88: "teddy bear",
    89: "hair drier", 90: "toothbrush",
}  # fmt: skip


class CheckpointError(ValueError):
    """A checkpoint file or dict cannot be read or does not fit the model. The message says which."""


# -------------------------------------------------------------------------------------- safe loading
_GLOBAL_PATTERN = re.compile(r"Unsupported global: GLOBAL ([\w.<>]+)")


def safe_load(path: str | os.PathLike) -> Any:
    """`torch.load(path, weights_only=True)` onto the CPU, with clear errors.

    Tensors, containers, numbers, strings and `argparse.Namespace` (official checkpoints store their
    training arguments as one) load; anything that needs other pickled code (functions, custom
    classes) is refused.

    Raises:
        CheckpointError: the file is missing, unreadable, not a PyTorch file, or needs pickled code.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint file not found: {path}")
    if not path.is_file():
        raise CheckpointError(f"checkpoint path is not a file: {path}")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        found = _GLOBAL_PATTERN.search(str(err))
        if found:
            raise CheckpointError(
                f"{path}: refused: loading it would run pickled code ({found.group(1)}); only tensors, "
                "containers, numbers and strings are accepted"
            ) from None
        raise CheckpointError(
            f"{path}: not a readable PyTorch checkpoint (corrupt or another format)"
        ) from None
    except OSError as err:
        raise CheckpointError(f"{path}: cannot read: {err.strerror or err}") from None
    except Exception as err:  # corrupt files surface as many error types (zip, pickle, index, EOF)
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({first_line})") from None


def _read(source: str | os.PathLike | Mapping) -> tuple[Any, str]:
    """(loaded object, a name for messages)."""
    if isinstance(source, Mapping):
        return source, "checkpoint dict"
    return safe_load(source), str(source)


# ------------------------------------------------------------------------------- state-dict checks
def load_state_exactly(model: nn.Module, state: Mapping[str, Tensor], source: str) -> None:
    """`model.load_state_dict(state)` that fails with a message naming a few offending keys."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mismatched = sorted(
        k for k in set(state) & set(expected) if tuple(state[k].shape) != tuple(expected[k].shape)
    )
    if missing or unexpected or mismatched:
        problems = []
        if missing:
            problems.append(f"{len(missing)} missing (e.g. {', '.join(missing[:5])})")
        if unexpected:
            problems.append(f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:5])})")
        if mismatched:
            shapes = [
                f"{k}: {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}" for k in mismatched[:5]
            ]
            problems.append(f"{len(mismatched)} with a different shape (e.g. {'; '.join(shapes)})")
        raise CheckpointError(f"{source}: weights do not fit the configured model: " + "; ".join(problems))
    model.load_state_dict(state)


def _build_loaded(cfg: Config, state: Mapping[str, Tensor], source: str) -> nn.Module:
    """Build `cfg.model` without fetching ImageNet weights, load `state` exactly, eval mode."""
    backbone = dataclasses.replace(cfg.model.backbone, pretrained=False, weights_path=None)
    model = build_model(dataclasses.replace(cfg.model, backbone=backbone))
    load_state_exactly(model, state, source)
    return model.eval()


def apply_overrides(stored: Mapping | Config, overrides: Sequence[str], where: str) -> Config:
    """A stored config (dict or `Config`) with dotted `key.path=value` overrides applied and validated."""
    data = config_to_dict(stored) if isinstance(stored, Config) else dict(stored)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' must look like key.path=value")
    merged = OmegaConf.merge(OmegaConf.create(data), OmegaConf.from_dotlist(list(overrides)))
    return config_from_dict(merged, where)


# ---------------------------------------------------------------------------- official checkpoints
def _count_indices(state: Mapping[str, Tensor], prefix: str) -> int:
    """Number of consecutive integer children `prefix{i}.` (0, 1, ...) among the keys."""
    found = {int(m.group(1)) for k in state if (m := re.match(re.escape(prefix) + r"(\d+)\.", k))}
    return max(found) + 1 if found else 0


def _require(state: Mapping[str, Tensor], key: str, family: str, *, ndim: int | None = None) -> Tensor:
    """`state[key]`, which must exist (and have `ndim` dimensions when given)."""
    if key not in state:
        raise CheckpointError(f"official {family} checkpoint: missing key '{key}'")
    if ndim is not None and state[key].dim() != ndim:
        raise CheckpointError(
            f"official {family} checkpoint: '{key}' has shape {tuple(state[key].shape)}; "
            f"expected {ndim} dimensions"
        )
    return state[key]


RESNET_DEPTHS = {
    (False, (2, 2, 2, 2)): "resnet18",
    (False, (3, 4, 6, 3)): "resnet34",
    (True, (3, 4, 6, 3)): "resnet50",
    (True, (3, 4, 23, 3)): "resnet101",
}


def infer_resnet(state: Mapping[str, Tensor], prefix: str) -> str:
    """ResNet name from the block counts of `{prefix}layer1..4` and the block type (bottleneck = conv3)."""
    counts = tuple(_count_indices(state, f"{prefix}layer{i}.") for i in range(1, 5))
    bottleneck = f"{prefix}layer1.0.conv3.weight" in state
    name = RESNET_DEPTHS.get((bottleneck, counts))
    if name is None:
        kind = "bottleneck" if bottleneck else "basic"
        raise CheckpointError(
            f"unsupported backbone in checkpoint: {kind} blocks {counts} per stage under '{prefix}' "
            "(supported: ResNet-18/34/50/101)"
        )
    return name


# Official DETR key -> detr_lab keys. A rule maps a key matching `pattern` to one or more target
# templates (several: the tensor is split evenly along dim 0, e.g. a packed q/k/v projection);
# an empty tuple drops the key on purpose.
KeyRule = tuple[str, tuple[str, ...]]

_DETR_LAYER = r"transformer\.(?P<stack>encoder|decoder)\.layers\.(?P<i>\d+)\."
DETR_KEY_RULES: list[KeyRule] = [
    (r"backbone\.0\.body\.(?P<rest>.+)\.num_batches_tracked", ()),
    (r"backbone\.0\.body\.(?P<rest>.+)", ("backbone.body.{rest}",)),
    (r"backbone\.1\.(?P<table>row_embed|col_embed)\.weight", ("position_encoding.{table}.weight",)),
    (r"input_proj\.(?P<p>weight|bias)", ("input_proj.0.{p}",)),
    (r"query_embed\.weight", ("query_embed.weight",)),
    (r"class_embed\.(?P<p>weight|bias)", ("class_embed.{p}",)),
    (r"bbox_embed\.layers\.(?P<j>\d+)\.(?P<p>weight|bias)", ("bbox_embed.layers.{j}.{p}",)),
    (
        _DETR_LAYER + r"(?P<attn>self_attn|multihead_attn)\.in_proj_(?P<p>weight|bias)",
        (
            "transformer.{stack}.layers.{i}.{attn}.q_proj.{p}",
            "transformer.{stack}.layers.{i}.{attn}.k_proj.{p}",
            "transformer.{stack}.layers.{i}.{attn}.v_proj.{p}",
        ),
    ),
    (
        _DETR_LAYER + r"(?P<attn>self_attn|multihead_attn)\.out_proj\.(?P<p>weight|bias)",
        ("transformer.{stack}.layers.{i}.{attn}.out_proj.{p}",),
    ),
    (
        _DETR_LAYER + r"linear(?P<n>[12])\.(?P<p>weight|bias)",
        ("transformer.{stack}.layers.{i}.ffn.linear{n}.{p}",),
    ),
    (
        _DETR_LAYER + r"norm(?P<norm>[123])\.(?P<p>weight|bias)",
        ("transformer.{stack}.layers.{i}.{norm}.{p}",),
    ),
    (r"transformer\.decoder\.norm\.(?P<p>weight|bias)", ("transformer.decoder.norm.{p}",)),
]
# Post-norm layers: which residual branch each official norm follows.
_DETR_NORMS = {
    "encoder": {"1": "self_attn_norm", "2": "ffn_norm"},
    "decoder": {"1": "self_attn_norm", "2": "cross_attn_norm", "3": "ffn_norm"},
}
_DETR_ATTENTION = {"self_attn": "self_attn", "multihead_attn": "cross_attn"}


def _detr_fields(groups: dict[str, str]) -> dict[str, str] | None:
    fields = dict(groups)
    if "attn" in fields:
        fields["attn"] = _DETR_ATTENTION[fields["attn"]]
    if "norm" in fields:
        norm = _DETR_NORMS[fields["stack"]].get(fields["norm"])
        if norm is None:  # e.g. an encoder norm3: no such branch
            return None
        fields["norm"] = norm
    return fields


def map_keys(
    state: Mapping[str, Tensor],
    rules: Sequence[KeyRule],
    fields: Callable[[dict[str, str]], dict[str, str] | None],
) -> tuple[dict[str, Tensor], list[str]]:
    """Apply key rules: -> (mapped state dict, official keys no rule mapped)."""
    compiled = [(re.compile(pattern), targets) for pattern, targets in rules]
    mapped: dict[str, Tensor] = {}
    unmapped: list[str] = []
    for key, tensor in state.items():
        for pattern, targets in compiled:
            match = pattern.fullmatch(key)
            if match is None:
                continue
            values = fields(match.groupdict())
            if values is None:
                continue
            if targets:
                parts = tensor.chunk(len(targets)) if len(targets) > 1 else (tensor,)
                for target, part in zip(targets, parts, strict=True):
                    mapped[target.format(**values)] = part
            break
        else:
            unmapped.append(key)
    return mapped, unmapped


@dataclass
class OfficialFamily:
    """How one official detector family's checkpoints become detr_lab models.

    `matches(state)` recognises the family's keys; `infer_config(state, overrides)` returns the
    `Config` the weights describe; `prepare(state, cfg, source)` resolves keys that name the same
    tensor of the official model (shared modules) before `rules`/`fields` map the keys to detr_lab's
    (see `map_keys`).
    """

    name: str
    override_keys: tuple[str, ...]
    matches: Callable[[Mapping[str, Tensor]], bool]
    infer_config: Callable[[Mapping[str, Tensor], dict[str, Any]], Config]
    rules: Sequence[KeyRule]
    fields: Callable[[dict[str, str]], dict[str, str] | None]
    prepare: Callable[[dict[str, Tensor], Config, str], dict[str, Tensor]] = lambda state, cfg, source: state


def _is_detr(state: Mapping[str, Tensor]) -> bool:
    return (
        "query_embed.weight" in state
        and "class_embed.weight" in state
        and any(k.startswith("transformer.decoder.layers.0.multihead_attn.") for k in state)
    )


def _infer_detr_config(state: Mapping[str, Tensor], overrides: dict[str, Any]) -> Config:
    family = "DETR"
    query_embed = _require(state, "query_embed.weight", family)
    num_queries, hidden_dim = query_embed.shape
    num_classes = _require(state, "class_embed.weight", family).shape[0] - 1
    encoder_layers = _count_indices(state, "transformer.encoder.layers.")
    decoder_layers = _count_indices(state, "transformer.decoder.layers.")
    stack = "encoder" if encoder_layers else "decoder"
    ffn_dim = _require(state, f"transformer.{stack}.layers.0.linear1.weight", family).shape[0]
    if "num_queries" in overrides and overrides["num_queries"] != num_queries:
        raise CheckpointError(
            f"num_queries={overrides['num_queries']} given, but the checkpoint's query_embed holds "
            f"{num_queries} queries"
        )
    model = {
        "num_classes": num_classes,
        "hidden_dim": hidden_dim,
        "num_heads": overrides.get("num_heads", 8),
        "ffn_dim": ffn_dim,
        "num_queries": num_queries,
        "num_feature_levels": 1,
        "position_encoding": "learned" if "backbone.1.row_embed.weight" in state else "sine",
        "classification": "softmax",
        "backbone": {
            "name": infer_resnet(state, "backbone.0.body."),
            "dilation": bool(overrides.get("dilation", False)),
            "pretrained": False,
            "weights_path": None,
        },
        "encoder": {"num_layers": encoder_layers, "attention": "plain"},
        "decoder": {"num_layers": decoder_layers, "cross_attention": "plain"},
    }
    return config_from_dict({"model": model}, "official DETR checkpoint")


DETR_FAMILY = OfficialFamily(
    name="DETR",
    override_keys=("dilation", "num_heads", "num_queries"),
    matches=_is_detr,
    infer_config=_infer_detr_config,
    rules=DETR_KEY_RULES,
    fields=_detr_fields,
)

# ------------------------------------------------------------------- official Deformable DETR
_DEFORMABLE_LAYER = r"transformer\.(?P<stack>encoder|decoder)\.layers\.(?P<i>\d+)\."
_DEFORMABLE_ATTENTION = (
    r"(?P<attn>self_attn|cross_attn)\.(?P<part>sampling_offsets|attention_weights|value_proj|output_proj)"
)
DEFORMABLE_KEY_RULES: list[KeyRule] = [
    (r"backbone\.0\.body\.(?P<rest>.+)\.num_batches_tracked", ()),
    (r"backbone\.0\.body\.(?P<rest>.+)", ("backbone.body.{rest}",)),
    (r"backbone\.1\.(?P<table>row_embed|col_embed)\.weight", ("position_encoding.{table}.weight",)),
    (r"input_proj\.(?P<l>\d+)\.(?P<k>[01])\.(?P<p>weight|bias)", ("input_proj.{l}.{k}.{p}",)),
    (r"query_embed\.weight", ("query_embed.weight",)),
    (r"transformer\.level_embed", ("transformer.level_embed",)),
    (r"transformer\.reference_points\.(?P<p>weight|bias)", ("reference_points_head.{p}",)),
    (r"transformer\.enc_output\.(?P<p>weight|bias)", ("proposal_queries.memory_proj.{p}",)),
    (r"transformer\.enc_output_norm\.(?P<p>weight|bias)", ("proposal_queries.memory_norm.{p}",)),
    (r"transformer\.pos_trans\.(?P<p>weight|bias)", ("proposal_queries.query_proj.{p}",)),
    (r"transformer\.pos_trans_norm\.(?P<p>weight|bias)", ("proposal_queries.query_norm.{p}",)),
    # Heads: per layer with box refinement (`class_embed.3.weight`), one shared module otherwise
    # (`prepare` has reduced the official per-layer aliases to `class_embed.weight`).
    (r"class_embed\.(?:(?P<j>\d+)\.)?(?P<p>weight|bias)", ("class_embed.{j}{p}",)),
    (
        r"bbox_embed\.(?:(?P<j>\d+)\.)?layers\.(?P<k>\d+)\.(?P<p>weight|bias)",
        ("bbox_embed.{j}layers.{k}.{p}",),
    ),
    (
        _DEFORMABLE_LAYER + _DEFORMABLE_ATTENTION + r"\.(?P<p>weight|bias)",
        ("transformer.{stack}.layers.{i}.{attn}.{part}.{p}",),
    ),
    (
        r"transformer\.decoder\.layers\.(?P<i>\d+)\.self_attn\.in_proj_(?P<p>weight|bias)",
        (
            "transformer.decoder.layers.{i}.self_attn.q_proj.{p}",
            "transformer.decoder.layers.{i}.self_attn.k_proj.{p}",
            "transformer.decoder.layers.{i}.self_attn.v_proj.{p}",
        ),
    ),
    (
        r"transformer\.decoder\.layers\.(?P<i>\d+)\.self_attn\.out_proj\.(?P<p>weight|bias)",
        ("transformer.decoder.layers.{i}.self_attn.out_proj.{p}",),
    ),
    (
        _DEFORMABLE_LAYER + r"linear(?P<n>[12])\.(?P<p>weight|bias)",
        ("transformer.{stack}.layers.{i}.ffn.linear{n}.{p}",),
    ),
    (
        _DEFORMABLE_LAYER + r"norm(?P<norm>[123])\.(?P<p>weight|bias)",
        ("transformer.{stack}.layers.{i}.{norm}.{p}",),
    ),
]
# Official Deformable DETR decoder layers run self-attention -> norm2, cross-attention -> norm1,
# feed-forward -> norm3 (the numbering follows construction order, not the order of use).
_DEFORMABLE_NORMS = {
    "encoder": {"1": "self_attn_norm", "2": "ffn_norm"},
    "decoder": {"1": "cross_attn_norm", "2": "self_attn_norm", "3": "ffn_norm"},
}
DEFORMABLE_DEFAULT_PROPOSALS = 300  # the official two-stage proposal count (= its query count)
# The official head aliases: the decoder holds the detector's heads for box refinement and two-stage.
_DECODER_HEAD_PREFIXES = ("transformer.decoder.class_embed.", "transformer.decoder.bbox_embed.")


class CheckpointWarning(UserWarning):
    """A checkpoint loads, but something in it deserves attention (the message says what)."""


def _deformable_fields(groups: dict[str, str]) -> dict[str, str] | None:
    fields = dict(groups)
    if "j" in fields:
        fields["j"] = f"{fields['j']}." if fields["j"] is not None else ""
    if "norm" in fields:
        norm = _DEFORMABLE_NORMS[fields["stack"]].get(fields["norm"])
        if norm is None:  # an encoder norm3: no such branch
            return None
        fields["norm"] = norm
    if fields.get("attn") == "self_attn" and fields.get("stack") == "decoder":
        return None  # decoder self-attention is plain multi-head attention (in_proj/out_proj rules)
    if fields.get("attn") == "cross_attn" and fields.get("stack") == "encoder":
        return None
    return fields


def _is_deformable_detr(state: Mapping[str, Tensor]) -> bool:
    return "transformer.level_embed" in state and any(".sampling_offsets." in k for k in state)


def _deformable_points(state: Mapping[str, Tensor], prefix: str, heads: int, levels: int) -> int:
    """Sampling points per head and level: `{prefix}.sampling_offsets` has heads*levels*points*2 rows."""
    rows = _require(state, f"{prefix}.sampling_offsets.weight", "Deformable DETR", ndim=2).shape[0]
    weights = _require(state, f"{prefix}.attention_weights.weight", "Deformable DETR", ndim=2).shape[0]
    if rows % (heads * levels * 2) or weights * 2 != rows:
        raise CheckpointError(
            f"official Deformable DETR checkpoint: '{prefix}.sampling_offsets.weight' has {rows} rows and "
            f"attention_weights {weights}; expected heads*levels*points*2 and heads*levels*points with "
            f"{heads} heads and {levels} levels (pass num_heads=... if the model has another head count)"
        )
    return rows // (heads * levels * 2)


def _infer_deformable_config(state: Mapping[str, Tensor], overrides: dict[str, Any]) -> Config:
    family = "Deformable DETR"
    num_levels, hidden_dim = _require(state, "transformer.level_embed", family, ndim=2).shape
    projections = _count_indices(state, "input_proj.")
    if projections != num_levels:
        raise CheckpointError(
            f"official {family} checkpoint: {projections} input projections but level_embed has "
            f"{num_levels} levels"
        )
    two_stage = "transformer.enc_output.weight" in state
    box_refine = any(k.startswith("transformer.decoder.bbox_embed.") for k in state)
    if two_stage and not box_refine:
        raise CheckpointError(
            f"official {family} checkpoint: two-stage without box refinement is not supported "
            "(only two-stage with --with_box_refine, the published variant)"
        )
    encoder_layers = _count_indices(state, "transformer.encoder.layers.")
    decoder_layers = _count_indices(state, "transformer.decoder.layers.")
    heads = _count_indices(state, "class_embed.")
    expected_heads = decoder_layers + (1 if two_stage else 0)
    if heads != expected_heads:
        raise CheckpointError(
            f"official {family} checkpoint: {heads} class heads (class_embed.*) for {decoder_layers} decoder "
            f"layers{' and the two-stage proposals' if two_stage else ''}; expected {expected_heads}"
        )
    num_classes = _require(state, "class_embed.0.weight", family, ndim=2).shape[0]
    stack = "encoder" if encoder_layers else "decoder"
    ffn_dim = _require(state, f"transformer.{stack}.layers.0.linear1.weight", family, ndim=2).shape[0]
    num_heads = int(overrides.get("num_heads", 8))
    if hidden_dim % num_heads:
        raise CheckpointError(f"num_heads={num_heads} does not divide the checkpoint's width {hidden_dim}")
    encoder_points = (
        _deformable_points(state, "transformer.encoder.layers.0.self_attn", num_heads, num_levels)
        if encoder_layers
        else 4
    )
    decoder_points = _deformable_points(
        state, "transformer.decoder.layers.0.cross_attn", num_heads, num_levels
    )
    if two_stage:
        num_queries = int(overrides.get("num_queries", DEFORMABLE_DEFAULT_PROPOSALS))
    else:
        num_queries, query_width = _require(state, "query_embed.weight", family, ndim=2).shape
        if query_width != 2 * hidden_dim:
            raise CheckpointError(
                f"official {family} checkpoint: query_embed is {query_width} wide; expected 2 x {hidden_dim}"
            )
        if "num_queries" in overrides and overrides["num_queries"] != num_queries:
            raise CheckpointError(
                f"num_queries={overrides['num_queries']} given, but the checkpoint's query_embed holds "
                f"{num_queries} queries"
            )
    model = {
        "num_classes": num_classes,
        "hidden_dim": hidden_dim,
        "num_heads": num_heads,
        "ffn_dim": ffn_dim,
        "num_queries": num_queries,
        "num_feature_levels": num_levels,
        "position_encoding": "learned" if "backbone.1.row_embed.weight" in state else "sine",
        "classification": "sigmoid",
        "box_refine": box_refine,
        "two_stage": two_stage,
        "backbone": {
            "name": infer_resnet(state, "backbone.0.body."),
            "dilation": bool(overrides.get("dilation", False)),
            "pretrained": False,
            "weights_path": None,
        },
        "encoder": {"num_layers": encoder_layers, "attention": "deformable", "num_points": encoder_points},
        "decoder": {
            "num_layers": decoder_layers,
            "cross_attention": "deformable",
            "num_points": decoder_points,
        },
    }
    # The official recipe's matching costs and loss weights (class 2, L1 5, GIoU 2; focal 0.25 / 2).
    loss = {"cost_class": 2.0, "cost_bbox": 5.0, "cost_giou": 2.0, "class_weight": 2.0, "bbox_weight": 5.0}
    loss.update({"giou_weight": 2.0, "focal_alpha": 0.25, "focal_gamma": 2.0})
    return config_from_dict({"model": model, "loss": loss}, "official Deformable DETR checkpoint")


def _resolve_deformable_aliases(state: dict[str, Tensor], cfg: Config, source: str) -> dict[str, Tensor]:
    """Reduce the keys that name one tensor of the official model to one key each.

    The official model registers its heads twice with box refinement or two-stage (the decoder holds
    the detector's `class_embed`/`bbox_embed` as well), and without box refinement its per-layer heads
    are one module listed once per layer. Loading a state dict into it leaves, for each tensor, the
    value of the key loaded last: the detector's own head over the decoder's alias, the highest layer
    index among shared copies. The same values are kept here; copies that differ (never in a trained
    checkpoint, whose copies are one tensor) are reported in a `CheckpointWarning`.
    """
    state = dict(state)
    differing: list[str] = []
    for key in [k for k in state if k.startswith(_DECODER_HEAD_PREFIXES)]:
        head_key = key[len("transformer.decoder.") :]
        if head_key not in state:
            raise CheckpointError(
                f"{source}: '{key}' has no counterpart '{head_key}' among the detector heads"
            )
        if not torch.equal(state[key], state[head_key]):
            differing.append(key)
        del state[key]
    if not cfg.model.box_refine:
        for head in ("class_embed", "bbox_embed"):
            copies: dict[str, dict[int, str]] = {}
            for key in state:
                if m := re.fullmatch(rf"{head}\.(\d+)\.(.+)", key):
                    copies.setdefault(m.group(2), {})[int(m.group(1))] = key
            for rest, by_layer in copies.items():
                kept = state[by_layer[max(by_layer)]]
                for key in by_layer.values():
                    if not torch.equal(state[key], kept):
                        differing.append(key)
                    del state[key]
                state[f"{head}.{rest}"] = kept
    if differing:
        warnings.warn(
            f"{source}: {len(differing)} official key(s) alias a shared head but hold other values "
            f"(e.g. {', '.join(differing[:3])}); kept the values the official model loads last "
            "(the detector's heads; the last decoder layer's copy of a shared head)",
            CheckpointWarning,
            stacklevel=3,
        )
    return state


DEFORMABLE_FAMILY = OfficialFamily(
    name="Deformable DETR",
    override_keys=("dilation", "num_heads", "num_queries"),
    matches=_is_deformable_detr,
    infer_config=_infer_deformable_config,
    rules=DEFORMABLE_KEY_RULES,
    fields=_deformable_fields,
    prepare=_resolve_deformable_aliases,
)

OFFICIAL_FAMILIES: list[OfficialFamily] = [DETR_FAMILY, DEFORMABLE_FAMILY]


def _official_state(checkpoint: str | os.PathLike | Mapping) -> tuple[dict[str, Tensor], str]:
    data, source = _read(checkpoint)
    if isinstance(data, Mapping) and isinstance(data.get("model"), Mapping):
        data = data["model"]
    if not isinstance(data, Mapping) or not data or not all(isinstance(v, Tensor) for v in data.values()):
        raise CheckpointError(
            f"{source}: expected an official state dict (name -> tensor), or a dict with 'model'"
        )
    return dict(data), source


def official_family(state: Mapping[str, Tensor], source: str = "checkpoint") -> OfficialFamily:
    """The official detector family whose key layout `state` has."""
    for family in OFFICIAL_FAMILIES:
        if family.matches(state):
            return family
    known = ", ".join(f.name for f in OFFICIAL_FAMILIES)
    raise CheckpointError(
        f"{source}: not an official checkpoint of a known family ({known}); first keys: {list(state)[:3]}"
    )


def convert_official(
    checkpoint: str | os.PathLike | Mapping, **overrides: Any
) -> tuple[Config, dict[str, Tensor]]:
    """Official checkpoint -> (the `Config` it describes, a detr_lab state dict). See `load_official`."""
    state, source = _official_state(checkpoint)
    family = official_family(state, source)
    unknown = sorted(set(overrides) - set(family.override_keys))
    if unknown:
        raise CheckpointError(
            f"unknown override(s) {', '.join(unknown)} for official {family.name} checkpoints; "
            f"valid: {', '.join(family.override_keys)}"
        )
    cfg = family.infer_config(state, overrides)
    state = family.prepare(state, cfg, source)
    mapped, unmapped = map_keys(state, family.rules, family.fields)
    if unmapped:
        raise CheckpointError(
            f"{source}: {len(unmapped)} official {family.name} key(s) have no place in the detr_lab model "
            f"(e.g. {', '.join(unmapped[:5])})"
        )
    return cfg, mapped


def load_official(checkpoint: str | os.PathLike | Mapping, **overrides: Any) -> tuple[nn.Module, Config]:
    """Load an official DETR or Deformable DETR checkpoint into a detr_lab model.

    Args:
        checkpoint: a file path, a dict with `model`, or a bare official state dict.
        overrides: what weights cannot tell: `dilation=True` (DC5), `num_heads=N` (default 8; for
            Deformable DETR the sampling points per level follow from it); `num_queries=N` is checked
            against the weights, or sets the proposal count of a two-stage Deformable DETR (which has
            no query embedding; default 300).
    Returns:
        (eval-mode model, `Config` describing it). The architecture (backbone depth, layer counts,
        widths, query and class counts; for Deformable DETR also the feature levels, sampling
        points, box refinement and two-stage) is inferred from the weights.
    Raises:
        CheckpointError: unreadable input, unknown overrides, official keys without a place in the
            model, or model parameters the checkpoint does not fill.
    """
    cfg, state = convert_official(checkpoint, **overrides)
    source = str(checkpoint) if not isinstance(checkpoint, Mapping) else "official checkpoint"
    return _build_loaded(cfg, state, source), cfg


def official_class_names(num_classes: int) -> list[str]:
    """Class names of an official checkpoint, whose class index is the COCO category id.

    COCO-sized heads (>= 91 classes) get the COCO name at each id and "N/A" at unused ids; smaller
    heads (fine-tuned on other data) get placeholder names `class_<i>`.
    """
    if num_classes >= 91:
        return [COCO_CATEGORY_NAMES.get(i, "N/A") for i in range(num_classes)]
    return [f"class_{i}" for i in range(num_classes)]


def convert_official_checkpoint(
    source: str | os.PathLike | Mapping, destination: str | os.PathLike, **overrides: Any
) -> Path:
    """Convert an official checkpoint (see `load_official`) and save it in detr_lab format.

    Class index = COCO category id in official checkpoints, so the category ids are 0..C-1 and the
    names come from `official_class_names`.
    """
    model, cfg = load_official(source, **overrides)
    num_classes = cfg.model.num_classes
    return save_checkpoint(destination, model, cfg, range(num_classes), official_class_names(num_classes))


def _looks_official(data: Mapping) -> bool:
    state = data.get("model") if isinstance(data.get("model"), Mapping) else data
    return any(str(k).startswith("backbone.0.body.") for k in state)


# --------------------------------------------------------------------------- detr_lab checkpoints
@dataclass
class LoadedCheckpoint:
    """A ready (eval-mode) model with its config and class metadata (class index -> id / name)."""

    model: nn.Module
    config: Config
    category_ids: list[int]
    class_names: list[str]


def _check_classes(
    num_classes: int, category_ids: Sequence[int], class_names: Sequence[str], source: str
) -> None:
    if len(category_ids) != num_classes or len(class_names) != num_classes:
        raise CheckpointError(
            f"{source}: {len(category_ids)} category ids and {len(class_names)} class names for a model "
            f"with num_classes={num_classes}; they must all agree"
        )


def save_checkpoint(
    path: str | os.PathLike,
    model: nn.Module,
    cfg: Config,
    category_ids: Iterable[int],
    class_names: Iterable[str],
) -> Path:
    """Write a detr_lab checkpoint atomically (temporary file, then rename) and return its path.

    The file holds `{"format": "detr_lab", "version": 1, "config", "state_dict", "category_ids",
    "class_names"}`; `load_checkpoint` reads it back.
    """
    path = Path(path)
    category_ids = [int(i) for i in category_ids]
    class_names = [str(n) for n in class_names]
    _check_classes(cfg.model.num_classes, category_ids, class_names, str(path))
    payload = {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "config": config_to_dict(cfg),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "category_ids": category_ids,
        "class_names": class_names,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    try:
        torch.save(payload, tmp_name)
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    return path


def load_checkpoint(source: str | os.PathLike | Mapping, overrides: Sequence[str] = ()) -> LoadedCheckpoint:
    """Load a detr_lab, Lightning or official DETR checkpoint as a ready model.

    Args:
        source: a file path or an already loaded dict of one of:
            - detr_lab format (`save_checkpoint`);
            - a Lightning checkpoint: `state_dict` with the model under `model.` (other prefixes such
              as `criterion.` or `teacher.` are ignored) and a `detr_lab` entry holding `config`,
              `category_ids` and `class_names`;
            - an official DETR or Deformable DETR checkpoint (category ids = class indices, COCO
              names).
        overrides: dotted config overrides applied to the stored config before building, e.g.
            `model.encoder.attention=act`.
    Raises:
        CheckpointError: unreadable file, unknown layout, or weights that do not fit the config.
        ConfigError: an invalid stored config or override.
    """
    data, name = _read(source)
    if not isinstance(data, Mapping):
        raise CheckpointError(f"{name}: expected a checkpoint dict, got {type(data).__name__}")

    if data.get("format") == FORMAT_NAME:
        if data.get("version") != FORMAT_VERSION:
            raise CheckpointError(
                f"{name}: detr_lab checkpoint version {data.get('version')!r}; "
                f"this code reads version {FORMAT_VERSION}"
            )
        meta, state = data, data.get("state_dict")
    elif isinstance(data.get("state_dict"), Mapping) and LIGHTNING_META_KEY in data:
        meta = data[LIGHTNING_META_KEY]
        state = {
            k[len(LIGHTNING_MODEL_PREFIX) :]: v
            for k, v in data["state_dict"].items()
            if k.startswith(LIGHTNING_MODEL_PREFIX)
        }
        if not state:
            raise CheckpointError(f"{name}: Lightning checkpoint without '{LIGHTNING_MODEL_PREFIX}*' weights")
    elif _looks_official(data):
        cfg, state = convert_official(data)
        num_classes = cfg.model.num_classes
        cfg = apply_overrides(cfg, overrides, f"{name} (official config with overrides)")
        model = _build_loaded(cfg, state, name)
        return LoadedCheckpoint(model, cfg, list(range(num_classes)), official_class_names(num_classes))
    else:
        raise CheckpointError(
            f"{name}: unknown checkpoint layout (not detr_lab format, not a Lightning checkpoint with a "
            f"'{LIGHTNING_META_KEY}' entry, not an official DETR or Deformable DETR checkpoint); "
            f"top-level keys: {list(data)[:8]}"
        )

    for key in ("config", "category_ids", "class_names"):
        if key not in meta:
            raise CheckpointError(f"{name}: checkpoint metadata lacks '{key}'")
    if not isinstance(state, Mapping):
        raise CheckpointError(f"{name}: 'state_dict' is missing or not a dict")
    cfg = apply_overrides(meta["config"], overrides, f"{name} (stored config)")
    category_ids = [int(i) for i in meta["category_ids"]]
    class_names = [str(n) for n in meta["class_names"]]
    _check_classes(cfg.model.num_classes, category_ids, class_names, name)
    model = _build_loaded(cfg, state, name)
    return LoadedCheckpoint(model, cfg, category_ids, class_names)


# DINO checks its keys before Deformable DETR's (it has theirs too).
from detr_lab.official_dino import DINO_FAMILY  # noqa: E402

OFFICIAL_FAMILIES.insert(0, DINO_FAMILY)
