"""DEIM's training parts on members other than D-FINE: DINO and RT-DETR each train steps through the
trainer with Dense O2O (mosaic and mixup on every sample from epoch 0) and MAL in place of their own
classification loss, and the logged losses are MAL's."""

from __future__ import annotations

import csv

import pytest
import torch

from detr_lab.config import load_config
from detr_lab.engine.trainer import train

from factories import REPO, synthetic_data_yaml

pytestmark = pytest.mark.slow  # two short training runs

AUGMENT = (
    "{{policy: rtdetr, square_size: 128, square_scales: [], stop_epoch: 2, mean: [0, 0, 0], "
    "std: [1, 1, 1], mosaic: {{prob: 1.0, output_size: 64}}, mixup: {{prob: 1.0}}}}"
)
RUN_YAML = (
    "_base_: {base}\n"
    + synthetic_data_yaml(6, 2, augment=AUGMENT)
    + """
model:
  hidden_dim: 32
  num_heads: 2
  ffn_dim: 64
  num_queries: 8
  decoder: {{num_layers: 2}}
  denoising: {{dn_number: 4}}
loss:
  terms: [mal, boxes]
  term_options: {{mal: {{gamma: 1.5}}}}
trainer:
  output_dir: {root}/run
  accelerator: cpu
  devices: "1"
  precision: "32"
  strategy: auto
  max_epochs: 1
  max_steps: 2
  log_every_n_steps: 1
  seed: 0
  max_time_minutes: 0
"""
)
EXTRA = {"demo_dino.yaml": "", "demo_rtdetr.yaml": "  neck: {{options: {{ffn_dim: 64}}}}\n"}


@pytest.mark.parametrize("base", sorted(EXTRA))
def test_dense_o2o_and_mal_train_dino_and_rtdetr(base, tmp_path):
    text = RUN_YAML.format(root=tmp_path, base=REPO / "configs" / base)
    marker = "  denoising: {dn_number: 4}\n"
    text = text.replace(marker, marker + EXTRA[base].format())
    config = tmp_path / "run.yaml"
    config.write_text(text)
    cfg = load_config(config)
    assert cfg.data.augment.mosaic.prob == 1.0 and cfg.data.augment.mixup.prob == 1.0
    torch.manual_seed(0)
    trainer = train(cfg, progress_bar=False)
    assert trainer.global_step == 2
    (metrics,) = (tmp_path / "run" / "csv").glob("version_*/metrics.csv")
    rows = list(csv.DictReader(metrics.open()))
    logged = {key for row in rows for key, value in row.items() if value}
    assert any(key.startswith("train/loss_mal") for key in logged), sorted(logged)
    assert not any(key.startswith(("train/loss_vfl", "train/loss_ce")) for key in logged)
