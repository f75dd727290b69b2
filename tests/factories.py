"""Shared test setup: tiny configs, a tiny batch, tools loaded by path, official key specs and synthetic
official weights, and the measurements the parity tests compare against their fixtures.

Plain functions and the `OfficialSpec` builder, imported by tests as `from factories import ...`
(tests/ is on the path through tests/conftest.py, which also hands some of them out as fixtures). A
module of its own, not conftest.py: other folders' conftest.py files would shadow `import conftest`.
Setup and measurement only: no assertions live here (the tests assert on what these return).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import torch
import torchvision
from omegaconf import OmegaConf

from detr_lab.config import Config, load_config
from detr_lab.models.two_stage import encoder_proposals

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures"

# The tiny model every model / engine / tool test starts from (keys under `model.`): hidden size 32,
# one encoder and two decoder layers on a ResNet-18 with random weights. Tests change what they
# need through `tiny_overrides(**changes)`.
TINY_MODEL: dict[str, object] = {
    "hidden_dim": 32,
    "num_heads": 4,
    "ffn_dim": 64,
    "encoder.num_layers": 1,
    "decoder.num_layers": 2,
    "backbone.name": "resnet18",
    "backbone.pretrained": False,
    "num_queries": 6,
    "num_classes": 3,
}


def _format(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def tiny_overrides(*extra: str, **changes: object) -> list[str]:
    """Dotted overrides of the tiny model (`TINY_MODEL`), changed by `changes`, then `extra`.

    Args:
        extra: further `key.path=value` strings (any section), appended last so they win.
        changes: model keys to set, `__` standing for a dot (`encoder__num_layers=2` ->
            `model.encoder.num_layers=2`); `None` drops a tiny key (the schema default applies).

    Returns:
        A list for `load_config(overrides=...)`, e.g. `["model.hidden_dim=32", ...]`.
    """
    model = dict(TINY_MODEL)
    for key, value in changes.items():
        dotted = key.replace("__", ".")
        if value is None:
            model.pop(dotted, None)
        else:
            model[dotted] = value
    return [f"model.{key}={_format(value)}" for key, value in model.items()] + list(extra)


def tiny_config(*extra: str, **changes: object) -> Config:
    """`load_config(overrides=tiny_overrides(*extra, **changes))`: the schema defaults under the tiny
    model (no YAML file)."""
    return load_config(overrides=tiny_overrides(*extra, **changes))


def tiny_model_yaml(**changes: object) -> str:
    """The `model:` section of a YAML config file for the tiny model (block style, no braces, so the
    text can go through `str.format`); `changes` as in `tiny_overrides`."""
    return OmegaConf.to_yaml(OmegaConf.from_dotlist(tiny_overrides(**changes)))


# `data.augment` of the tiny runs: 64 px, no crop (template text: braces doubled).
TINY_AUGMENT = "{{train_scales: [64], max_size: 96, crop_prob: 0.0, eval_size: 64, eval_max_size: 96}}"


def synthetic_data_yaml(
    num_train: int, num_val: int, *, image_size: int = 64, augment: str = TINY_AUGMENT
) -> str:
    """The `data:` section of a YAML config on a generated synthetic set under `{root}/data`, batch 2,
    no loader workers: a `str.format` template (`{root}`), as is `augment`, the flow-style mapping
    of `data.augment` with its braces doubled."""
    return f"""
data:
  dataset: synthetic
  root: {{root}}/data
  batch_size: 2
  num_workers: 0
  synthetic: {{{{num_train: {num_train}, num_val: {num_val}, image_size: {image_size}, seed: 0}}}}
  augment: {augment}
"""


# A whole training run on the tiny model and a 4 + 2 image synthetic set (64 px): 3 steps over 2
# epochs, a checkpoint every step. A `str.format` template: `{root}` is the run's folder.
TINY_RUN_YAML = tiny_model_yaml(
    num_classes=6, num_heads=2, dropout=0.0, num_queries=5, backbone__frozen_stages=0
) + synthetic_data_yaml(4, 2) + """
optim: {{lr: 1.0e-4, lr_backbone: 0.0, lr_drop_epochs: [1], lr_drop_factor: 0.1}}
trainer:
  output_dir: {root}/run
  accelerator: cpu
  devices: "1"
  max_epochs: 2
  max_steps: 3
  log_every_n_steps: 1
  save_every_n_steps: 1
  seed: 0
