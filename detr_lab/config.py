"""Typed configuration: the schema, YAML loading with `_base_` inheritance, dotted overrides.

A run is described by one `Config` tree. YAML files under `configs/` are merged onto the schema's
defaults by OmegaConf, which rejects unknown keys and wrong types; `validate` then checks values
(choices, ranges). Every failure is a `ConfigError` naming the file and the dotted key, and for an
unknown key the closest valid one.

    cfg = load_config("configs/deformable.yaml", overrides=["model.num_queries=100"])
    save_config(cfg, run_dir / "config.yaml")
"""

from __future__ import annotations

import difflib
import math
import os
import re
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from detr_lab.config_migration import LegacyConfigError, migrate_config_data
from detr_lab.files import atomic_write_text
from detr_lab.models.attention import (
    ATTENTION_SPECS,
    attention_names,
    needs_multiscale_inputs,
    reference_attention_hint,
    refinement_error,
)
from detr_lab.models.necks import NECKS
from detr_lab.models.queries import QUERY_SOURCES, resolved_query_source

BASE_KEY = "_base_"
# `--set key=None` means null, as `key=null` does (YAML's spelling); for a string key, write 'None' quoted.
NULL_SPELLINGS = ("None",)


class ConfigError(ValueError):
    """A configuration file, key or value is invalid. The message names which."""


def _choice(*values: str, default: str) -> Any:
    return field(default=default, metadata={"choices": values})


def _attention_choice(site: str, default: str) -> Any:
    """An attention variant for `site`; the choices are read from the spec table when validating."""
    return field(default=default, metadata={"choices": lambda: attention_names(site)})


def _positive(default: Any) -> Any:
    return field(default=default, metadata={"min": 0, "exclusive": True})


def _non_negative(default: Any) -> Any:
    return field(default=default, metadata={"min": 0})


SEED_MAX = 2**32 - 1  # numpy's and Lightning's seeds are unsigned 32-bit integers


def _seed(default: int) -> Any:
    return field(default=default, metadata={"min": 0, "max": SEED_MAX})


# --------------------------------------------------------------------------------------------- model
# ResNet depths of the "resnet" (torchvision) and "resnet_vd" (RT-DETR's ResNet-vd) backbone types.
RESNET_NAMES = ("resnet18", "resnet34", "resnet50", "resnet101")
RESNET_TYPES = ("resnet", "resnet_vd")
# Variants of the "hgnetv2" backbone type (D-FINE's HGNetv2; the backbone's own list is
# detr_lab.models.backbones.hgnetv2_keys.HGNETV2_NAMES, which tests keep equal to this one).
HGNETV2_NAMES = tuple(f"hgnetv2_b{index}" for index in range(7))
# Options of some backbone types only: key -> types. A key set for another type is an error.
BACKBONE_KEY_TYPES = {
    "dilation": ("resnet",),
    "frozen_stages": (*RESNET_TYPES, "hgnetv2"),
    "norm": (*RESNET_TYPES, "hgnetv2"),
    "freeze_stem": ("resnet_vd", "hgnetv2"),
    "use_lab": ("hgnetv2",),
}


@dataclass
class BackboneConfig:
    # resnet: torchvision ResNet (name resnet18..resnet101); resnet_vd: ResNet-vd as RT-DETR's PResNet
    # (same names; deep stem, average-pool shortcuts; weights_path: the official key layout); timm: a
    # hierarchical timm model through
    # features_only (ConvNeXt, Swin, ...); vit: a plain timm ViT, its one map at the patch stride (ViTDet's
    # simple feature pyramid is the neck `simple_pyramid`); hgnetv2: D-FINE's HGNetv2 (name hgnetv2_b0..b6;
    # weights_path: the official PPHGNetV2_B*_stage1.pth layout or a timm checkpoint).
    type: str = _choice("resnet", "resnet_vd", "timm", "vit", "hgnetv2", default="resnet")
    # resnet, resnet_vd: one of RESNET_NAMES; hgnetv2: one of HGNETV2_NAMES; timm / vit: a timm model name
    name: str = "resnet50"
    # ImageNet weights through the library's own mechanism: `pretrained: true` downloads (torchvision
    # or timm cache); `weights_path` loads a local torchvision / timm state dict and never downloads.
    pretrained: bool = False
    weights_path: str | None = None
    # timm / vit only: further timm.create_model arguments (e.g. drop_path_rate, or small widths).
    timm_kwargs: dict[str, Any] = field(default_factory=dict)
    # ResNet types and hgnetv2 only (null = the default in brackets; resnet_vd and hgnetv2: [0] and
    # [batch_norm]):
    dilation: bool | None = None  # resnet: [false] dilate the last stage ("DC5"): stride 16 instead of 32
    frozen_stages: int | None = field(default=None, metadata={"min": 0, "max": 4})  # [1] stem + layer1, DETR
    # [frozen_bn] fixed statistics (DETR, pretrained weights); batch_norm: trained, for from-scratch backbones
    norm: str | None = field(default=None, metadata={"choices": ("frozen_bn", "batch_norm")})
    # resnet_vd, hgnetv2: [false] freeze the stem even with frozen_stages 0 (the official `freeze_at: 0`
    # of RT-DETR-R50/R101 and, with freeze_stem_only, D-FINE-L/X)
    freeze_stem: bool | None = None
    # hgnetv2: learnable affine blocks after the activations ([true] for b0..b3: D-FINE-N/S/M; [false] b4..b6)
    use_lab: bool | None = None


@dataclass
class ActConfig:
    """Adaptive clustering attention (E2LSH hashing of the queries)."""

    q_hashes: int = _positive(32)  # L: number of hash rounds
    bucket_width: float = _positive(1.0)  # r: E2LSH bucket width
    seed: int = _seed(0)  # seeds the hash draws so evaluation is reproducible


@dataclass
class EncoderConfig:
    num_layers: int = _non_negative(6)
    attention: str = _attention_choice("encoder", default="plain")  # detr_lab.models.attention
    num_points: int = _positive(4)  # deformable attention: sampling points per head and level
    act: ActConfig = field(default_factory=ActConfig)


@dataclass
class DecoderConfig:
    num_layers: int = _positive(6)
    cross_attention: str = _attention_choice("decoder", default="plain")
    num_points: int = _positive(4)
    # deformable_v2 only: sampling points per level (e.g. [4, 4, 2]; null: num_points on every level)
    # and the sampling method (default: bilinear; discrete: nearest value, RT-DETRv2's deployment option).
    level_points: list[int] | None = None
    sampling: str = _choice("default", "discrete", default="default")
    # Evaluate with the first N decoder layers only (RT-DETR-R50-m: 3 of 6); null: all of them.
    eval_layers: int | None = field(default=None, metadata={"min": 1})
    # deformable_v2 only: the value and output projections of the cross-attention (D-FINE has none).
    projections: bool = True
    # D-FINE: fuse the cross-attention into the queries with a learned gate instead of residual + norm.
    gate: bool = False
    # Clamp the query positions computed from the reference boxes to +-this (D-FINE: 10); null: no clamp.
    query_pos_clamp: float | None = field(default=None, metadata={"min": 0, "exclusive": True})
    # The feed-forward blocks' (and D-FINE's quality heads') activation (DEIM: silu).
    activation: str = _choice("relu", "silu", default="relu")


