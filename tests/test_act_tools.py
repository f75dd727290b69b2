"""tools/eval.py and tools/infer.py switch a plain-attention checkpoint to ACT with `--set model.*`.

A tiny bucket width makes ACT exact attention, so its results must equal the plain model's; the
hash settings are read from the overrides too (tests/test_act_swap.py checks the modules and that
wide buckets change the outputs).
"""

import json

import pytest
import torch
from PIL import Image

from detr_lab.checkpoints import save_checkpoint
from detr_lab.config import load_config
from detr_lab.models.build import build_model

from factories import load_tool, synthetic_data_yaml, tiny_overrides

TINY = tiny_overrides(
    "data.augment.eval_size=96", "data.augment.eval_max_size=128",  # infer.py's transform
    num_classes=6, num_heads=2, num_queries=5, dropout=0.0, decoder__num_layers=1,
)
DATA_YAML = synthetic_data_yaml(1, 2, image_size=96, augment="{{eval_size: 96, eval_max_size: 128}}")
ACT = "model.encoder.attention=act"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("act_tools")
    config = root / "data.yaml"
    config.write_text(DATA_YAML.format(root=root))
    torch.manual_seed(0)
    cfg = load_config(overrides=TINY)
    checkpoint = save_checkpoint(
        root / "plain.pt", build_model(cfg.model), cfg, [1, 2, 3, 5, 8, 13], ["a", "b", "c", "d", "e", "f"]
    )
    return {"root": root, "config": config, "checkpoint": checkpoint}


def evaluate(setup, name, *overrides):
    output = setup["root"] / f"{name}.json"
    arguments = ["--config", str(setup["config"]), "--checkpoint", str(setup["checkpoint"]),
                 "--device", "cpu", "--output", str(output), "--no-progress"]  # fmt: skip
    for item in overrides:
        arguments += ["--set", item]
    assert load_tool("eval").main(arguments) == 0
    return sorted(json.loads(output.read_text()), key=lambda r: (r["image_id"], -r["score"], r["bbox"]))


def assert_same_results(first, second):
    assert len(first) == len(second) > 0
    for a, b in zip(first, second, strict=True):
        assert (a["image_id"], a["category_id"]) == (b["image_id"], b["category_id"])
        assert a["score"] == pytest.approx(b["score"], abs=1e-4)
        assert a["bbox"] == pytest.approx(b["bbox"], abs=1e-2)


def test_eval_tool_runs_a_plain_checkpoint_with_act(setup, capsys):
    plain = evaluate(setup, "plain")
    hashing = ["model.encoder.act.q_hashes=24", "model.encoder.act.bucket_width=1e-6"]
    assert_same_results(plain, evaluate(setup, "act_exact", ACT, *hashing))
    # A bad ACT value is a configuration error (exit code 2) naming the key.
    code = load_tool("eval").main(["--config", str(setup["config"]), "--checkpoint", str(setup["checkpoint"]),
                                   "--set", ACT, "--set", "model.encoder.act.q_hashes=0"])  # fmt: skip
    assert code == 2 and "model.encoder.act.q_hashes" in capsys.readouterr().err


def test_infer_tool_runs_a_plain_checkpoint_with_act(setup):
    image = setup["root"] / "image.png"
    torch.manual_seed(1)
    Image.fromarray((torch.rand(80, 96, 3) * 255).to(torch.uint8).numpy()).save(image)

    def detections(name, *overrides):
        out = setup["root"] / name
        arguments = [str(image), "--checkpoint", str(setup["checkpoint"]), "--output-dir", str(out),
                     "--score-threshold", "0"]  # fmt: skip
        for item in overrides:
            arguments += ["--set", item]
        assert load_tool("infer").main(arguments) == 0
        (entry,) = json.loads((out / "detections.json").read_text())["images"]
        return entry["detections"]

    plain = detections("infer_plain")
    exact = detections("infer_act", ACT, "model.encoder.act.bucket_width=1e-6")
    assert len(plain) == len(exact) > 0
    for a, b in zip(plain, exact, strict=True):
        assert a["category_id"] == b["category_id"] and a["score"] == pytest.approx(b["score"], abs=1e-4)
        assert a["box"] == pytest.approx(b["box"], abs=1e-2)