"""


def tiny_batch(
    *, height: int = 64, width: int = 96, padded_from_row: int = 40, padded_from_col: int = 64
) -> tuple[torch.Tensor, torch.Tensor, list[dict[str, torch.Tensor]]]:
    """Two images (seed 0) and their targets; the second image is padding from the given row / column on.

    Returns:
        images `[2, 3, H, W]` (zero under the padding), padding_mask `[2, H, W]` (True = padding) and
        targets: `labels [N]` and `boxes [N, 4]` normalized cxcywh (2 objects, then 1; labels < 5).
    """
    torch.manual_seed(0)
    images = torch.randn(2, 3, height, width)
    padding_mask = torch.zeros(2, height, width, dtype=torch.bool)
    padding_mask[1, padded_from_row:, :] = True
    padding_mask[1, :, padded_from_col:] = True
    images[padding_mask[:, None].expand_as(images)] = 0
    targets = [
        {"labels": torch.tensor([1, 4]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.3], [0.3, 0.6, 0.1, 0.2]])},
        {"labels": torch.tensor([0]), "boxes": torch.tensor([[0.4, 0.4, 0.5, 0.5]])},
    ]
    return images, padding_mask, targets


def official_batch(fixture: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """The images of a parity fixture as the official code fed them: uint8 `[3, h, w]` images scaled to
    [0, 1], normalized with the fixture's mean / std and zero-padded into `[B, 3, H, W]`; with the
    fixture's `padding_mask [B, H, W]` (True = padding)."""
    mean = torch.tensor(fixture["normalize"]["mean"]).view(3, 1, 1)
    std = torch.tensor(fixture["normalize"]["std"]).view(3, 1, 1)
    padding_mask = fixture["padding_mask"]
    images = torch.zeros(len(fixture["images_uint8"]), 3, *padding_mask.shape[1:])
    for i, image in enumerate(fixture["images_uint8"]):
        images[i, :, : image.shape[1], : image.shape[2]] = (image.float() / 255 - mean) / std
    return images, padding_mask