@dataclass
class DistributionConfig:
    """D-FINE's fine-grained distribution refinement (`detr_lab.models.distribution`): every decoder layer
    predicts each box edge as a distribution over `reg_max + 1` bins, refined layer by layer. Needs
    `model.box_refine` and a query source with boxes (iou_aware, mixed_selection)."""

    enabled: bool = False
    reg_max: int = field(default=32, metadata={"min": 4})  # bins - 1 (even)
    reg_scale: float = _positive(4.0)  # curvature of the weighting function
    up: float = _positive(0.5)  # its range: the largest offset is 2 * up * reg_scale
    quality: bool = True  # the location-quality estimator (LQE) adds a score to the class logits


@dataclass
class DenoisingConfig:
    """Contrastive denoising training (DINO, arXiv:2203.03605; DN-DETR without negatives' extra noise).

    Ground-truth boxes and labels are noised into extra decoder queries (a positive and a negative
    copy per object and group) that learn to reconstruct the objects; used in training only.
    """

    enabled: bool = False
    # Queries budget: groups = 2 * dn_number // (2 * most objects in an image of the batch), the
    # official rule (see `detr_lab.models.queries.denoising.num_denoising_groups`).
    dn_number: int = _positive(100)
    label_noise_ratio: float = field(default=0.5, metadata={"min": 0, "max": 1})  # half of it flips labels
    box_noise_scale: float = _non_negative(0.4)  # corner shift in units of half the box size


@dataclass
class NeckConfig:
    """The slot between the backbone and the encoder (`detr_lab.models.necks.NECKS`)."""

    # projection: 1x1 convolutions (DETR) or Deformable DETR's GroupNorm projections + extra levels.
    type: str = field(default="projection", metadata={"choices": lambda: tuple(NECKS)})
    options: dict[str, Any] = field(default_factory=dict)  # the neck's own builder arguments


@dataclass
class ModelConfig:
    # Real classes; "no object" is index `num_classes` for softmax classification.
    num_classes: int = _positive(91)
    hidden_dim: int = _positive(256)
    num_heads: int = _positive(8)
    ffn_dim: int = _positive(2048)
    dropout: float = field(default=0.1, metadata={"min": 0, "max": 1})
    num_queries: int = _positive(100)
    # 5 levels: C2-C5 plus one strided level (DINO 5-scale); 4: C3-C5 plus one; else C5 / C4-C5.
    num_feature_levels: int = field(default=1, metadata={"min": 1, "max": 5})
    position_encoding: str = _choice("sine", "learned", default="sine")
    classification: str = _choice("softmax", "sigmoid", default="softmax")  # sigmoid = focal loss
    # How the decoder's queries are made (`detr_lab.models.queries.QUERY_SOURCES`): learned (DETR),
    # learned_points (Deformable DETR), proposals (two-stage Deformable DETR), learned_anchors
    # (DAB-DETR), mixed_selection (DINO); null: learned_points when the decoder cross-attention takes
    # reference points (deformable), else learned.
    query_source: str | None = field(default=None, metadata={"choices": lambda: tuple(QUERY_SOURCES)})
    box_refine: bool = False  # iterative bounding-box refinement (every decoder layer refines the boxes)
    aux_loss: bool = True
    # DINO look-forward-twice: a layer's box also gets gradients through the next layer's refinement.
    look_forward_twice: bool = False
    share_heads: bool = False  # one class head and one box head shared by every decoder layer
    position_temperature: float = _positive(10000.0)  # sine position encoding (DINO: 20)
    num_detections: int = _positive(100)  # sigmoid post-processing: top (query, class) pairs kept
    denoising: DenoisingConfig = field(default_factory=DenoisingConfig)
    distribution: DistributionConfig = field(default_factory=DistributionConfig)
    # Activation of the MLP heads (box, proposal and query-position heads); DEIM: silu.
    mlp_activation: str = _choice("relu", "silu", default="relu")
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    neck: NeckConfig = field(default_factory=NeckConfig)
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    # Training: the detector's forward compiled by `torch.compile` (nn.Module.compile: the weights'
    # names do not change). The matcher and the loss stay eager.
    compile: bool = False
    # Training: convolution weights stored channels-last (NHWC), so every convolution of the backbone
    # and the neck runs in oneDNN's / cuDNN's preferred layout without reorders (same values; about
    # 15% off a DETR-R50 CPU training step). The saved weights are the same either way.
    channels_last: bool = True
    # Training: each convolution followed by a frozen batch norm computes the norm itself, as one
    # convolution with weight W * scale and bias shift (`detr_lab.models.backbones.frozen_norm_conv`;
    # the same gradients to rounding, about 7% off a DETR-R50 CPU training step). The saved weights
    # are the same either way.
    fold_frozen_norms: bool = True


@dataclass
class LossConfig:
    """Matching costs, loss weights and loss terms, in one place (the criterion and matcher read these)."""

    cost_class: float = _non_negative(1.0)
    cost_bbox: float = _non_negative(5.0)
    cost_giou: float = _non_negative(2.0)
    class_weight: float = _non_negative(1.0)
    bbox_weight: float = _non_negative(5.0)
    giou_weight: float = _non_negative(2.0)
    eos_coef: float = _non_negative(0.1)  # softmax: weight of the "no object" class
    focal_alpha: float = field(default=0.25, metadata={"min": 0, "max": 1})
    focal_gamma: float = _non_negative(2.0)
    # Which terms run (names of `detr_lab.models.loss_terms.LOSS_TERMS`, checked when the criterion is
    # built): labels = loss_ce (+ class_error), boxes = loss_bbox and loss_giou, cardinality =
    # cardinality_error and box_parts = loss_xy / loss_hw (both logged only); vfl = loss_vfl (the
    # varifocal loss of RT-DETR, sigmoid classification, in place of labels); mal = loss_mal (DEIM's
    # matchability-aware loss, in place of labels or vfl); fgl = loss_fgl and ddf = loss_ddf (D-FINE's
    # localization and self-distillation losses, with `model.distribution.enabled`).
    terms: list[str] = field(default_factory=lambda: ["labels", "cardinality", "boxes"])
    # Weighted value -> weight, for values whose weight has no key above (e.g. a new term's).
    weights: dict[str, float] = field(default_factory=dict)
    # Further matching costs of `detr_lab.models.matcher.MATCHING_COSTS`: name -> weight.
    extra_costs: dict[str, float] = field(default_factory=dict)
    # A term's own options: term name -> options, e.g. {vfl: {alpha: 0.75, gamma: 2.0}} (RT-DETR's VFL).
    term_options: dict[str, Any] = field(default_factory=dict)
    # D-FINE's GO-LSD: box, FGL and DDF terms use the union of every layer's matching.
    union_matching: bool = False


@dataclass
class DistillConfig:
    """Multi-task knowledge distillation of an ACT student from a plain-attention teacher."""

    enabled: bool = False
    teacher_checkpoint: str | None = None
    feature_weight: float = _non_negative(1.0)  # MSE between encoder outputs
    box_l1_weight: float = _non_negative(5.0)
    box_giou_weight: float = _non_negative(2.0)
    class_kl_weight: float = _non_negative(1.0)
    aux_layers: bool = True  # also distill the predictions of every auxiliary decoder layer
    init_student: bool = True  # a new run starts the student from the teacher's weights


# ---------------------------------------------------------------------------------------------- data
# RT-DETR's multi-scale training sizes (rtdetrv2_pytorch configs/rtdetrv2/include/dataloader.yml,
# BatchImageCollateFunction `scales`): 640 three times, so a third of the batches keep their size.
RTDETR_SQUARE_SCALES = (480, 512, 544, 576, 608, 640, 640, 640, 672, 704, 736, 768, 800)


