"""An official RT-DETRv2-R18 checkpoint (the weights of the shared fixture, saved the way the official
trainer saves them, with the EMA weights under `ema.module`) through the tools: converted, run by
infer, exported with --verify, fine-tuned on another class count (--init-from) and evaluated."""

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from detr_lab.checkpoints import load_checkpoint
from detr_lab.config import load_config
from detr_lab.engine.evaluate import evaluate_checkpoint
from detr_lab.engine.trainer import train

from factories import FIXTURES, load_synth_weights, load_tool, synthetic_data_yaml

pytestmark = pytest.mark.slow  # converts a full-size R18 model and runs the tools on it

REPO = Path(__file__).resolve().parents[2]

# The official R18 architecture at 160 x 160 pixels (525 encoder tokens for 300 queries), 6 classes:
# what --init-from fine-tunes.
AUGMENT = "{{policy: rtdetr, square_size: 160, square_scales: [], stop_epoch: 1}}"
FINETUNE_YAML = (
    "_base_: {base}\n"
    + synthetic_data_yaml(4, 2, augment=AUGMENT)
    + """
model:
  num_classes: 6
  denoising: {{enabled: true, dn_number: 3}}
optim: {{lr: 1.0e-4, lr_backbone: 1.0e-5}}
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
    root = tmp_path_factory.mktemp("rtdetr_tools")
    fixture = torch.load(FIXTURES / "rtdetrv2_r18vd.pt", weights_only=True)
    state = load_synth_weights().synth_state_dict(dict(fixture["state_dict_spec"]), fixture["weights_seed"])
    state.update(fixture["state_dict_overrides"])
    source = root / "rtdetrv2_r18vd_official.pth"
    torch.save({"ema": {"module": state, "updates": 1}, "last_epoch": 119}, source)
    destination = root / "rtdetrv2_r18vd.pt"
    assert load_tool("convert_checkpoint").main([str(source), str(destination)]) == 0
    images = root / "images"
    images.mkdir()
    for index, image in enumerate(fixture["images_uint8"]):
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(images / f"image_{index}.png")
    return {"root": root, "checkpoint": destination, "images": images}


def test_the_converted_checkpoint_names_the_coco_categories(converted):
    loaded = load_checkpoint(converted["checkpoint"])
    assert loaded.config.model.query_source == "iou_aware" and loaded.config.model.num_classes == 80
    assert loaded.category_ids[:5] == [1, 2, 3, 4, 5] and loaded.category_ids[-1] == 90
    assert loaded.class_names[0] == "person" and loaded.class_names[-1] == "toothbrush"
    # the official inputs: 640 x 640 squares in [0, 1], so infer, eval and export feed those
    augment = loaded.config.data.augment
    assert (augment.policy, augment.square_size) == ("rtdetr", 640)
    assert (augment.mean, augment.std) == ([0.0] * 3, [1.0] * 3)
    from detr_lab.export.from_checkpoint import traced_size

    assert traced_size(loaded.config, None, None) == (640, 640)
    assert traced_size(loaded.config, 320, None) == (320, 640)


def test_convert_takes_the_sampling_method_and_evaluation_layers(converted, tmp_path):
    fixture = torch.load(FIXTURES / "rtdetrv2_r18vd.pt", weights_only=True)
    state = load_synth_weights().synth_state_dict(dict(fixture["state_dict_spec"]), fixture["weights_seed"])
    state.update(fixture["state_dict_overrides"])
    source = tmp_path / "official.pth"
    torch.save({"model": state}, source)
    destination = tmp_path / "dsp.pt"
    args = [str(source), str(destination), "--sampling", "discrete", "--eval-layers", "2"]
    assert load_tool("convert_checkpoint").main(args) == 0
    decoder = load_checkpoint(destination).config.model.decoder
    assert (decoder.sampling, decoder.eval_layers) == ("discrete", 2)


def test_infer_runs_on_the_converted_checkpoint(converted, tmp_path):
    out = tmp_path / "infer"
    args = [str(converted["images"]), "--checkpoint", str(converted["checkpoint"]), "--output-dir", str(out),
            "--score-threshold", "0"]  # fmt: skip
    assert load_tool("infer").main(args) == 0
    detections = json.loads((out / "detections.json").read_text())
    assert len(detections["images"]) == 2


def test_export_verifies_against_pytorch(converted, tmp_path):
    args = ["--checkpoint", str(converted["checkpoint"]), "--output", str(tmp_path / "rtdetr.onnx"),
            "--height", "320", "--width", "320", "--verify", "--verify-batches", "1"]  # fmt: skip
    assert load_tool("export").main(args) == 0


def test_fine_tunes_on_another_class_count_and_evaluates(converted, tmp_path):
    config = tmp_path / "finetune.yaml"
    base = REPO / "configs" / "rtdetrv2_r18vd.yaml"
    config.write_text(FINETUNE_YAML.format(root=tmp_path, base=base))
    torch.manual_seed(0)
    trainer = train(load_config(config), init_from=str(converted["checkpoint"]), progress_bar=False)
    assert trainer.global_step == 1
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    result = evaluate_checkpoint(config, last, output=tmp_path / "eval.json", device="cpu", progress=False)
    assert result.num_images == 2 and 0.0 <= result.stats["AP"] <= 1.0


def test_export_verifies_at_one_thread(converted, tmp_path, capsys):
    # One torch thread rounds the encoder scores otherwise than onnxruntime's threads: near-tied
    # proposals may leave the top-k in another order (on an AVX-512 Xeon two rows swap), which the proof
    # pairs back (torch's thread count is restored after the test by conftest).
    torch.set_num_threads(1)
    args = ["--checkpoint", str(converted["checkpoint"]), "--output", str(tmp_path / "rtdetr.onnx"),
            "--height", "320", "--width", "320", "--verify", "--verify-batches", "1"]  # fmt: skip
    assert load_tool("export").main(args) == 0
    assert "verify PASSED" in capsys.readouterr().out
