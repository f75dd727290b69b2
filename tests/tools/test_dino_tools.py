"""DINO end to end on a tiny synthetic set: train (denoising through the training engine) -> eval ->
infer, and an official DINO checkpoint converted by the tool, then fine-tuned (--init-from) and
run by infer."""

import json
from pathlib import Path

import pytest
import torch

from detr_lab.config import load_config
from detr_lab.engine.evaluate import evaluate_checkpoint
from detr_lab.engine.trainer import train

from factories import load_module, load_tool, synthetic_data_yaml

pytestmark = pytest.mark.slow  # Lightning end to end: train, eval, infer, fine-tune

REPO = Path(__file__).resolve().parents[2]


quick_state = load_module(REPO / "tests" / "test_checkpoints_dino.py", "dino_tools_checkpoint_specs")
quick_state = quick_state.quick_state

TINY_DINO_YAML = """
model:
  num_classes: {classes}
  hidden_dim: 32
  num_heads: 4
  ffn_dim: 64
  dropout: 0.0
  num_queries: 5
  num_feature_levels: 4
  classification: sigmoid
  box_refine: true
  query_source: mixed_selection
  look_forward_twice: true
  share_heads: true
  position_temperature: 20.0
  denoising: {{enabled: true, dn_number: 100}}
  backbone: {{name: resnet18, pretrained: false, frozen_stages: 0}}
  encoder: {{num_layers: 1, attention: deformable}}
  decoder: {{num_layers: 2, cross_attention: deformable}}
""" + synthetic_data_yaml(4, 2) + """
optim: {{lr: 1.0e-4, lr_backbone: 1.0e-5, lr_drop_epochs: [1], lr_multipliers: {{sampling_offsets: 0.1}}}}
trainer:
  output_dir: {root}/run
  accelerator: cpu
  devices: "1"
  max_epochs: 1
  max_steps: 2
  log_every_n_steps: 1
  save_every_n_steps: 1
  seed: 0
"""


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_dino")
    config_path = root / "tiny_dino.yaml"
    config_path.write_text(TINY_DINO_YAML.format(root=root, classes=6))
    torch.manual_seed(0)
    trainer = train(load_config(config_path), progress_bar=False)
    return {
        "root": root,
        "config": config_path,
        "trainer": trainer,
        "last": root / "run" / "checkpoints" / "last.ckpt",
    }


def test_training_logs_denoising_losses(trained):
    logged = trained["trainer"].logged_metrics
    assert trained["trainer"].global_step == 2 and trained["last"].is_file()
    assert any("loss_bbox_dn" in name for name in logged), sorted(logged)[:20]


def test_eval_and_infer_run_on_the_trained_checkpoint(trained, tmp_path):
    result = evaluate_checkpoint(
        trained["config"], trained["last"], output=tmp_path / "dino.json", device="cpu", progress=False
    )
    assert result.num_images == 2 and 0.0 <= result.stats["AP"] <= 1.0
    detections = json.loads(result.results_path.read_text())
    assert len(detections) == 2 * 5 * 6  # 30 (query, class) pairs per image, fewer than num_detections
    out = tmp_path / "infer"
    images = trained["root"] / "data" / "val2017"
    args = [
        str(images),
        "--checkpoint",
        str(trained["last"]),
        "--output-dir",
        str(out),
        "--score-threshold",
        "0",
    ]
    code = load_tool("infer").main(args)
    assert code == 0
    assert len(json.loads((out / "detections.json").read_text())["images"]) == 2


def test_converted_official_checkpoint_fine_tunes_and_infers(trained, tmp_path):
    state = quick_state(backbone="resnet18", hidden=32, heads=4, classes=6, queries=5, decoder_layers=2)
    source = tmp_path / "official_dino.pth"
    torch.save({"model": state}, source)
    converted = tmp_path / "converted.pt"
    assert load_tool("convert_checkpoint").main([str(source), str(converted), "--num-heads", "4"]) == 0
    config = tmp_path / "finetune.yaml"
    config.write_text(TINY_DINO_YAML.format(root=tmp_path, classes=6).replace("max_steps: 2", "max_steps: 1"))
    torch.manual_seed(0)
    trainer = train(load_config(config), init_from=str(converted), progress_bar=False)
    assert trainer.global_step == 1
    out = tmp_path / "infer"
    images = trained["root"] / "data" / "val2017"
    assert (
        load_tool("infer").main([str(images), "--checkpoint", str(converted), "--output-dir", str(out)]) == 0
    )