@dataclass
class MosaicConfig:
    """DEIM's mosaic (Dense O2O; `detr_lab.data.mosaic`), off by default (`prob: 0`).

    With probability `prob`, in epochs [`start_epoch`, `stop_epoch`) (0-based; stop null: no end of its
    own), a training sample becomes a mosaic of itself and three other images of the training set, each
    resized to shorter side `output_size`, then a random affine: rotation in +-`degrees`, shift up to
    `translate` (x, y) of the canvas, scale in `scale`, border `fill`. With `policy: rtdetr` a mosaic
    sample skips the zoom-out and IoU crop (the official rule), and no mosaic is drawn outside
    [`data.augment.start_epoch`, `data.augment.stop_epoch`). Official (configs/base/deim.yml): prob 0.5,
    output_size 320, degrees 10, translate [0.1, 0.1], scale [0.5, 1.5], fill 0; the window per model
    is in `configs/base/data_coco_deim.yaml`.
    """

    prob: float = field(default=0.0, metadata={"min": 0, "max": 1})
    start_epoch: int = _non_negative(0)
    stop_epoch: int | None = field(default=None, metadata={"min": 0})
    output_size: int = _positive(320)
    degrees: float = field(default=10.0, metadata={"min": 0, "max": 180})
    translate: list[float] = field(default_factory=lambda: [0.1, 0.1])
    scale: list[float] = field(default_factory=lambda: [0.5, 1.5])
    fill: int = field(default=0, metadata={"min": 0, "max": 255})


@dataclass
class MixupConfig:
    """DEIM's batch mixup (`detr_lab.data.mixup`), off by default (`prob: 0`); `policy: rtdetr` only.

    With probability `prob` per batch, in epochs [`start_epoch`, `stop_epoch`) (0-based; stop null: no
    end of its own; never from `data.augment.stop_epoch` on), each image is blended with the previous
    one of the batch and takes its boxes too. Official (configs/base/deim.yml): prob 0.5, the window per
    model in `configs/base/data_coco_deim.yaml`.
    """

    prob: float = field(default=0.0, metadata={"min": 0, "max": 1})
    start_epoch: int = _non_negative(0)
    stop_epoch: int | None = field(default=None, metadata={"min": 0})


@dataclass
class AugmentConfig:
    """Sizes in pixels. `policy` picks the recipe (`detr_lab.data.transforms`):

    detr (default): DETR's. Training: flip, shorter side from `train_scales` (longer <= `max_size`) or
    the random resized crop; evaluation: shorter side `eval_size`, longer <= `eval_max_size`; batches
    are zero-padded. The keys `square_*` and the `*_prob` of the rtdetr ops are not read; `start_epoch`
    and `stop_epoch` must stay null.
    rtdetr: RT-DETR's (rtdetrv2_pytorch). Training: photometric distortion, zoom-out, IoU crop, flip,
    resize to `square_size` x `square_size` (aspect ratio not kept, no padding); each batch resized to a
    side drawn from `square_scales` (empty: off); from epoch `stop_epoch` on (0-based, as Lightning's
    `current_epoch`), no distortion, zoom-out, IoU crop nor batch resize. Evaluation and inference:
    resize to `square_size` x `square_size`. `train_scales`, `max_size`, `crop_*`, `eval_size` and
    `eval_max_size` are not read. The official recipe feeds pixels scaled to [0, 1]: set
    `mean: [0, 0, 0]` and `std: [1, 1, 1]` (mean / std are used as given by both policies).
    `start_epoch` (rtdetr only; null: none): before it, no distortion, zoom-out, IoU crop nor mosaic
    (DEIM's first stage, epochs 0-3 of its recipes).
    DEIM's Dense O2O (`mosaic`, `mixup`, both off by default) adds to either policy's training
    pipeline (mixup needs rtdetr's equal image sizes); see `MosaicConfig`, `MixupConfig`.
    """

    train_scales: list[int] = field(default_factory=lambda: list(range(480, 801, 32)))
    max_size: int = _positive(1333)
    hflip_prob: float = field(default=0.5, metadata={"min": 0, "max": 1})
    crop_prob: float = field(default=0.5, metadata={"min": 0, "max": 1})
    crop_resize_scales: list[int] = field(default_factory=lambda: [400, 500, 600])
    crop_min_size: int = _positive(384)
    crop_max_size: int = _positive(600)
    eval_size: int = _positive(800)
    eval_max_size: int = _positive(1333)
    mean: list[float] = field(default_factory=lambda: [0.485, 0.456, 0.406])
    std: list[float] = field(default_factory=lambda: [0.229, 0.224, 0.225])
    policy: str = _choice("detr", "rtdetr", default="detr")
    # rtdetr policy only (official values):
    square_size: int = _positive(640)  # Resize [square_size, square_size], training and evaluation
    square_scales: list[int] = field(default_factory=lambda: list(RTDETR_SQUARE_SCALES))  # batch sides
    stop_epoch: int | None = field(default=None, metadata={"min": 0})  # null: augment every epoch
    photometric_prob: float = field(default=0.5, metadata={"min": 0, "max": 1})  # per colour operation
    zoom_out_prob: float = field(default=0.5, metadata={"min": 0, "max": 1})
    zoom_out_max: float = field(default=4.0, metadata={"min": 1})  # canvas side / image side in [1, max]
    iou_crop_prob: float = field(default=0.8, metadata={"min": 0, "max": 1})
    start_epoch: int | None = field(default=None, metadata={"min": 0})  # null: augment from epoch 0
    # DEIM's Dense O2O, either policy (mixup: rtdetr only)
    mosaic: MosaicConfig = field(default_factory=MosaicConfig)
    mixup: MixupConfig = field(default_factory=MixupConfig)


@dataclass
class SyntheticConfig:
    """The built-in synthetic COCO-format dataset, generated under `data.root` on first use."""

    num_train: int = _positive(400)
    num_val: int = _positive(80)
    image_size: int = _positive(256)  # longer side of the generated images
    seed: int = _seed(0)


@dataclass
class DataConfig:
    dataset: str = _choice("coco", "synthetic", default="coco")
    # On-disk layout of a `dataset: coco` set: "coco" (image folders + instances json), "yolo"
    # (Ultralytics: `<root>/<yolo_data>` naming the image folders, labels/*.txt beside images/), or
    # "auto": yolo when `<root>/<yolo_data>` exists and neither COCO annotation file does.
    format: str = _choice("auto", "coco", "yolo", default="auto")
    yolo_data: str = "data.yaml"  # the YOLO dataset description, relative to `root`
    # Run the dataset doctor's quick checks when training starts (see detr_lab.data.doctor);
    # a finding that would make training fail or silently wrong stops the run.
    doctor: bool = True
    root: str = "data/coco"
    # COCO 2017 layout by default: <root>/train2017, <root>/annotations/instances_train2017.json.
    # Relative paths below are resolved against `root`.
    train_images: str = "train2017"
    train_annotations: str = "annotations/instances_train2017.json"
    val_images: str = "val2017"
    val_annotations: str = "annotations/instances_val2017.json"
    # The test split, evaluated by `tools/eval.py --split test` only (a YOLO set: its data.yaml's `test`).
    test_images: str = "test2017"
    test_annotations: str = "annotations/instances_test2017.json"
    batch_size: int = _positive(2)  # per device
    num_workers: int = _non_negative(2)
    skip_corrupt_images: bool = True  # training only: a corrupt image is skipped and counted
    # Evaluation batches: "same_size" puts only images of one resized size in a batch (no padding, so AP
    # does not depend on batch size or process count); "padded" is the official DETR batching (parity).
    eval_batching: str = _choice("same_size", "padded", default="same_size")
    # Training batches: "aspect_ratio" (default) batches images of one orientation (less padding, closer
    # to the unpadded same-size evaluation; `detr_lab.data.samplers.AspectRatioBatchSampler`; no grouping
    # under the fixed-size `rtdetr` policy, which pads nothing); "padded" mixes any images (the official
    # DETR / Deformable DETR / DINO batching; each is zero-padded to the batch's largest).
    train_batching: str = _choice("aspect_ratio", "padded", default="aspect_ratio")
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)


