"""Inference-time rewrites of a built detector: same outputs (to float rounding), less work.

    model = optimize_for_inference(build_model(cfg.model).eval())

What `optimize_for_inference` does, in place:

- Folds every `FrozenBatchNorm2d` of the ResNet backbone into the convolution before it
  (`fold_frozen_batch_norms`). A frozen batch norm is a fixed per-channel affine map
  `x * scale + shift`; folded, the convolution computes `conv(x, W * scale) + (b * scale + shift)`
  and the two full passes over each feature map (multiply, add) disappear. The same for the
  conv-norm units of RT-DETR's ResNet-vd and hybrid encoder, D-FINE's encoder included (its
  RepNCSPELAN4 and depthwise SCDown convolutions) (`fold_conv_norm_units`; batch norm at its running
  statistics, as in eval mode), after each RepVGG block of the hybrid encoder became one 3x3
  convolution (`detr_lab.models.fusion.fuse_repvgg_blocks`). HGNetv2's conv-norm units too (D-FINE,
  DEIM), after their learnable affine blocks became part of the norm and a clamp
  (`fold_learnable_affine_blocks`).
- Stores every 4-D weight (the convolutions) channels-last (`torch.channels_last`). A convolution
  with a channels-last weight returns a channels-last map, so the whole backbone then runs in
  oneDNN's (CPU) / cuDNN's (GPU) preferred NHWC layout without reorders between layers, and the
  flattening of the projected features into tokens becomes a view instead of a copy.
- Replaces every transformer `FeedForward` by a `ChunkedFeedForward` sharing its weights: the tokens
  go through `linear1 -> ReLU -> linear2` a few hundred rows at a time, so the wide hidden
  activation (`[tokens, ffn_dim]`, 73 MB for a Deformable DETR encoder layer at 800 x 1066) stays
  in the CPU cache instead of making three trips through main memory (bias broadcast, ReLU, read
  back), and the ReLU runs in place. Only on CPU with one torch thread, and only for hidden
  activations of at least `MIN_HIDDEN_ELEMENTS_TO_CHUNK` values; otherwise it computes as
  `FeedForward`. (With two threads on a loaded 2-core machine, the 35 chunks of a Deformable DETR
  encoder layer took 1.7 s against 0.26 s unchunked: each chunk is a parallel region whose threads
  wait for one another, and a waiting thread may have lost its core. Larger chunks were still
  slower than none.)
- Switches plain attention to `scaled_dot_product_attention` and deformable attention to the
  device's fast sampling core ("auto"), in case a model was set to its reference paths.
- On CPU (float32 weights), compiles each ResNet backbone for inference (`trace_backbones`): the
  detector's `ResNetBackbone` is replaced by a `TracedBackbone` wrapping it, whose body is traced
  with TorchScript, frozen, and rewritten by `torch.jit.optimize_for_inference`, which keeps the
  maps in oneDNN's blocked layout from layer to layer, prepacks the weights and fuses each
  convolution with its ReLU and residual sum. ResNet-50 at 800 x 1066, one thread: about 1.2 s
  instead of 1.4 s. The compiled body is checked against the eager one on a second input size
  before it is used, and it only runs where it applies: CPU float32 images, eval mode, no autograd
  recording, no autocast (elsewhere the backbone's own modules run). TorchScript is deprecated in
  recent PyTorch; where tracing fails the backbone stays eager, with a warning.

The result is for inference only: the folded convolutions and the removed batch-norm buffers change
the state dict, so do not save or train an optimized model; optimize a copy if you need both.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from detr_lab.models.attention.deformable import set_deformable_core
from detr_lab.models.attention.plain import set_plain_attention_impl
from detr_lab.models.backbones import Backbone, FrozenBatchNorm2d, ResNetBackbone
from detr_lab.models.backbones.frozen_norm_conv import unfold_frozen_norms
from detr_lab.models.backbones.resnet_vd import ConvNorm
from detr_lab.models.fusion import fold_learnable_affine_blocks, fuse_repvgg_blocks
from detr_lab.models.necks.hybrid_encoder import ConvNormAct
from detr_lab.models.transformer import FeedForward

# Hidden activations per chunk of `ChunkedFeedForward` (floats): 2 MiB in float32, about one core's
# L2 cache on current server CPUs. Measured on a Xeon (2 MiB L2) at 17821 tokens x 1024: chunks of
# 256-512 rows take 0.72-0.75x the time of the unchunked block, 64 rows are slower than unchunked.
HIDDEN_ELEMENTS_PER_CHUNK = 1 << 19
# Smaller hidden activations (DETR's encoder at 800 x 1066: 850 tokens x 2048) are computed in one
# piece: there, chunking measured no faster or slightly slower.
MIN_HIDDEN_ELEMENTS_TO_CHUNK = 4 * HIDDEN_ELEMENTS_PER_CHUNK


def fold_batch_norm_into_conv(conv: nn.Conv2d, norm: FrozenBatchNorm2d | nn.BatchNorm2d) -> None:
    """Make `conv` compute `norm(conv(x))` by itself (in place; `norm` is left untouched).

    The folding is done in float64 and cast back to the convolution's dtype.
    """
    if conv.out_channels != norm.weight.shape[0]:
        raise ValueError(
            f"cannot fold a batch norm over {norm.weight.shape[0]} channels into a convolution with "
            f"{conv.out_channels} output channels"
        )
    with torch.no_grad():
        scale = norm.weight.double() * (norm.running_var.double() + norm.eps).rsqrt()  # (C_out,)
        shift = norm.bias.double() - norm.running_mean.double() * scale
        bias = conv.bias.double() if conv.bias is not None else torch.zeros_like(scale)
        weight = conv.weight.double() * scale.view(-1, 1, 1, 1)
        conv.weight.copy_(weight.to(conv.weight.dtype))
        new_bias = (bias * scale + shift).to(dtype=conv.weight.dtype, device=conv.weight.device)
        if conv.bias is None:
            conv.bias = nn.Parameter(new_bias, requires_grad=conv.weight.requires_grad)
        else:
            conv.bias.copy_(new_bias)


def _conv_norm_pairs(parent: nn.Module) -> list[tuple[str, str]]:
    """Names (conv, norm) of the children of `parent` where the norm directly follows the conv.

    torchvision's ResNet layout: inside a block (and the stem) `convN` is followed by `bnN`; a
    downsample branch is an `nn.Sequential(conv, norm)`.
    """
    children = dict(parent.named_children())
    if isinstance(parent, nn.Sequential):
        names = list(children)
        return [
            (a, b)
            for a, b in zip(names[:-1], names[1:], strict=True)
            if isinstance(children[a], nn.Conv2d) and isinstance(children[b], FrozenBatchNorm2d)
        ]
    pairs = []
    for name, child in children.items():
        if isinstance(child, FrozenBatchNorm2d) and name.startswith("bn"):
            conv_name = "conv" + name[2:]
            if isinstance(children.get(conv_name), nn.Conv2d):
                pairs.append((conv_name, name))
    return pairs


def fold_frozen_batch_norms(model: nn.Module) -> int:
    """Fold the frozen batch norms of every `ResNetBackbone` in `model` into their convolutions.

    Each folded norm is replaced by `nn.Identity`. Returns how many were folded (0 on a second call).
    Norms that training applies inside their convolutions (`fold_frozen_norms_for_training`) are
    separated again first, so they are folded once.
    """
    unfold_frozen_norms(model)
    count = 0
    for backbone in [m for m in model.modules() if isinstance(m, ResNetBackbone)]:
        for parent in list(backbone.modules()):
            for conv_name, norm_name in _conv_norm_pairs(parent):
                fold_batch_norm_into_conv(getattr(parent, conv_name), getattr(parent, norm_name))
                setattr(parent, norm_name, nn.Identity())
                count += 1
    return count


def fold_conv_norm_units(model: nn.Module) -> int:
    """Fold the batch norm of every conv-norm unit (ResNet-vd's `ConvNorm`, the hybrid encoder's
    `ConvNormAct` and its input projections, `Sequential(conv, norm)`, HGNetv2's `ConvBNAct`) into the
    convolution, at the
    norm's running statistics (its eval-mode function), and replace the norm by `nn.Identity`. For
    models that are only run. Returns how many were folded (0 on a second call)."""
    unfold_frozen_norms(model)  # training's `FrozenNormConv2d` pairs, folded here once
    count = 0
    for module in list(model.modules()):
        pairs = []
        if isinstance(module, (ConvNorm, ConvNormAct)):
            pairs = [("conv", "norm")]
        elif isinstance(module, nn.Sequential) and list(dict(module.named_children())) == ["conv", "norm"]:
            pairs = [("conv", "norm")]
        elif list(dict(module.named_children()))[:2] == ["conv", "bn"] and isinstance(module.conv, nn.Conv2d):
            pairs = [("conv", "bn")]  # HGNetv2's units (timm `ConvBNAct`: conv, bn, act, lab)
        for conv_name, norm_name in pairs:
            norm = getattr(module, norm_name)
            if isinstance(norm, (nn.BatchNorm2d, FrozenBatchNorm2d)) and norm.running_var is not None:
                fold_batch_norm_into_conv(getattr(module, conv_name), norm)
                setattr(module, norm_name, nn.Identity())
                count += 1
    return count


class ChunkedFeedForward(nn.Module):
    """Inference form of `FeedForward`, holding the same `linear1`, `dropout`, `linear2` modules.

    `[..., d]` -> `[..., d]`, computed `rows_per_chunk` rows at a time for CPU tensors in eval mode
    without autograd recording, with one torch thread, when the whole hidden activation would hold
    at least `min_hidden_elements` values; otherwise (small inputs, several threads, GPU, training,
    gradients) exactly as `FeedForward`.
    """

    def __init__(
        self,
        feed_forward: FeedForward,
        *,
        rows_per_chunk: int | None = None,
        min_hidden_elements: int = MIN_HIDDEN_ELEMENTS_TO_CHUNK,
    ) -> None:
        super().__init__()
        self.linear1 = feed_forward.linear1
        self.dropout = feed_forward.dropout
        self.linear2 = feed_forward.linear2
        hidden = self.linear1.out_features
        self.rows_per_chunk = rows_per_chunk or max(64, HIDDEN_ELEMENTS_PER_CHUNK // hidden)
        self.min_hidden_elements = min_hidden_elements
        self.train(feed_forward.training)

    def forward(self, x: Tensor) -> Tensor:
        recording = torch.is_grad_enabled() and (x.requires_grad or self.linear1.weight.requires_grad)
        flat = x.reshape(-1, x.shape[-1])  # (N, d)
        small = flat.shape[0] * self.linear1.out_features < self.min_hidden_elements
        # With several threads every chunk's matmul is a parallel region of its own; on a loaded
        # machine their synchronisation costs far more than the cache saves (see the module doc).
        threaded = torch.get_num_threads() > 1
        if x.device.type != "cpu" or recording or self.training or small or threaded:
            return self.linear2(self.dropout(F.relu(self.linear1(x))))
        out = None
        for start in range(0, flat.shape[0], self.rows_per_chunk):
            rows = slice(start, start + self.rows_per_chunk)
            hidden = self.linear1(flat[rows]).relu_()  # (rows, ffn_dim)
            chunk = self.linear2(hidden)  # (rows, d), in the dtype autocast chose, if any
            if out is None:
                out = chunk.new_empty(flat.shape[0], chunk.shape[1])
            out[rows] = chunk
        return out.view(*x.shape[:-1], self.linear2.out_features)

    def extra_repr(self) -> str:
        return f"rows_per_chunk={self.rows_per_chunk}, min_hidden_elements={self.min_hidden_elements}"


def chunk_feed_forwards(model: nn.Module) -> int:
    """Replace every `FeedForward` inside `model` by a `ChunkedFeedForward`; returns how many."""
    count = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, FeedForward):
                setattr(parent, name, ChunkedFeedForward(child))
                count += 1
    return count


class _FeatureMaps(nn.Module):
    """`backbone.feature_maps` (no padding mask) as the forward of a module, for tracing."""

    def __init__(self, backbone: Backbone) -> None:
        super().__init__()
        self.backbone = backbone

    def forward(self, images: Tensor) -> list[Tensor]:
        return self.backbone.feature_maps(images)


class TracedBackboneRunner:
    """A ResNet body compiled for CPU inference: `images [B, 3, H, W]` -> the stage maps.

    Deliberately not an `nn.Module`: the `TracedBackbone` holds it without registering it, and a copy
    or a pickle of that backbone drops it (the copy computes with its own modules).
    """

    def __init__(self, compiled: torch.jit.ScriptModule) -> None:
        self.compiled = compiled

    @staticmethod
    def applies_to(images: Tensor) -> bool:
        return (
            images.device.type == "cpu"
            and images.dtype == torch.float32
            and not torch.is_grad_enabled()
            and not torch.is_autocast_enabled("cpu")
        )

    def __call__(self, images: Tensor) -> list[Tensor]:
        return list(self.compiled(images))

    def __deepcopy__(self, memo) -> None:
        return None

    def __reduce__(self):
        return type(None), ()


class TracedBackbone(Backbone):
    """A backbone whose feature maps come from an inference runner where it applies.

    Same levels, channels, strides and outputs as `eager` (the wrapped backbone, a submodule); its
    `feature_maps` calls `inference_runner(images)` for inputs where `inference_runner.applies_to(images)`
    in eval mode, and `eager.feature_maps` everywhere else (training, autograd, autocast, other
    devices or dtypes, no runner). The runner is not a submodule: it is neither saved, moved between
    devices nor copied with the backbone (a copy computes with `eager`). Only for backbones whose maps
    do not depend on the padding mask (ResNets).
    """

    def __init__(self, eager: Backbone, runner: TracedBackboneRunner | None = None) -> None:
        super().__init__()
        self.eager = eager
        self.num_channels = list(eager.num_channels)
        self.strides = list(eager.strides)
        self.size_multiple = eager.size_multiple
        self._inference_runner = runner

    @property
    def inference_runner(self) -> TracedBackboneRunner | None:
        """The runner set by `set_inference_runner`, or None."""
        return self._inference_runner

    def set_inference_runner(self, runner) -> None:
        """Let `runner` compute `feature_maps` where `runner.applies_to(images)` (None: always `eager`)."""
        self._inference_runner = runner

    def feature_maps(self, images: Tensor, padding_mask: Tensor | None = None) -> list[Tensor]:
        """`eager.feature_maps(images, padding_mask)`, computed by the runner where it applies."""
        runner = self._inference_runner
        if runner is not None and not self.training and runner.applies_to(images):
            return runner(images)
        return self.eager.feature_maps(images, padding_mask)


def trace_backbone(
    backbone: ResNetBackbone, example_size: tuple[int, int] = (64, 96)
) -> TracedBackboneRunner:
    """Compile `backbone.feature_maps` for CPU inference and check it against the eager maps.

    The backbone must be on the CPU with float32 weights and in eval mode. Raises RuntimeError when
    tracing fails or the compiled body disagrees with the eager one (relative 1e-4) on an input of
    another size and batch than the traced one.
    """
    weight = next(backbone.parameters())
    if weight.device.type != "cpu" or weight.dtype != torch.float32 or backbone.training:
        raise RuntimeError("only a CPU float32 backbone in eval mode can be traced for inference")
    eager = _FeatureMaps(backbone).eval()
    generator = torch.Generator().manual_seed(0)
    example = torch.randn(1, 3, *example_size, generator=generator)
    check = torch.randn(2, 3, example_size[0] + 32, example_size[1] - 16, generator=generator)
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # TorchScript's deprecation notices and tracer remarks
            compiled = torch.jit.optimize_for_inference(torch.jit.freeze(torch.jit.trace(eager, example)))
            expected, got = eager(check), list(compiled(check))
    except Exception as err:  # any TorchScript failure leaves the backbone eager
        raise RuntimeError(f"tracing the backbone failed: {type(err).__name__}: {err}") from err
    for level, (want, have) in enumerate(zip(expected, got, strict=True)):
        scale = want.abs().max().clamp_min(1e-6)
        if want.shape != have.shape or (want - have).abs().max() > 1e-4 * scale:
            raise RuntimeError(f"the traced backbone disagrees with the eager one at stage level {level}")
    return TracedBackboneRunner(compiled)


def trace_backbones(model: nn.Module) -> int:
    """Replace every CPU float32 `ResNetBackbone` in `model` by a `TracedBackbone` wrapping it with a
    traced inference runner; returns how many.

    A backbone that cannot be traced stays as it is, computing with its modules (a warning says why).
    """
    count = 0
    for parent in list(model.modules()):
        if isinstance(parent, TracedBackbone):
            continue  # already wrapped (a second call)
        for name, child in list(parent.named_children()):
            if not isinstance(child, ResNetBackbone):
                continue
            weight = next(child.parameters())
            if weight.device.type != "cpu" or weight.dtype != torch.float32:
                continue
            try:
                runner = trace_backbone(child.eval())
            except RuntimeError as err:
                warnings.warn(f"backbone left uncompiled: {err}", stacklevel=2)
                continue
            setattr(parent, name, TracedBackbone(child, runner).eval())
            count += 1
    return count


def use_fast_attention(model: nn.Module) -> None:
    """Plain attention on SDPA, deformable attention on the device's fast core ("auto")."""
    set_plain_attention_impl(model, "sdpa")
    set_deformable_core(model, "auto")


def optimize_for_inference(
    model: nn.Module, *, channels_last: bool = True, compile_backbone: bool = True
) -> nn.Module:
    """Apply the inference rewrites listed in the module docstring to `model` (in place) and return it.

    The model is put in eval mode. Call it after moving the model to its device, and do not change
    its weights afterwards (a compiled backbone holds a copy of them).
    Args:
        channels_last: store convolution weights channels-last (on by default).
        compile_backbone: trace CPU float32 ResNet backbones (`trace_backbones`; on by default).
    """
    fold_frozen_batch_norms(model)
    fuse_repvgg_blocks(model)
    fold_learnable_affine_blocks(model)
    fold_conv_norm_units(model)
    chunk_feed_forwards(model)
    if channels_last:
        model.to(memory_format=torch.channels_last)  # converts the 4-D tensors: convolution weights
    use_fast_attention(model)
    model.eval()  # every module, the replacements included
    if compile_backbone:
        trace_backbones(model)
    return model
