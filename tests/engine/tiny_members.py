"""A tiny model of each member of the family (DETR, Deformable DETR, DINO, RT-DETR, D-FINE), built from
its demo config, and a few training steps of it through Lightning on `factories.tiny_batch`."""

from __future__ import annotations

from collections.abc import Sequence

import lightning as L
import torch
from torch.utils.data import DataLoader

from detr_lab.config import Config, load_config
from detr_lab.engine.module import DetectionModule
from detr_lab.engine.trainer import build_run_callbacks

from factories import REPO, tiny_batch

SMALL = [
    "model.hidden_dim=32", "model.num_heads=2", "model.ffn_dim=64", "model.num_queries=8",
    "model.decoder.num_layers=2", "trainer.summary=false", "trainer.monitors.stalled_ap_rounds=0",
]
NECK = ["model.neck.options.ffn_dim=64", "model.neck.options.num_heads=2", "model.denoising.dn_number=2"]
MEMBERS = {
    "detr": ("demo_detr.yaml", ["model.encoder.num_layers=1"]),
    "deformable": ("demo_deformable.yaml", ["model.encoder.num_layers=1", "model.encoder.num_points=2"]),
    "dino": ("demo_dino.yaml", ["model.encoder.num_layers=1", "model.denoising.dn_number=2"]),
    "rtdetr": ("demo_rtdetr.yaml", NECK),
    "dfine": ("demo_deim.yaml", NECK),
}


def member_config(member: str, *overrides: str) -> Config:
    config, own = MEMBERS[member]
    return load_config(REPO / "configs" / config, [*SMALL, *own, *overrides])


def member_module(cfg: Config) -> DetectionModule:
    torch.manual_seed(0)
    classes = cfg.model.num_classes
    return DetectionModule(cfg, list(range(1, classes + 1)), [str(i) for i in range(classes)])


def fit_steps(
    module: DetectionModule, steps: int, callbacks: Sequence[L.Callback] = (), precision: str = "32"
) -> L.Trainer:
    """`steps` optimizer steps on copies of `tiny_batch()`, with the run callbacks of the module's config
    (health checks, query usage) and gradient clipping; no logger, checkpoint or validation."""
    trainer = L.Trainer(
        accelerator="cpu", devices=1, max_epochs=1, max_steps=steps, limit_val_batches=0, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        gradient_clip_val=0.1, precision=precision, callbacks=[*build_run_callbacks(module.cfg), *callbacks],
    )
    batch = tiny_batch()
    trainer.fit(module, train_dataloaders=DataLoader([batch] * steps, batch_size=None))
    return trainer