# ------------------------------------------------------------------------------------ optimization
@dataclass
class OptimConfig:
    """AdamW rates per parameter group (`detr_lab.engine.optim`) and the LR schedule.

    Every schedule scales each group's own rate (lr, lr_backbone, multipliers, no-decay groups) by one
    common factor. `schedule`:
    multistep (default): the rate drops by `lr_drop_factor` at each epoch of `lr_drop_epochs` (0-based).
    With `warmup_steps` N > 0 it is first ramped up linearly over the first N optimizer steps, step s
    (0-based) at min(1, (s + 1) / N) of the rate: RT-DETR / D-FINE's `LinearWarmup` (`warmup_duration`,
    2000 in RT-DETRv2, 500 in D-FINE), and the LR is then set at every optimizer step instead of every
    epoch; milestones stay plain epochs (the official loop delays them by epochs ending inside the warm-up).
    flat_cosine: DEIM's `FlatCosineLRScheduler` (`lrsheduler: flatcosine`), set at every optimizer step:
    a quadratic warm-up (s / N) ** 2 up to step N = `warmup_steps` (DEIM's `warmup_iter`; 0: none), the
    full rate up to epoch `flat_epochs` (`flat_epoch`), a half cosine down to `min_lr_ratio` x the rate
    (`lr_gamma`), and that rate for the last `no_aug_epochs` epochs (`no_aug_epoch`, DEIM's epochs without
    strong augmentation); it does not read `lr_drop_epochs` / `lr_drop_factor`. The run's length is
    `trainer.max_epochs` x the optimizer steps of an epoch (`trainer.accumulate_grad_batches` counted);
    `trainer.max_steps` / `max_time_minutes` stop a run early without compressing the schedule
    (a schedule given relative to the run, below, is compressed). DEIM-D-FINE
    L and X: `warmup_steps: 2000, flat_epochs: 29, no_aug_epochs: 8, min_lr_ratio: 0.5`, 58 epochs.
    Formulas in `detr_lab.engine.optim`. A resumed run applies these values from the config at its
    current step; `schedule` and warm-up on / off (multistep) cannot change at resume.

    Relative form (any dataset size, any budget): `lr_drop_at` (fractions in (0, 1), instead of
    `lr_drop_epochs`, which must then be []), `warmup_fraction` (instead of `warmup_steps`),
    `flat_fraction` and `no_aug_fraction` (flat_cosine, instead of `flat_epochs` / `no_aug_epochs`).
    The run's progress p is the larger of steps done / the run's steps (max_epochs x steps per epoch,
    or `trainer.max_steps` when smaller) and wall time / `trainer.max_time_minutes` (when set), so a
    time-limited run goes through its whole schedule within its budget. A relative multistep schedule is
    set at every optimizer step, like one with a warm-up.
    """

    lr: float = _positive(1e-4)
    lr_backbone: float = _non_negative(1e-5)
    weight_decay: float = _non_negative(1e-4)
    # Parameter-name substring -> LR multiplier (e.g. Deformable DETR: sampling_offsets: 0.1).
    lr_multipliers: dict[str, float] = field(default_factory=dict)
    # Parameter-name substrings whose parameters get no weight decay (RT-DETR: [norm, bn], its norms).
    no_decay_keys: list[str] = field(default_factory=list)
    lr_drop_epochs: list[int] = field(default_factory=lambda: [200])
    lr_drop_factor: float = _positive(0.1)
    clip_grad_norm: float = _non_negative(0.1)  # 0 disables clipping
    schedule: str = _choice("multistep", "flat_cosine", default="multistep")
    warmup_steps: int = _non_negative(0)  # optimizer steps; multistep: linear, flat_cosine: quadratic
    # flat_cosine only (DEIM's flat_epoch, no_aug_epoch, lr_gamma); other values with multistep are errors.
    flat_epochs: int = _non_negative(0)  # full rate up to this epoch (may exceed max_epochs: no decay)
    no_aug_epochs: int = _non_negative(0)  # the last epochs at min_lr_ratio x the rate
    min_lr_ratio: float = field(default=0.5, metadata={"min": 0, "max": 1})
    # The same schedule given relative to the run (`detr_lab.engine.optim.run_progress`): fractions of
    # the run, which ends at `trainer.max_steps`, `trainer.max_epochs` or `trainer.max_time_minutes`,
    # whichever comes first, so that a recipe keeps its shape on any dataset size and time budget.
    lr_drop_at: list[float] = field(default_factory=list)  # drop by lr_drop_factor at these fractions
    warmup_fraction: float = field(default=0.0, metadata={"min": 0, "max": 1})  # instead of warmup_steps
    flat_fraction: float = field(default=0.0, metadata={"min": 0, "max": 1})  # flat_cosine: flat_epochs
    no_aug_fraction: float = field(default=0.0, metadata={"min": 0, "max": 1})  # flat_cosine: no_aug_epochs


def uses_relative_schedule(optim: OptimConfig) -> bool:
    """True when any part of the LR schedule is given as a fraction of the run."""
    return bool(optim.lr_drop_at) or any(
        getattr(optim, key) > 0 for key in ("warmup_fraction", "flat_fraction", "no_aug_fraction")
    )


@dataclass
class EmaConfig:
    """Exponential moving average of the weights (Lightning's `WeightAveraging` callback).

    After each optimizer step, ema = d_n * ema + (1 - d_n) * weights, with the warm-up
    d_n = decay * (1 - exp(-n / warmup_steps)) after n updates (the ModelEMA of YOLOv5 / RT-DETR), so
    the average follows the fast-changing early weights and settles to `decay`; warmup_steps 0: d_n = decay.
    Parameters and buffers (BatchNorm statistics) are averaged. Validation, the best checkpoint and every
    saved `state_dict` (eval, infer, export) use the averaged weights; resume restores the average.
    """

    enabled: bool = False
    decay: float = field(default=0.9998, metadata={"min": 0, "max": 1})
    warmup_steps: int = _non_negative(2000)


@dataclass
class TrackingConfig:
    """Names and stores of the experiment trackers listed in `trainer.loggers` (see engine.trackers)."""

    experiment: str = "detr_lab"  # MLflow experiment, W&B project
    run_name: str = ""  # "": the output folder's name
    # "": a local SQLite store, sqlite:///<output_dir>/mlflow.db (MLflow's file store is deprecated);
    # any MLflow tracking URI otherwise (http://host:5000, databricks, ...)
    mlflow_uri: str = ""
    # auto: online when logged in to W&B (WANDB_API_KEY, or `wandb login`'s netrc entry), else offline
    wandb_mode: str = _choice("auto", "offline", "online", default="auto")


