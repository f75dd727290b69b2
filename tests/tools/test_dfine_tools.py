"""An official D-FINE-N checkpoint (the weights of the shared fixture, saved the way the official trainer
saves them, with the EMA weights under `ema.module`) through the tools: converted, run by infer, exported
with --verify, fine-tuned on another class count (--init-from) and evaluated; a DEIM checkpoint (the
same key layout) converted with --recipe deim."""

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from detr_lab.checkpoints import load_checkpoint
from detr_lab.config import load_config
from detr_lab.engine.evaluate import evaluate_checkpoint
from detr_lab.engine.trainer import train

from factories import FIXTURES, load_tool, rtdetr_fixture_state, synthetic_data_yaml

pytestmark = pytest.mark.slow  # converts a D-FINE-N and runs the tools on it

REPO = Path(__file__).resolve().parents[2]

# D-FINE-N reads strides 16 and 32: 320 x 320 pixels give 500 encoder tokens for its 300 queries.
AUGMENT = "{{policy: rtdetr, square_size: 320, square_scales: [], stop_epoch: 1}}"
FINETUNE_YAML = (
    "_base_: {base}\n"
    + synthetic_data_yaml(4, 2, augment=AUGMENT)
    + """
model:
  num_classes: 6
  denoising: {{enabled: true, dn_number: 3}}
optim: {{lr: 1.0e-4, lr_backbone: 1.0e-5, warmup_steps: 0}}
trainer:
  output_dir: {root}/run
  accelerator: cpu
  devices: "1"
  precision: "32"
  strategy: auto
  max_epochs: 1
  max_steps: 1
  log_every_n_steps: 1
  seed: 0
  ema: {{enabled: false}}
"""
)


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    root = tmp_path_factory.mktemp("dfine_tools")
    fixture = torch.load(FIXTURES / "dfine_n.pt", weights_only=True)
    source = root / "dfine_n_official.pth"
    torch.save({"ema": {"module": rtdetr_fixture_state(fixture), "updates": 1}, "last_epoch": 159}, source)
    destination = root / "dfine_n.pt"
    assert load_tool("convert_checkpoint").main([str(source), str(destination)]) == 0
    images = root / "images"
    images.mkdir()
    for index, image in enumerate(fixture["images_uint8"]):
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(images / f"image_{index}.png")
    return {"root": root, "source": source, "checkpoint": destination, "images": images}


def test_the_converted_checkpoint_is_d_fine_n_with_coco_categories(converted):
    loaded = load_checkpoint(converted["checkpoint"])
    m = loaded.config.model
    assert (m.backbone.type, m.backbone.name, m.neck.type) == (
        "hgnetv2",
        "hgnetv2_b0",
        "dfine_hybrid_encoder",
    )
    assert m.distribution.enabled and m.decoder.activation == "relu" and loaded.config.loss.terms[0] == "vfl"
    assert loaded.category_ids[:3] == [1, 2, 3] and loaded.class_names[0] == "person"
    assert (loaded.config.data.augment.policy, loaded.config.data.augment.square_size) == ("rtdetr", 640)


def test_convert_takes_the_deim_recipe(converted, tmp_path):
    destination = tmp_path / "deim.pt"
    args = [str(converted["source"]), str(destination), "--recipe", "deim"]
    assert load_tool("convert_checkpoint").main(args) == 0
    config = load_checkpoint(destination).config
    assert (config.model.decoder.activation, config.model.mlp_activation) == ("silu", "silu")
    assert config.loss.terms[0] == "mal" and config.loss.term_options["mal"]["gamma"] == 1.5


def test_infer_runs_on_the_converted_checkpoint(converted, tmp_path):
    out = tmp_path / "infer"
    args = [str(converted["images"]), "--checkpoint", str(converted["checkpoint"]), "--output-dir", str(out),
            "--score-threshold", "0"]  # fmt: skip
    assert load_tool("infer").main(args) == 0
    detections = json.loads((out / "detections.json").read_text())
    assert len(detections["images"]) == 2


def test_export_verifies_against_pytorch(converted, tmp_path):
    args = ["--checkpoint", str(converted["checkpoint"]), "--output", str(tmp_path / "dfine.onnx"),
            "--height", "256", "--width", "320", "--verify", "--verify-batches", "1"]  # fmt: skip
    assert load_tool("export").main(args) == 0


def test_fine_tunes_on_another_class_count_and_evaluates(converted, tmp_path):
    config = tmp_path / "finetune.yaml"
    config.write_text(FINETUNE_YAML.format(root=tmp_path, base=REPO / "configs" / "dfine_n.yaml"))
    torch.manual_seed(0)
    trainer = train(load_config(config), init_from=str(converted["checkpoint"]), progress_bar=False)
    assert trainer.global_step == 1
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    result = evaluate_checkpoint(config, last, output=tmp_path / "eval.json", device="cpu", progress=False)
    assert result.num_images == 2 and 0.0 <= result.stats["AP"] <= 1.0
