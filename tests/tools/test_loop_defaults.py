"""One set of defaults and a quiet console: the shared score threshold and device, `--print-config`,
`infer.py --no-images` and its progress, the synthetic set's progress, the console filters, one line per
validation round, `train(config, overrides)`, and `convert_dataset.py`'s training config."""

from __future__ import annotations

import inspect
import json
import logging
import math
import warnings

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from detr_lab.checkpoints import save_checkpoint
from detr_lab.config import Config, load_config
from detr_lab.data.datamodule import DetectionDataModule
from detr_lab.data.synthetic import generate_synthetic_dataset
from detr_lab.engine.console import DropNoise, quiet_console, warning_line
from detr_lab.engine.detect import DEFAULT_DEVICE, DEFAULT_SCORE_THRESHOLD
from detr_lab.engine.module import validation_line
from detr_lab.engine.summary import RunSummary
from detr_lab.engine.trainer import train
from detr_lab.models.build import build_model
from detr_lab.predict import Predictor
from detr_lab.predict.infer import run_inference
from detr_lab.predict.pictures import validation_predictions

from factories import REPO, TINY_RUN_YAML, load_tool, tiny_overrides


def _logit(p: float) -> float:
    return math.log(p / (1 - p))


class ThreeScores(torch.nn.Module):
    """Three detections (softmax over one class and no-object) scoring 0.9, 0.31 and 0.29."""

    def forward(self, images, padding_mask):
        logits = torch.tensor([[[_logit(0.9), 0.0], [_logit(0.31), 0.0], [_logit(0.29), 0.0]]])
        return {"pred_logits": logits.repeat(images.shape[0], 1, 1),
                "pred_boxes": torch.full((images.shape[0], 3, 4), 0.5)}


def test_one_default_score_threshold_everywhere():
    assert DEFAULT_SCORE_THRESHOLD == 0.3 and DEFAULT_DEVICE == "auto"
    predictor = Predictor(ThreeScores(), Config(), [7], ["thing"], torch.device("cpu"), optimize=False)
    image = np.zeros((32, 32, 3), np.uint8)
    assert predictor.predict(image)[0]["scores"].tolist() == pytest.approx([0.9, 0.31])
    assert len(predictor.predict(image, score_threshold=0.0)[0]["scores"]) == 3
    for function in (run_inference, validation_predictions, RunSummary.__init__):
        assert inspect.signature(function).parameters["score_threshold"].default == 0.3, function
    for function in (run_inference, validation_predictions, Predictor.from_checkpoint):
        assert inspect.signature(function).parameters["device"].default == "auto", function


@pytest.mark.parametrize("tool, argv", [
    ("infer", ["a.jpg", "--checkpoint", "c.ckpt"]),
    ("visualize", ["attention", "--checkpoint", "c.ckpt", "--image", "a.jpg", "--out", "a.png"]),
    ("eval", ["--config", "x.yaml", "--checkpoint", "c.ckpt"]),
])
def test_tools_default_to_the_auto_device(tool, argv):
    assert load_tool(tool).parse_args(argv).device == "auto"


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("loop_defaults")
    cfg = load_config(None, tiny_overrides(num_classes=2, num_heads=2, num_queries=4))
    torch.manual_seed(0)
    path = save_checkpoint(root / "tiny.ckpt", build_model(cfg.model).eval(), cfg, [1, 2], ["a", "b"])
    images = root / "images"
    images.mkdir()
    for index in range(3):
        Image.fromarray(np.full((40, 48, 3), 60 * index, np.uint8)).save(images / f"i{index}.png")
    return path, images