@dataclass
class EarlyStoppingConfig:
    """Stop when val/AP has not improved by more than `min_delta` for `patience` validation rounds."""

    enabled: bool = False
    patience: int = _positive(5)
    min_delta: float = _non_negative(0.0)


@dataclass
class MonitorsConfig:
    """Training-health checks (`detr_lab.engine.health`), on by default, silent while all is well."""

    # Warn when val/AP is still <= stalled_ap_threshold after this many validation rounds (0: off).
    stalled_ap_rounds: int = _non_negative(3)
    stalled_ap_threshold: float = _non_negative(0.01)
    # A non-finite loss or gradient: "error" stops naming the step and image ids; "skip" drops the step.
    non_finite: str = _choice("error", "skip", default="error")
    # Query usage over each training epoch (final decoder layer's matches): warn when the busiest
    # `query_top_fraction` of the query slots take more than `query_max_share` of all matches, or when
    # images have more objects than queries.
    query_usage: bool = True
    query_top_fraction: float = field(default=0.1, metadata={"min": 0, "max": 1, "exclusive": True})
    query_max_share: float = field(default=0.5, metadata={"min": 0, "max": 1, "exclusive": True})


@dataclass
class TrainerConfig:
    output_dir: str = "runs/default"
    max_epochs: int = _positive(50)
    max_steps: int = field(default=-1, metadata={"min": -1})  # -1: no step limit
    accelerator: str = _choice("auto", "cpu", "gpu", "cuda", "mps", default="auto")
    devices: str = "auto"  # "auto", a count ("8") or a list ("0,1")
    num_nodes: int = _positive(1)
    strategy: str = "auto"  # "auto", "ddp", "ddp_find_unused_parameters_true", ...
    precision: str = _choice("32", "32-true", "bf16-mixed", "16-mixed", default="32")
    accumulate_grad_batches: int = _positive(1)
    check_val_every_n_epoch: int = _positive(1)
    log_every_n_steps: int = _positive(50)
    limit_train_batches: float = _positive(1.0)
    limit_val_batches: float = _positive(1.0)
    seed: int = _seed(42)
    save_every_n_steps: int = _non_negative(0)  # 0: checkpoint at each epoch end only
    # Wall-clock budget of the fit (validation included), in minutes; 0: none. Training stops at the
    # first step past it, validates, checkpoints and ends (Lightning's `max_time`).
    max_time_minutes: float = _non_negative(0.0)
    ema: EmaConfig = field(default_factory=EmaConfig)
    early_stopping: EarlyStoppingConfig = field(default_factory=EarlyStoppingConfig)
    monitors: MonitorsConfig = field(default_factory=MonitorsConfig)
    # After training: print the final val AP and best checkpoint, and write summary/ (example image, AP plot).
    summary: bool = True
    # Experiment trackers (Lightning's loggers): csv, tensorboard, mlflow (the mlflow extra), wandb (the
    # wandb extra). Each receives the resolved config, the metrics, the final metrics and the best checkpoint.
    loggers: list[str] = field(default_factory=lambda: ["tensorboard", "csv"],
                               metadata={"choices": ("csv", "tensorboard", "mlflow", "wandb")})
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    # After each validation round: COCOeval's 12-line table (true) or one line of AP, AP50, AP75,
    # APs / APm / APl and AR100 (false).
    coco_table: bool = False


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)


# ------------------------------------------------------------------------------------------ loading
def _valid_keys(node: DictConfig) -> list[str]:
    return [str(k) for k in node.keys()]


def _suggest(key: str, candidates: list[str]) -> str:
    close = difflib.get_close_matches(key, candidates, n=1, cutoff=0.5)
    return f"; did you mean '{close[0]}'?" if close else f"; valid keys: {', '.join(sorted(candidates))}"


def _check_keys(schema: DictConfig, data: Any, where: str, prefix: str = "") -> None:
    """Raise ConfigError for the first key of `data` that the schema does not have."""
    if not isinstance(data, DictConfig):
        return
    for key in data.keys():
        key = str(key)
        dotted = f"{prefix}{key}"
        if key == BASE_KEY and not prefix:
            continue
        if key not in schema:
            # A dict-typed field (lr_multipliers) accepts any key.
            if OmegaConf.get_type(schema) is dict:
                continue
            parent = prefix[:-1] or "the top level"
            raise ConfigError(
                f"{where}: unknown key '{dotted}' under {parent}{_suggest(key, _valid_keys(schema))}"
            )
        child_schema = schema._get_node(key)
        _check_shape(child_schema, data._get_node(key), where, dotted)
        if isinstance(child_schema, DictConfig) and OmegaConf.get_type(child_schema) is not dict:
            _check_keys(child_schema, data._get_node(key), where, f"{dotted}.")


def _shown(node: Any) -> str:
    """A data node as the user wrote it: a plain value, list or mapping."""
    if isinstance(node, (DictConfig, ListConfig)):
        return repr(OmegaConf.to_container(node))
    return repr(node._value() if hasattr(node, "_value") else node)


def _check_shape(schema_node: Any, data_node: Any, where: str, dotted: str) -> None:
    """Raise ConfigError when a value's shape does not fit its key: a single value for a list or a
    section, a list or mapping for a single value. null is left to the merge (optional keys take it)."""
    if data_node is None or (hasattr(data_node, "_is_none") and data_node._is_none()):
        return
    is_list, is_dict = isinstance(data_node, ListConfig), isinstance(data_node, DictConfig)
    if isinstance(schema_node, ListConfig) and not is_list:
        raise ConfigError(f"{where}: '{dotted}' is a list, got {_shown(data_node)} (on the command line: "
                          f"{dotted}=[{_shown(data_node).strip(chr(39))}])")
    if isinstance(schema_node, DictConfig) and not is_dict:
        if OmegaConf.get_type(schema_node) is dict:
            raise ConfigError(f"{where}: '{dotted}' is a mapping of names to values, got {_shown(data_node)}")
        keys = [str(k) for k in schema_node.keys()]
        hint = f"; did you mean '{dotted}.enabled'?" if "enabled" in keys else ""
        raise ConfigError(f"{where}: '{dotted}' is a section (keys {', '.join(keys)}), not a value: got "
                          f"{_shown(data_node)}{hint}")
    if not isinstance(schema_node, (DictConfig, ListConfig)) and (is_list or is_dict):
        kind = "list" if is_list else "mapping"
        raise ConfigError(f"{where}: '{dotted}' takes a single value, not a {kind}: got {_shown(data_node)}")


def _merge(schema: DictConfig, data: DictConfig, where: str) -> DictConfig:
    try:
        data = migrate_config_data(data)
    except LegacyConfigError as err:
        raise ConfigError(f"{where}: {err}") from None
    _check_keys(schema, data, where)
    try:
        return OmegaConf.merge(schema, data)  # type: ignore[return-value]
    except (ValidationError, ConfigKeyError) as err:
        key = getattr(err, "full_key", None) or "?"
        raise ConfigError(f"{where}: invalid value for '{key}': {_conversion_text(str(err))}") from None
    except OmegaConfBaseException as err:
        raise ConfigError(f"{where}: {str(err).splitlines()[0]}") from None


_TYPE_WORDS = {"Float": "a number", "Integer": "an integer", "Boolean": "true or false", "String": "a string"}


