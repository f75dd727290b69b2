"""MTKD in the training system: an ACT student distilled from a frozen plain-attention teacher.

With a tiny bucket width ACT is exact attention, so a student initialised from the teacher predicts
exactly what the teacher does and every distillation term vanishes; with wide buckets the terms are
positive, and their gradients reach the student only.
"""

import pytest
import torch

from detr_lab.checkpoints import load_checkpoint, save_checkpoint
from detr_lab.config import ConfigError, load_config
from detr_lab.engine.distill import Distiller
from detr_lab.engine.module import DetectionModule
from detr_lab.engine.trainer import train
from detr_lab.models.attention.clustering import AdaptiveClusteringAttention
from detr_lab.models.build import build_model

from factories import tiny_overrides

TINY = tiny_overrides(
    num_classes=6, num_heads=2, num_queries=5, dropout=0.0, backbone__frozen_stages=0
)
IDS = [1, 2, 3, 5, 8, 13]
NAMES = ["circle", "square", "triangle", "star", "ring", "cross"]
TERMS = ("loss_feat", "loss_kd_ce", "loss_kd_bbox", "loss_kd_giou")


@pytest.fixture(scope="module")
def teacher_path(tmp_path_factory):
    torch.manual_seed(0)
    cfg = load_config(overrides=TINY)
    path = tmp_path_factory.mktemp("teacher") / "teacher.pt"
    save_checkpoint(path, build_model(cfg.model), cfg, IDS, NAMES)
    return path


def student_config(teacher_path, bucket_width, *extra):
    return load_config(overrides=[
        *TINY, "model.encoder.attention=act", f"model.encoder.act.bucket_width={bucket_width}",
        "distill.enabled=true", f"distill.teacher_checkpoint={teacher_path}",
        "optim.lr_backbone=0",  # a frozen backbone keeps the tests fast
        *extra,
    ])  # fmt: skip


def batch():
    torch.manual_seed(1)
    images = torch.randn(2, 3, 96, 128)
    padding_mask = torch.zeros(2, 96, 128, dtype=torch.bool)
    padding_mask[1, 64:] = True  # 3 x 4 tokens, 2 x 3 of them real in the second image
    padding_mask[1, :, 96:] = True
    return images, padding_mask


def distill_losses(module, images, padding_mask):
    outputs = module.model(images, padding_mask, return_memory=True)
    return module.distiller(outputs, images, padding_mask)


def test_distillation_vanishes_when_act_is_exact(teacher_path):
    module = DetectionModule(student_config(teacher_path, 1e-6), IDS, NAMES).train()
    assert isinstance(module.distiller, Distiller)
    teacher = module.distiller.teacher
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    # The student starts from the teacher's weights (ACT adds no parameters).
    for name, tensor in teacher.state_dict().items():
        assert torch.equal(module.model.state_dict()[name], tensor), name
    losses = distill_losses(module, *batch())
    assert set(losses) == {*TERMS, *(f"{t}_0" for t in TERMS[1:])}  # the auxiliary layer too
    for name, value in losses.items():
        assert abs(value.item()) < 1e-6, (name, value.item())


def test_distillation_is_positive_and_trains_the_student_only(teacher_path):
    module = DetectionModule(student_config(teacher_path, 1e4), IDS, NAMES).train()
    teacher = module.distiller.teacher
    losses = distill_losses(module, *batch())
    for name in TERMS:
        assert losses[name].item() > 1e-6, name
    module.distiller.total_loss(losses).backward()
    query_weight = module.model.transformer.encoder.layers[0].self_attn.q_proj.weight
    assert isinstance(module.model.transformer.encoder.layers[0].self_attn, AdaptiveClusteringAttention)
    assert query_weight.grad is not None and query_weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in teacher.parameters())
    # The teacher is no part of the module: not saved, not optimized.
    assert len(module.state_dict()) == len(module.model.state_dict())
    groups = module.configure_optimizers()["optimizer"].param_groups
    optimized = {id(p) for group in groups for p in group["params"]}
    assert not optimized & {id(p) for p in teacher.parameters()}


def test_teacher_must_fit_the_student(teacher_path):
    with pytest.raises(ConfigError, match="model.num_queries"):
        DetectionModule(student_config(teacher_path, 1.0, "model.num_queries=7"), IDS, NAMES)
    cfg = load_config(overrides=[*TINY, "distill.enabled=true"])
    with pytest.raises(ConfigError, match="distill.teacher_checkpoint"):
        DetectionModule(cfg, IDS, NAMES)


@pytest.mark.slow  # Lightning end to end
def test_short_training_run_with_distillation(teacher_path, tmp_path):
    data = [
        "data.dataset=synthetic", f"data.root={tmp_path / 'data'}", "data.batch_size=2", "data.num_workers=0",
        "data.synthetic.num_train=4", "data.synthetic.num_val=2", "data.synthetic.image_size=64",
        "data.augment.train_scales=[64]", "data.augment.max_size=96", "data.augment.crop_prob=0.0",
        "data.augment.eval_size=64", "data.augment.eval_max_size=96",
        f"trainer.output_dir={tmp_path / 'run'}", "trainer.accelerator=cpu", "trainer.devices=1",
        "trainer.max_epochs=1", "trainer.max_steps=2", "trainer.log_every_n_steps=1",
        "trainer.check_val_every_n_epoch=5", "optim.lr_drop_epochs=[5]",
    ]  # fmt: skip
    cfg = student_config(teacher_path, 0.5, "model.encoder.act.q_hashes=8", *data)
    trainer = train(cfg, progress_bar=False)
    assert trainer.global_step == 2
    metrics = trainer.callback_metrics
    for name in (*TERMS, "loss_kd_bbox_0", "loss"):
        assert torch.isfinite(metrics[f"train/{name}_epoch"]), name
    checkpoint = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    assert not any("teacher" in key or "distill" in key for key in checkpoint["state_dict"])
    loaded = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.ckpt")
    assert loaded.config.model.encoder.attention == "act" and loaded.config.distill.enabled