def max_error(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    """The largest absolute difference of two tensors, infinities of one sign on both sides counting as 0."""
    both_inf = torch.isinf(ours) & torch.isinf(theirs) & (ours.sign() == theirs.sign())
    return (ours - theirs).abs().masked_fill(both_inf, 0).max().item()


def layer_errors(outputs: dict, expected: dict) -> dict[str, float]:
    """`max_error` of `pred_logits` / `pred_boxes` against a parity fixture's outputs: keyed by the name
    for the last decoder layer, `<name>_<layer>` for `aux_outputs` (zipped strictly)."""
    keys = ("pred_logits", "pred_boxes")
    errors = {key: max_error(outputs[key], expected[key]) for key in keys}
    for layer, (ours, theirs) in enumerate(zip(outputs["aux_outputs"], expected["aux_outputs"], strict=True)):
        errors.update({f"{key}_{layer}": max_error(ours[key], theirs[key]) for key in keys})
    return errors


def matching_against_official(cfg: Config, outputs: dict, fixture: dict) -> tuple[list, list]:
    """The matcher's indices for a parity fixture's targets next to the official ones, each a list of
    `(query indices, target indices)` lists, one pair per image."""
    from detr_lab.models.build import build_criterion

    indices = build_criterion(cfg.model, cfg.loss).matcher(outputs, fixture["targets"])
    as_lists = [(queries.tolist(), targets.tolist()) for queries, targets in indices]
    return as_lists, [(queries.tolist(), targets.tolist()) for queries, targets in fixture["matcher_indices"]]


def tie_tolerant_box_distances(ours: dict, theirs: dict, tie: float = 1e-6) -> list[torch.Tensor]:
    """For each rank of our detections, the max-coordinate distance of our box to the nearest official
    box of the same rank or of a tie: same label, official score within `tie` of the rank's (equal
    float32 scores of one class may come out of top-k in either order)."""
    distances = []
    for rank in range(len(ours["scores"])):
        tied = (theirs["labels"] == ours["labels"][rank]) & (
            (theirs["scores"] - theirs["scores"][rank]).abs() <= tie
        )
        tied[rank] = True  # the same rank always qualifies
        distances.append((theirs["boxes"][tied] - ours["boxes"][rank]).abs().max(dim=1).values.min())
    return distances


def load_module(path: Path, name: str | None = None) -> ModuleType:
    """Import a Python file by path (tools/ and tests/fixtures/ are not packages)."""
    name = name or f"detr_lab_test_{path.parent.name}_{path.stem}"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_tool(name: str) -> ModuleType:
    """The module of `tools/<name>.py` (its `main(argv)` is what the command line runs)."""
    return load_module(REPO / "tools" / f"{name}.py", f"detr_lab_tool_{name}")


def load_synth_weights() -> ModuleType:
    """`tests/fixtures/synth_weights.py`: `synth_state_dict(spec, seed)` rebuilds the deterministic
    synthetic official weights the parity fixtures were made with."""
    return load_module(FIXTURES / "synth_weights.py", "detr_lab_test_synth_weights")


# The sizes of the small official checkpoints the key-layout tests write (`OfficialSpec`): model width,
# FFN width, layer counts, queries and classes; feature levels, heads and sampling points per head and
# level only shape deformable attention.
OFFICIAL_SIZES = {
    "hidden": 32, "ffn": 64, "encoder_layers": 1, "decoder_layers": 2, "queries": 7, "classes": 5,
    "levels": 4, "heads": 8, "encoder_points": 4, "decoder_points": 4,
}  # fmt: skip


class OfficialSpec:
    """Builds the key -> shape spec of an official checkpoint, one module at a time, in the order the
    calls are made (the official `state_dict()` order when written in the official module order).

    `sizes` change `OFFICIAL_SIZES`; they become attributes (`spec.classes`...), `hidden` also as `d`,
    the default width of norms and of linear inputs. `shapes` holds the spec built so far.
    """

    def __init__(self, **sizes: int) -> None:
        unknown = sizes.keys() - OFFICIAL_SIZES.keys()
        if unknown:
            raise TypeError(f"unknown official sizes: {sorted(unknown)}")
        for name, value in {**OFFICIAL_SIZES, **sizes}.items():
            setattr(self, name, value)
        self.d = self.hidden
        self.shapes: dict[str, list[int]] = {}

    def tensor(self, key: str, *shape: int) -> None:
        self.shapes[key] = list(shape)

    def linear(self, prefix: str, out_features: int, in_features: int | None = None) -> None:
        self.tensor(f"{prefix}.weight", out_features, self.d if in_features is None else in_features)
        self.tensor(f"{prefix}.bias", out_features)

    def norm(self, prefix: str, width: int | None = None) -> None:
        width = self.d if width is None else width
        self.tensor(f"{prefix}.weight", width)
        self.tensor(f"{prefix}.bias", width)

    def conv(self, prefix: str, in_channels: int, kernel: int) -> None:
        """A `d`-channel `kernel x kernel` convolution with bias."""
        self.tensor(f"{prefix}.weight", self.d, in_channels, kernel, kernel)
        self.tensor(f"{prefix}.bias", self.d)

    def input_proj(self, level: int, in_channels: int, kernel: int = 1) -> None:
        """`input_proj.<level>`: a convolution to `d` channels, then a GroupNorm."""
        self.conv(f"input_proj.{level}.0", in_channels, kernel)
        self.norm(f"input_proj.{level}.1")

    def mlp(self, prefix: str, *widths: int) -> None:
        """`<prefix>.layers.<k>`: linears from `widths[k]` to `widths[k + 1]` features."""
        for k in range(len(widths) - 1):
            self.linear(f"{prefix}.layers.{k}", widths[k + 1], widths[k])

    def box_mlp(self, prefix: str) -> None:
        """The three-layer box head: `d -> d -> d -> 4`."""
        self.mlp(prefix, self.d, self.d, self.d, 4)

    def packed_attention(self, prefix: str) -> None:
        """`nn.MultiheadAttention`: packed q / k / v projection, then the output projection."""
        self.tensor(f"{prefix}.in_proj_weight", 3 * self.d, self.d)
        self.tensor(f"{prefix}.in_proj_bias", 3 * self.d)
        self.linear(f"{prefix}.out_proj", self.d)

    def deformable_attention(self, prefix: str, points: int) -> None:
        """`MSDeformAttn`: sampling offsets, attention weights, value and output projections."""
        heads, levels = self.heads, self.levels
        self.linear(f"{prefix}.sampling_offsets", heads * levels * points * 2)
        self.linear(f"{prefix}.attention_weights", heads * levels * points)
        self.linear(f"{prefix}.value_proj", self.d)
        self.linear(f"{prefix}.output_proj", self.d)

    def deformable_transformer(self) -> None:
        """`transformer.level_embed`, then the official deformable encoder layers (deformable
        self-attention, norm1, FFN, norm2) and decoder layers (deformable cross-attention, norm1,
        packed self-attention, norm2, FFN, norm3)."""
        self.tensor("transformer.level_embed", self.levels, self.d)
        for i in range(self.encoder_layers):
            layer = f"transformer.encoder.layers.{i}"
            self.deformable_attention(f"{layer}.self_attn", self.encoder_points)
            self.norm(f"{layer}.norm1")
            self.feed_forward(layer)
            self.norm(f"{layer}.norm2")
        for i in range(self.decoder_layers):
            layer = f"transformer.decoder.layers.{i}"
            self.deformable_attention(f"{layer}.cross_attn", self.decoder_points)
            self.norm(f"{layer}.norm1")
            self.packed_attention(f"{layer}.self_attn")
            self.norm(f"{layer}.norm2")
            self.feed_forward(layer)
            self.norm(f"{layer}.norm3")

    def feed_forward(self, prefix: str) -> None:
        """`linear1` (`d -> ffn`), `linear2` (`ffn -> d`)."""
        self.linear(f"{prefix}.linear1", self.ffn)
        self.linear(f"{prefix}.linear2", self.d, self.ffn)

    def resnet_backbone(self, name: str) -> None:
        """torchvision's ResNet `name` under `backbone.0.body.`, without `fc` and BN batch counters."""
        with torch.device("meta"):
            resnet = getattr(torchvision.models, name)()
        for key, tensor in resnet.state_dict().items():
            if not key.startswith("fc.") and not key.endswith("num_batches_tracked"):
                self.tensor(f"backbone.0.body.{key}", *tensor.shape)


def official_detr_spec(
    backbone: str = "resnet18", *, learned_position: bool = False, **sizes: int
) -> dict[str, list[int]]:
    """Key -> shape of an official facebookresearch/detr checkpoint with these settings
    (`sizes`: see `OFFICIAL_SIZES`; the deformable attention sizes change nothing here)."""
    spec = OfficialSpec(**sizes)
    spec.resnet_backbone(backbone)
    if learned_position:
        spec.tensor("backbone.1.row_embed.weight", 50, spec.d // 2)
        spec.tensor("backbone.1.col_embed.weight", 50, spec.d // 2)

    def feed_forward_and_norms(prefix, norms):
        spec.feed_forward(prefix)
        for n in range(1, norms + 1):
            spec.norm(f"{prefix}.norm{n}")

    for i in range(spec.encoder_layers):
        spec.packed_attention(f"transformer.encoder.layers.{i}.self_attn")
        feed_forward_and_norms(f"transformer.encoder.layers.{i}", 2)
    for i in range(spec.decoder_layers):
        spec.packed_attention(f"transformer.decoder.layers.{i}.self_attn")
        spec.packed_attention(f"transformer.decoder.layers.{i}.multihead_attn")
        feed_forward_and_norms(f"transformer.decoder.layers.{i}", 3)
    spec.norm("transformer.decoder.norm")
    spec.linear("class_embed", spec.classes + 1)
    spec.box_mlp("bbox_embed")
    spec.tensor("query_embed.weight", spec.queries, spec.d)
    spec.conv("input_proj", 512 if backbone in ("resnet18", "resnet34") else 2048, 1)
    return spec.shapes


def quick_official_state(spec: dict[str, list[int]]) -> dict[str, torch.Tensor]:
    """Weights of the shapes in `spec`, filled fast (seed 0): ones for the BN variances and scales,
    float32 noise scaled by the fan-in elsewhere (0.2 for matrices, 0.05 for vectors)."""
    generator = torch.Generator().manual_seed(0)
    state = {}
    for name, shape in spec.items():
        if name.endswith(("running_var", "bn1.weight", "bn2.weight", "bn3.weight", "downsample.1.weight")):
            state[name] = torch.ones(shape)
        else:
            fan_in = max(1, int(torch.tensor(shape[1:]).prod())) if len(shape) > 1 else 1
            scale = 0.2 if len(shape) > 1 else 0.05
            state[name] = torch.randn(shape, generator=generator) / fan_in**0.5 * scale
    return state


def share_official_heads(
    state: dict[str, torch.Tensor], decoder_layers: int, *, shared: bool, decoder_aliases_last: bool
) -> dict[str, torch.Tensor]:
    """Make the official aliases of the detection heads hold one tensor, as a trained model's
    `state_dict()` gives them, going through the keys in order: each `transformer.decoder.<head>.<j>`
    key takes the tensor of the detector's `<head>.<j>` (`<head>.<last layer>` with
    `decoder_aliases_last`); with `shared` heads, every `<head>.<j>` then takes the last layer's.
    `state` is changed in place and returned."""
    last = str(decoder_layers - 1)
    for key in list(state):
        if key.startswith(("transformer.decoder.class_embed.", "transformer.decoder.bbox_embed.")):
            _, _, head, layer, rest = key.split(".", 4)
            state[key] = state[".".join((head, last if decoder_aliases_last else layer, rest))]
        elif shared and key.startswith(("class_embed.", "bbox_embed.")):
            head, _, rest = key.split(".", 2)
            state[key] = state[".".join((head, last, rest))]
    return state


def forward_padded(model: torch.nn.Module, size: int = 128) -> dict:
    """`model`'s outputs (no grad, `return_memory=True`) for one random `size x size` image (global RNG)
    whose right quarter is padding."""
    mask = torch.zeros(1, size, size, dtype=torch.bool)
    mask[:, :, size * 3 // 4 :] = True
    with torch.no_grad():
        return model(torch.randn(1, 3, size, size), mask, return_memory=True)


# Model keys an official checkpoint's weights cannot tell: detr_lab counts real classes (80 for COCO;
# the official heads have 91 slots, one per COCO id), and ImageNet initialisation, the frozen stages
# and DC5 dilation are choices of the run.
NOT_IN_THE_WEIGHTS = frozenset({
    "num_classes",
    "backbone.pretrained", "backbone.weights_path", "backbone.frozen_stages", "backbone.dilation",
})  # fmt: skip


def flat_dict(tree: dict, prefix: str = "") -> dict:
    """Nested config dict -> {"a.b.c": value}."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            out.update(flat_dict(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def architecture_differences(ours: Config, official: Config) -> dict[str, tuple]:
    """Model keys whose values differ between two configs, `NOT_IN_THE_WEIGHTS` left out."""
    from detr_lab.config import config_to_dict

    a, b = flat_dict(config_to_dict(ours)["model"]), flat_dict(config_to_dict(official)["model"])
    keys = (a.keys() | b.keys()) - NOT_IN_THE_WEIGHTS
    return {key: (a.get(key), b.get(key)) for key in sorted(keys) if a.get(key) != b.get(key)}


def official_reference(name: str, **overrides: object) -> tuple[Config, dict[str, float]]:
    """What an official checkpoint says about its recipe, from `tests/fixtures/<name>.pt`.

    `overrides` are what weights cannot tell (`dilation=True` for DC5; see `load_official`).

    Returns:
        the `Config` detr_lab infers from the official checkpoint's key / shape spec (on meta tensors:
        nothing is allocated), and the loss `weight_dict` the official code built for that model.
    """
    from detr_lab.checkpoints import official_family

    fixture = torch.load(FIXTURES / f"{name}.pt", weights_only=True)
    state = {key: torch.empty(shape, device="meta") for key, shape in fixture["state_dict_spec"]}
    return official_family(state).infer_config(state, dict(overrides)), dict(fixture["weight_dict"])


# RT-DETR parity: rows of proposals whose official float64 scores agree within NEAR_TIE_SCORES may come
# out of a float32 top-k in either order; rows are aligned when they match within NEAR_TIE_ATOL.
NEAR_TIE_ATOL = 1e-4
NEAR_TIE_SCORES = 1e-5


def rtdetr_fixture_state(fixture: dict) -> dict:
    """The official state dict of an RT-DETR parity fixture: synthetic weights from its key spec and seed,
    then its overrides (architecture constants at their official values)."""
    state = load_synth_weights().synth_state_dict(dict(fixture["state_dict_spec"]), fixture["weights_seed"])
    state.update(fixture["state_dict_overrides"])
    return state


def run_with_selection(
    model: torch.nn.Module, images: torch.Tensor, padding_mask: torch.Tensor
) -> tuple[dict, torch.Tensor]:
    """The model's outputs and the encoder positions its query source selected `[B, K]`."""
    selected = []
    hook = model.query_source.register_forward_hook(
        lambda module, args, result: selected.append(result.meta["selected_indices"])
    )
    try:
        with torch.no_grad():
            outputs = model(images, padding_mask)
    finally:
        hook.remove()
    return outputs, selected[0]


def near_tie_alignment(ours: torch.Tensor, theirs: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """Permutation `[B, K]` of our rows onto the official ones: row k stays unless it differs, and then
    takes the row of ours that matches within NEAR_TIE_ATOL among the official near-ties of k (scores
    within NEAR_TIE_SCORES).

    ours / theirs: `[B, K, N]` per-row values (e.g. the proposals' boxes); scores: `[B, K]` official
    float64 selection scores of the rows.
    """
    order = torch.arange(ours.shape[1]).repeat(ours.shape[0], 1)
    for b in range(ours.shape[0]):
        distance = (ours[b, None] - theirs[b, :, None]).abs().nan_to_num(0).amax(-1)  # (K theirs, K ours)
        for k in (distance.diagonal() > NEAR_TIE_ATOL).nonzero().flatten().tolist():
            tied = (scores[b] - scores[b, k]).abs() <= NEAR_TIE_SCORES
            candidates = (distance[k] <= NEAR_TIE_ATOL) & tied
            assert candidates.any(), f"image {b}: official row {k} is not among ours (up to near-ties)"
            order[b, k] = candidates.nonzero()[0, 0]
    return order


def aligned_rows(x: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """`[B, K, N]` rows of `x` in the order of `near_tie_alignment`."""
    return x.gather(1, order[..., None].expand(-1, -1, x.shape[-1]))


def official_anchor_proposals(fixture: dict):
    """`encoder_proposals` with the official run's float32 anchors in place of this machine's.

    Both codes compute the anchors in float32 (`log(p / (1 - p))`), and float32 `log` may differ by an
    ulp between CPUs (vectorized kernels): on an AVX-512 Xeon, 366 of the R50vd fixture's 9072 anchor
    values differ from the machine that wrote it by 1-2 ulp, enough to move float64 outputs by 2.5e-8.
    The float64 comparisons give both sides the same anchors;
    `test_rtdetr_variants.py::test_anchors_are_the_official_ones` checks the anchors themselves."""
    anchors = fixture["state_dict_overrides"]["decoder.anchors"]  # [1, S, 4] float32, inf = unusable

    def proposals(*args):
        ours, valid = encoder_proposals(*args)
        assert torch.equal(torch.isinf(ours[:1]), torch.isinf(anchors))
        return anchors.to(ours.dtype).expand_as(ours).clone(), valid

    return proposals


def anchors_within_float32_ulps(ours: torch.Tensor, official: torch.Tensor, ulps: int = 2) -> bool:
    """True when both have inf (unusable anchors) at the same places and the finite values agree within
    `ulps` float32 units in the last place: float32 `log` may differ by an ulp between CPUs (see
    `official_anchor_proposals`)."""
    if not torch.equal(torch.isinf(ours), torch.isinf(official)):
        return False
    finite = torch.isfinite(official)
    ulp = torch.finfo(torch.float32).eps * official[finite].abs().clamp(min=1)
    return bool(((ours[finite] - official[finite]).abs() <= ulps * ulp).all())