def _conversion_text(message: str) -> str:
    """OmegaConf's conversion error as a plain sentence ("'abc' is not a number"); other errors' first
    line as they are."""
    first = message.splitlines()[0]
    match = re.match(r"Value '(.*)' of type '[\w.]+' could not be converted to (\w+)", first)
    if match:
        wanted = _TYPE_WORDS.get(match.group(2), match.group(2).lower())
        return f"{match.group(1)!r} is not {wanted}"
    match = re.match(r"Value '(.*)' is not a valid bool", first)
    if match:
        return f"{match.group(1)!r} is not true or false"
    if re.match(r"field '[\w.]+' is not Optional|Incompatible value 'None'", first):
        return "null is not allowed here"
    return first


def _yaml_error_text(err: Exception) -> str:
    """One line for a YAML parse error: the problem and its 1-based line and column when known."""
    mark = getattr(err, "problem_mark", None) or getattr(err, "context_mark", None)
    problem = getattr(err, "problem", None) or str(err).strip().splitlines()[0]
    if mark is None:
        return str(problem)
    return f"{problem} at line {mark.line + 1}, column {mark.column + 1}"


def _read_yaml(path: Path, chain: tuple[Path, ...] = ()) -> DictConfig:
    """Read `path` with its `_base_` files merged underneath (paths relative to the file)."""
    path = path.resolve()
    if path in chain:
        cycle = " -> ".join(str(p) for p in (*chain, path))
        raise ConfigError(f"_base_ cycle: {cycle}")
    if not path.is_file():
        origin = f" (named in _base_ of {chain[-1]})" if chain else ""
        if path.is_dir():
            raise ConfigError(f"config path is a folder, not a YAML file: {path}{origin}")
        if path.exists():
            raise ConfigError(f"config path is not a regular file: {path}{origin}")
        raise ConfigError(f"config file not found: {path}{origin}")
    try:
        data = OmegaConf.load(path)
    except Exception as err:  # yaml errors come in several types
        raise ConfigError(f"{path}: not valid YAML: {_yaml_error_text(err)}") from None
    if data is None or isinstance(data, ListConfig):
        if data is None:
            data = OmegaConf.create({})
        else:
            raise ConfigError(f"{path}: the top level must be a mapping, not a list")
    bases = data.pop(BASE_KEY, None) if isinstance(data, DictConfig) else None
    if bases is None:
        return data
    if isinstance(bases, str):
        bases = [bases]
    merged = OmegaConf.create({})
    for base in bases:
        if not isinstance(base, str):
            raise ConfigError(f"{path}: '_base_' must be a file path or a list of paths, got {base!r}")
        base_data = _read_yaml(path.parent / base, (*chain, path))
        merged = OmegaConf.merge(merged, base_data)
    return OmegaConf.merge(merged, data)  # type: ignore[return-value]


def _parse_overrides(overrides: list[str]) -> DictConfig:
    items = []
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' must look like key.path=value")
        key, value = item.split("=", 1)
        items.append(f"{key}=null" if value.strip() in NULL_SPELLINGS else item)
    try:
        return OmegaConf.from_dotlist(items)
    except OmegaConfBaseException as err:
        raise ConfigError(f"command-line overrides: {str(err).splitlines()[0]}") from None


def _non_finite(value: Any, suffix: str = "") -> tuple[str, float] | None:
    """(key suffix, value) of the first nan or +-inf in a value, list or mapping; None when all finite."""
    if isinstance(value, float) and not math.isfinite(value):
        return suffix, value
    items = enumerate(value) if isinstance(value, list) else value.items() if isinstance(value, dict) else ()
    for key, item in items:
        found = _non_finite(item, f"{suffix}[{key}]" if isinstance(value, list) else f"{suffix}.{key}")
        if found is not None:
            return found
    return None


def _walk_validate(obj: Any, prefix: str, where: str) -> None:
    for f in fields(obj):
        value = getattr(obj, f.name)
        dotted = f"{prefix}{f.name}"
        if is_dataclass(value):
            _walk_validate(value, f"{dotted}.", where)
            continue
        meta = f.metadata
        bad = _non_finite(value)
        if bad is not None:
            raise ConfigError(f"{where}: '{dotted}{bad[0]}' is {bad[1]!r}; a config's numbers must be finite")
        choices = meta.get("choices")
        choices = choices() if callable(choices) else choices
        # a list field with choices (trainer.loggers): each item is checked
        items = list(value) if isinstance(value, list | tuple) else [value]
        wrong = next((item for item in items if item not in (choices or ())), None)
        if choices is not None and value is not None and wrong is not None:
            options = ", ".join(choices)
            close = difflib.get_close_matches(str(wrong), choices, n=1, cutoff=0.5)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            what = f"contains {wrong!r}" if isinstance(value, list | tuple) else f"is {value!r}"
            raise ConfigError(f"{where}: '{dotted}' {what}; expected one of: {options}{hint}")
        if "min" in meta and value is not None:
            low = meta["min"]
            if value < low or (meta.get("exclusive") and value == low):
                op = ">" if meta.get("exclusive") else ">="
                raise ConfigError(f"{where}: '{dotted}' is {value!r}; it must be {op} {low}")
        if "max" in meta and value is not None and value > meta["max"]:
            raise ConfigError(f"{where}: '{dotted}' is {value!r}; it must be <= {meta['max']}")


def _validate_backbone(b: BackboneConfig, where: str) -> None:
    """Options valid only for one backbone type, ResNet depths, and the two weight sources."""
    for key, types in BACKBONE_KEY_TYPES.items():
        if b.type not in types and getattr(b, key) is not None:
            kinds = f"'model.backbone.type: {types[0]}'" + "".join(f" or '{t}'" for t in types[1:])
            raise ConfigError(
                f"{where}: 'model.backbone.{key}' applies to {kinds} "
                f"only, not '{b.type}' (remove it or set it to null)"
            )
    if b.type == "resnet_vd" and b.pretrained:
        raise ConfigError(
            f"{where}: 'model.backbone.pretrained' is not available for resnet_vd; set "
            "'model.backbone.weights_path' to a local ResNet-vd state dict in the official key layout"
        )
    if b.type == "hgnetv2":
        _validate_hgnetv2(b, where)
    elif b.type in RESNET_TYPES:
        if b.name not in RESNET_NAMES:
            close = difflib.get_close_matches(b.name, RESNET_NAMES, n=1, cutoff=0.5)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise ConfigError(
                f"{where}: 'model.backbone.name' is {b.name!r}; a resnet backbone is one of: "
                f"{', '.join(RESNET_NAMES)}{hint} (timm models: set 'model.backbone.type' to timm or vit)"
            )
        if b.timm_kwargs:
            raise ConfigError(
                f"{where}: 'model.backbone.timm_kwargs' applies to the timm and vit backbone types, "
                f"not {b.type}"
            )
        if b.dilation and b.name in RESNET_NAMES[:2]:
            raise ConfigError(
                f"{where}: 'model.backbone.dilation' (DC5) needs a bottleneck ResNet (resnet50/101), "
                f"not '{b.name}'"
            )
    else:
        import timm  # only configs with timm backbones need it

        if not timm.is_model(b.name):
            close = difflib.get_close_matches(b.name, timm.list_models(), n=1, cutoff=0.6)
            hint = f"; did you mean '{close[0]}'?" if close else " (see timm.list_models())"
            raise ConfigError(f"{where}: 'model.backbone.name' is {b.name!r}, not a timm model{hint}")
    if b.pretrained and b.weights_path is not None:
        raise ConfigError(
            f"{where}: set either 'model.backbone.pretrained' or 'model.backbone.weights_path', not both"
        )