def test_infer_no_images_writes_json_only_with_the_default_threshold(tiny_checkpoint, tmp_path, capsys):
    checkpoint, images = tiny_checkpoint
    out = tmp_path / "out"
    code = load_tool("infer").main([str(images), "--checkpoint", str(checkpoint), "--output-dir", str(out),
                                    "--no-images", "--device", "cpu"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert sorted(p.name for p in out.iterdir()) == ["detections.json"]
    data = json.loads((out / "detections.json").read_text())
    assert data["score_threshold"] == 0.3 and len(data["images"]) == 3
    assert all(entry["annotated"] is None for entry in data["images"])
    assert all(d["score"] >= 0.3 for entry in data["images"] for d in entry["detections"])
    assert captured.err == ""  # not a terminal: no bar, so errors stay one line
    run_inference([images], checkpoint, output_dir=tmp_path / "bar", device="cpu", draw=False, progress=True)
    assert "3/3" in capsys.readouterr().err  # the progress bar's count


def test_synthetic_set_generation_shows_a_count(tmp_path, capsys):
    generate_synthetic_dataset(tmp_path / "set", num_train=3, num_val=2, image_size=64, progress=True)
    err = capsys.readouterr().err
    assert "generating synthetic train" in err and "3/3" in err and "2/2" in err
    generate_synthetic_dataset(tmp_path / "quiet", num_train=3, num_val=2, image_size=64)
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("tool, argv", [
    ("train", []), ("eval", []), ("doctor", []), ("export", []), ("infer", ["a.jpg"]),
    ("visualize", []), ("benchmark", []),
])
def test_print_config_on_every_tool_that_takes_one(tool, argv, tmp_path, capsys):
    code = load_tool(tool).main([*argv, "--config", "configs/demo.yaml", "--set", "optim.lr=3e-4",
                                 "--print-config"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    printed = yaml.safe_load(captured.out.split("\n", 1)[1] if tool == "benchmark" else captured.out)
    assert printed["optim"]["lr"] == 3e-4 and printed["optim"]["lr_drop_at"] == [0.8]
    assert printed["trainer"]["output_dir"] == "runs/demo"


def test_print_config_names_a_bad_override(capsys):
    argv = ["--config", "configs/demo.yaml", "--set", "optim.lrr=1", "--print-config"]
    assert load_tool("train").main(argv) == 2
    assert "optim.lrr" in capsys.readouterr().err


def test_console_filters_drop_banner_and_tips_only():
    quiet_console()
    quiet_console()  # idempotent
    logger = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    assert sum(isinstance(f, DropNoise) for f in logger.filters) == 1
    noise = DropNoise()

    def record(message):
        return logging.LogRecord("x", logging.INFO, "f.py", 1, message, None, None)

    assert not noise.filter(record("GPU available: False, used: False"))
    assert not noise.filter(record("\N{ELECTRIC LIGHT BULB} Tip: For seamless cloud logging, try x"))
    assert noise.filter(record("config written to runs/x/config.yaml"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        quiet_console()
        warnings.warn("`isinstance(treespec, LeafSpec)` is deprecated, use y", FutureWarning, stacklevel=1)
        warnings.warn("kept", UserWarning, stacklevel=1)
    assert [str(w.message) for w in caught] == ["kept"]
    line = warning_line("3 images have more objects than queries", UserWarning, "/a/b/health.py", 360, "x")
    assert line == "UserWarning: 3 images have more objects than queries\n"


def test_validation_line_is_one_line():
    stats = {"AP": 0.5, "AP50": 0.75, "AP75": 0.5, "APs": 0.25, "APm": 0.5, "APl": -1.0, "AR100": 0.625}
    line = validation_line(3, 120, stats)
    assert "\n" not in line
    assert line == ("validation, epoch 3, step 120: AP 0.5000  AP50 0.7500  AP75 0.5000  "
                    "APs/m/l 0.250/0.500/-1.000  AR100 0.6250")


@pytest.mark.slow
def test_python_training_call_takes_a_path_and_overrides(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    config_path = tmp_path / "tiny.yaml"
    config_path.write_text(TINY_RUN_YAML.format(root=tmp_path))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = train(config_path, ["trainer.max_steps=2", "trainer.max_epochs=1", "trainer.summary=false",
                                      "trainer.save_every_n_steps=0"], progress_bar=False)
    assert trainer.global_step == 2
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["trainer"]["max_steps"] == 2
    logged = caplog.text  # Lightning's rank_zero_info and ours go through logging
    for noise in ("GPU available", "TPU available", "Tip:", "Average Precision", "Seed set"):
        assert noise not in logged, noise
    assert "validation, epoch 0, step 2: AP " in logged and "model: " in logged


def _yolo_set(root):
    for split, names in (("train", ("a", "b")), ("val", ("c",))):
        (root / "images" / split).mkdir(parents=True)
        (root / "labels" / split).mkdir(parents=True)
        for name in names:
            Image.new("RGB", (64, 48), (100, 90, 80)).save(root / "images" / split / f"{name}.png")
            (root / "labels" / split / f"{name}.txt").write_text("1 0.5 0.5 0.25 0.5\n0 0.25 0.25 0.1 0.1\n")
    (root / "data.yaml").write_text("path: .\ntrain: images/train\nval: images/val\nnames: [cat, dog, owl]\n")
    return root / "data.yaml"


def test_convert_dataset_prints_overrides_and_writes_a_config_that_trains(tmp_path, capsys):
    data_yaml = _yolo_set(tmp_path / "set")
    written = tmp_path / "set.yaml"
    code = load_tool("convert_dataset").main([str(data_yaml), "--output-dir", str(tmp_path / "coco"),
                                              "--write-config", str(written)])
    out = capsys.readouterr().out
    assert code == 0
    line = next(row for row in out.splitlines() if row.startswith("train on it with:"))
    overrides = line.split(" --set ")[1:]
    assert "model.num_classes=3" in overrides and "data.format=coco" in overrides
    from_overrides = load_config(REPO / "configs" / "demo.yaml", overrides)
    from_file = load_config(written)
    for cfg in (from_overrides, from_file):
        assert cfg.model.num_classes == 3 and cfg.data.dataset == "coco"
        datamodule = DetectionDataModule(cfg)
        assert datamodule.category_ids == [0, 1, 2] and datamodule.class_names == ["cat", "dog", "owl"]
        datamodule.setup("fit")
        assert (len(datamodule.train_dataset), len(datamodule.val_dataset)) == (2, 1)
    assert from_file.trainer.output_dir == "runs/set"
