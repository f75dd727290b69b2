"""Denoising under DistributedDataParallel (gloo, 2 CPU processes): a process whose batch has no
objects runs the same graph as one with objects, so gradients reduce without a hang or an
unused-parameter error, and both processes end with the same weights."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from detr_lab.config import load_config
from detr_lab.models.build import build_criterion, build_model

from factories import tiny_overrides

OVERRIDES = tiny_overrides(
    "model.num_feature_levels=2", "model.encoder.attention=deformable",
    "model.decoder.cross_attention=deformable",
    "model.query_source=mixed_selection", "model.box_refine=true", "model.share_heads=true",
    "model.look_forward_twice=true", "model.denoising.enabled=true",
    dropout=0.0, encoder__num_points=2, decoder__num_points=2, backbone__frozen_stages=4, num_classes=5,
    classification="sigmoid",
)  # fmt: skip


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        cfg = load_config(overrides=OVERRIDES)
        torch.manual_seed(0)
        model = build_model(cfg.model).train()
        criterion = build_criterion(cfg.model, cfg.loss)
        ddp = torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=False)
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01)
        torch.manual_seed(rank)
        images = torch.randn(2, 3, 64, 64)
        padding_mask = torch.zeros(2, 64, 64, dtype=torch.bool)
        if rank == 0:
            boxes = torch.tensor([[0.5, 0.5, 0.2, 0.3], [0.3, 0.6, 0.1, 0.2]])
            targets = [
                {"labels": torch.tensor([1, 4]), "boxes": boxes},
                {"labels": torch.tensor([0]), "boxes": boxes[:1]},
            ]
        else:  # this process has no object at all
            targets = [{"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)}] * 2
        for _ in range(2):
            outputs = ddp(images, padding_mask, targets=targets)
            losses = criterion(outputs, targets)
            optimizer.zero_grad()
            criterion.total_loss(losses).backward()
            optimizer.step()
        checksum = sum(p.detach().double().sum().item() for p in model.parameters())
        results[rank] = (checksum, "dn_outputs" in outputs)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # two spawned processes: ~15 s of CPU
@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not built in")
def test_a_process_without_objects_trains_in_step_with_the_others():
    with mp.Manager() as manager:
        results = manager.dict()
        mp.start_processes(_worker, args=(_free_port(), results), nprocs=2, join=True, start_method="spawn")
        (sum0, dn0), (sum1, dn1) = results[0], results[1]
    assert dn0 and not dn1  # only the process with objects made denoising queries
    assert sum0 == pytest.approx(sum1, rel=1e-6)  # gradients were averaged over both