def _validate_hgnetv2(b: BackboneConfig, where: str) -> None:
    """A variant name, local weights only, no timm arguments."""
    if b.name not in HGNETV2_NAMES:
        # the official configs' spelling ('B4') or a near miss
        wanted = f"hgnetv2_{b.name.lower()}" if re.fullmatch(r"[bB]\d", b.name) else b.name
        close = difflib.get_close_matches(wanted, HGNETV2_NAMES, n=1, cutoff=0.6)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise ConfigError(
            f"{where}: 'model.backbone.name' is {b.name!r}; an hgnetv2 backbone is one of: "
            f"{', '.join(HGNETV2_NAMES)}{hint}"
        )
    if b.pretrained:
        raise ConfigError(
            f"{where}: 'model.backbone.pretrained' is not available for hgnetv2; set "
            "'model.backbone.weights_path' to a local PPHGNetV2_B*_stage1.pth or timm HGNetv2 checkpoint"
        )
    if b.timm_kwargs:
        raise ConfigError(
            f"{where}: 'model.backbone.timm_kwargs' applies to the timm and vit backbone types, not hgnetv2"
        )


def _validate_loss_terms(terms: list[str], where: str) -> None:
    """At least one term and no repeats (the names are checked against the term table when the
    criterion is built, `detr_lab.models.criterion.select_terms`)."""
    if not terms:
        raise ConfigError(f"{where}: 'loss.terms' must name at least one loss term")
    for i, term in enumerate(terms):
        if term in terms[:i]:
            raise ConfigError(f"{where}: 'loss.terms[{i}]' repeats {term!r}")


def validate(cfg: Config, where: str = "config") -> Config:
    """Check choices and ranges, and the cross-field rules the schema's types cannot express."""
    _walk_validate(cfg, "", where)
    m = cfg.model
    if m.hidden_dim % m.num_heads:
        raise ConfigError(
            f"{where}: 'model.hidden_dim' ({m.hidden_dim}) must be divisible by "
            f"'model.num_heads' ({m.num_heads})"
        )
    # Multi-scale attention or several levels: Deformable DETR's GroupNorm(32) input projections.
    # (Plain and ACT attention also run over several levels: all levels' tokens, concatenated.)
    multiscale = needs_multiscale_inputs(m.encoder.attention, m.decoder.cross_attention, m.num_feature_levels)
    if multiscale and m.hidden_dim % 32:
        raise ConfigError(
            f"{where}: 'model.hidden_dim' ({m.hidden_dim}) must be divisible by 32: multi-scale attention "
            f"({m.encoder.attention} / {m.decoder.cross_attention}) or 'model.num_feature_levels' > 1 "
            f"({m.num_feature_levels}) use GroupNorm(32) input projections"
        )
    _validate_backbone(m.backbone, where)
    _validate_decoder_options(m, where)
    _validate_query_source(m, where)
    _validate_loss_terms(cfg.loss.terms, where)
    for i, scale in enumerate(cfg.data.augment.train_scales):
        if scale <= 0:
            raise ConfigError(f"{where}: 'data.augment.train_scales[{i}]' is {scale}; sizes must be > 0")
    if not cfg.data.augment.train_scales:
        raise ConfigError(f"{where}: 'data.augment.train_scales' must not be empty")
    for name in ("mean", "std"):
        if len(getattr(cfg.data.augment, name)) != 3:
            raise ConfigError(f"{where}: 'data.augment.{name}' must have 3 values (R, G, B)")
    for i, value in enumerate(cfg.data.augment.std):
        if value == 0:  # e.g. std: [0, 0, 0] meant as "no normalization": it would divide by zero
            raise ConfigError(f"{where}: 'data.augment.std[{i}]' is 0; use 1 for no scaling")
    _validate_rtdetr_augment(cfg.data.augment, where)
    _validate_schedule(cfg.optim, cfg.trainer, where)
    _validate_dense_augment(cfg.data.augment, where)
    devices = str(cfg.trainer.devices).strip()
    if not (devices == "auto" or re.fullmatch(r"\d+|\d+(\s*,\s*\d+)*\s*,?", devices)):
        raise ConfigError(f"{where}: 'trainer.devices' is {cfg.trainer.devices!r}; expected 'auto', a count "
                          "such as '8' or a list such as '0,1'")
    return cfg


def _validate_relative_schedule(optim: OptimConfig, where: str) -> None:
    """Fractions in range, and each part of the schedule given one way only (epochs / steps or fractions)."""
    for i, fraction in enumerate(optim.lr_drop_at):
        if not 0 < fraction < 1:
            raise ConfigError(f"{where}: 'optim.lr_drop_at[{i}]' is {fraction}; give fractions of the run "
                              "between 0 and 1 (0.8: after 80% of the run)")
    if optim.lr_drop_at and optim.lr_drop_epochs:
        raise ConfigError(f"{where}: 'optim.lr_drop_at' ({list(optim.lr_drop_at)}) and "
                          f"'optim.lr_drop_epochs' ({list(optim.lr_drop_epochs)}) both set; "
                          "give the drops one way (set 'optim.lr_drop_epochs: []')")
    if optim.warmup_fraction >= 1:
        raise ConfigError(f"{where}: 'optim.warmup_fraction' is {optim.warmup_fraction}; it must be below 1")
    pairs = (("warmup_fraction", "warmup_steps"), ("flat_fraction", "flat_epochs"),
             ("no_aug_fraction", "no_aug_epochs"))
    for relative, absolute in pairs:
        if getattr(optim, relative) > 0 and getattr(optim, absolute) > 0:
            raise ConfigError(f"{where}: 'optim.{relative}' and 'optim.{absolute}' both set; "
                              "give one of them")
    if optim.flat_fraction + optim.no_aug_fraction > 1:
        raise ConfigError(f"{where}: 'optim.flat_fraction' ({optim.flat_fraction}) + "
                          f"'optim.no_aug_fraction' ({optim.no_aug_fraction}) exceed the run (1)")


def _validate_schedule(optim: OptimConfig, trainer: TrainerConfig, where: str) -> None:
    """The flat-cosine keys set only with `optim.schedule: flat_cosine`, and a tail within the run."""
    _validate_relative_schedule(optim, where)
    if optim.schedule == "flat_cosine" and optim.lr_drop_at:
        raise ConfigError(f"{where}: 'optim.lr_drop_at' applies to 'optim.schedule: multistep' only, not "
                          "'flat_cosine' (remove it)")
    if optim.schedule != "flat_cosine":
        defaults = OptimConfig()
        for key in ("flat_epochs", "no_aug_epochs", "min_lr_ratio", "flat_fraction", "no_aug_fraction"):
            if getattr(optim, key) != getattr(defaults, key):
                raise ConfigError(
                    f"{where}: 'optim.{key}' applies to 'optim.schedule: flat_cosine' only, not "
                    f"'{optim.schedule}' (remove it or set it to {getattr(defaults, key)})"
                )
    elif optim.no_aug_epochs > trainer.max_epochs:
        raise ConfigError(
            f"{where}: 'optim.no_aug_epochs' ({optim.no_aug_epochs}) exceeds 'trainer.max_epochs' "
            f"({trainer.max_epochs})"
        )


def _validate_decoder_options(m: ModelConfig, where: str) -> None:
    """`model.decoder` keys that only some cross-attention variants read (their spec's `decoder_options`)."""
    decoder = m.decoder
    options = ATTENTION_SPECS[decoder.cross_attention].decoder_options
    readers = [name for name, spec in ATTENTION_SPECS.items() if "level_points" in spec.decoder_options]
    for key, unset in (("level_points", None), ("sampling", "default"), ("projections", True)):
        if getattr(decoder, key) != unset and key not in options:
            raise ConfigError(
                f"{where}: 'model.decoder.{key}' is read by the cross-attention {' / '.join(readers)} only, "
                f"not by {decoder.cross_attention!r}; remove it"
            )
    if decoder.eval_layers is not None and decoder.eval_layers > decoder.num_layers:
        raise ConfigError(
            f"{where}: 'model.decoder.eval_layers' ({decoder.eval_layers}) exceeds "
            f"'model.decoder.num_layers' ({decoder.num_layers})"
        )
    dist = m.distribution
    if dist.enabled and (dist.reg_max % 2 or not m.box_refine):
        raise ConfigError(
            f"{where}: 'model.distribution' needs an even 'reg_max' (got {dist.reg_max}) and "
            "'model.box_refine: true'"
        )
    if decoder.level_points is not None:
        points = list(decoder.level_points)
        if len(points) != m.num_feature_levels or any(p < 1 for p in points):
            raise ConfigError(
                f"{where}: 'model.decoder.level_points' is {points}; expected one positive count per "
                f"feature level ({m.num_feature_levels})"
            )


def _validate_rtdetr_augment(aug: AugmentConfig, where: str) -> None:
    """The rtdetr policy's sizes, and `start_epoch` / `stop_epoch` set only where they are read."""
    for i, scale in enumerate(aug.square_scales):
        if scale <= 0:
            raise ConfigError(f"{where}: 'data.augment.square_scales[{i}]' is {scale}; sizes must be > 0")
    for key in ("start_epoch", "stop_epoch"):
        if aug.policy != "rtdetr" and getattr(aug, key) is not None:
            raise ConfigError(
                f"{where}: 'data.augment.{key}' applies to 'data.augment.policy: rtdetr' only, not "
                f"'{aug.policy}' (remove it or set it to null)"
            )
    if aug.start_epoch is not None and aug.stop_epoch is not None and aug.start_epoch >= aug.stop_epoch:
        raise ConfigError(f"{where}: 'data.augment.start_epoch' ({aug.start_epoch}) must be below "
                          f"'data.augment.stop_epoch' ({aug.stop_epoch})")


def _validate_dense_augment(aug: AugmentConfig, where: str) -> None:
    """DEIM's mosaic and mixup: epoch windows, the affine's ranges, mixup's equal image sizes."""
    for name in ("mosaic", "mixup"):
        part = getattr(aug, name)
        if part.stop_epoch is not None and part.stop_epoch <= part.start_epoch:
            raise ConfigError(
                f"{where}: 'data.augment.{name}.stop_epoch' ({part.stop_epoch}) must be above "
                f"'data.augment.{name}.start_epoch' ({part.start_epoch}), or null"
            )
    mosaic = aug.mosaic
    if len(mosaic.translate) != 2 or not all(0 <= value <= 1 for value in mosaic.translate):
        raise ConfigError(f"{where}: 'data.augment.mosaic.translate' is {list(mosaic.translate)}; expected "
                          "[x, y], fractions of the canvas in [0, 1]")
    if len(mosaic.scale) != 2 or not 0 < mosaic.scale[0] <= mosaic.scale[1]:
        raise ConfigError(f"{where}: 'data.augment.mosaic.scale' is {list(mosaic.scale)}; expected "
                          "[min, max] with 0 < min <= max")
    if aug.mixup.prob > 0 and aug.policy != "rtdetr":
        raise ConfigError(
            f"{where}: 'data.augment.mixup.prob' is {aug.mixup.prob}; mixup needs 'data.augment.policy: "
            f"rtdetr' (a batch's images blended pixel by pixel must have one size), not '{aug.policy}'"
        )


def _validate_query_source(m: ModelConfig, where: str) -> None:
    """What the chosen query source (its spec in `QUERY_SOURCES`) asks of the rest of the model."""
    cross = m.decoder.cross_attention
    name = resolved_query_source(m.query_source, ATTENTION_SPECS[cross].reference_points)
    spec = QUERY_SOURCES[name]
    key = f"'model.query_source: {name}'"
    if spec.box_dim == 0 and m.box_refine:
        raise ConfigError(f"{where}: {refinement_error()}, or a query source with reference boxes")
    if spec.reference_attention and not ATTENTION_SPECS[cross].reference_points:
        raise ConfigError(f"{where}: {key} needs a decoder cross-attention with reference points "
                          f"({reference_attention_hint()})")
    if spec.needs_refinement and not m.box_refine:
        raise ConfigError(f"{where}: {key} needs 'model.box_refine: true' (every layer refines the boxes)")
    if spec.proposal_heads and m.share_heads:
        raise ConfigError(f"{where}: {key} needs one head per decoder layer; set 'model.share_heads: false'")
    if m.denoising.enabled and not spec.position_from_boxes:
        raise ConfigError(f"{where}: 'model.denoising.enabled' needs a query source with 4-D anchor boxes "
                          "('model.query_source': learned_anchors or mixed_selection)")
    if m.look_forward_twice and not m.box_refine:
        raise ConfigError(f"{where}: 'model.look_forward_twice' needs 'model.box_refine: true'")
    if spec.position_from_boxes and m.classification != "sigmoid":
        raise ConfigError(f"{where}: {key} needs 'model.classification: sigmoid' (focal loss)")
    if spec.box_dim == 4 and m.hidden_dim % 4:
        raise ConfigError(f"{where}: {key} needs 'model.hidden_dim' divisible by 4")


def config_from_dict(data: dict | DictConfig, where: str = "config") -> Config:
    """Build a validated `Config` from a (possibly partial) nested mapping, e.g. one saved in a checkpoint."""
    schema = OmegaConf.structured(Config)
    merged = _merge(schema, OmegaConf.create(data) if isinstance(data, dict) else data, where)
    return validate(OmegaConf.to_object(merged), where)  # type: ignore[arg-type]


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Load a YAML config (with its `_base_` chain) onto the schema defaults, then apply overrides.

    Args:
        path: YAML file, or None for the schema defaults.
        overrides: dotted `key.path=value` strings, applied last.
    Raises:
        ConfigError: a missing file, an unknown key (with the closest valid key), a wrong type or value.
    """
    merged: DictConfig = OmegaConf.structured(Config)
    if path is not None:
        merged = _merge(merged, _read_yaml(Path(path)), str(path))
    if overrides:
        merged = _merge(merged, _parse_overrides(list(overrides)), "command-line override")
    where = str(path) if path is not None else "config"
    return validate(OmegaConf.to_object(merged), where)  # type: ignore[arg-type]


def config_to_dict(cfg: Config) -> dict:
    """Plain nested dict of `cfg` (for checkpoints and logging)."""
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)  # type: ignore[return-value]


def config_yaml(cfg: Config) -> str:
    """The fully resolved config as YAML text (what `save_config` writes, `--print-config` prints)."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def save_config(cfg: Config, path: str | os.PathLike) -> Path:
    """Write the fully resolved config as YAML atomically (`detr_lab.files`) and return its path.

    Raises:
        FileWriteError: the file cannot be written (the message names the path and the reason).
    """
    return atomic_write_text(path, config_yaml(cfg))
