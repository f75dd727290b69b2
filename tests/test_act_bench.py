"""tools/bench_act.py on a trained-model checkpoint: captured encoder inputs and the AP sweep.

A tiny model and a 2-image synthetic validation set; with a tiny bucket width ACT is exact attention,
so its relative error vanishes, every real token is its own cluster and the AP equals plain's.
"""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from detr_lab.checkpoints import save_checkpoint
from detr_lab.config import load_config
from detr_lab.models.build import build_model

from factories import load_tool, tiny_overrides


@pytest.fixture(scope="module")
def bench():
    return load_tool("bench_act")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("act_bench")
    torch.manual_seed(0)
    cfg = load_config(overrides=tiny_overrides(
        "data.dataset=synthetic", f"data.root={root / 'data'}", "data.num_workers=0",
        "data.synthetic.num_train=1", "data.synthetic.num_val=2", "data.synthetic.image_size=96",
        "data.augment.eval_size=96", "data.augment.eval_max_size=128",
        num_classes=6, num_heads=2, num_queries=5, encoder__num_layers=2, decoder__num_layers=1,
    ))  # fmt: skip
    path = save_checkpoint(root / "model.pt", build_model(cfg.model), cfg, [1, 2, 3, 5, 8, 13], "abcdef")
    image = root / "image.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (50, 70, 3), dtype=np.uint8)).save(image)
    return {"root": root, "path": path, "image": image}


def test_encoder_inputs_and_weights_come_from_the_checkpoint(bench, checkpoint):
    out = checkpoint["root"] / "bench.json"
    common = ["--checkpoint", str(checkpoint["path"]), "--image", str(checkpoint["image"]), "--image-size",
              "128", "192", "--runs", "1", "--warmup", "0", "--json", str(out)]  # fmt: skip
    bench.main([*common, "--stride", "32", "--layer", "1", "--hashes", "3", "--bucket-width", "1e-6", "1e6"])
    result = json.loads(out.read_text())
    setting = result["setting"]
    assert setting["feature_map"] == [4, 6] and setting["tokens"] == 24
    assert (setting["embed_dim"], setting["heads"]) == (32, 2)  # the model's, not the command line's
    assert "encoder layer 1" in setting["source"] and str(checkpoint["path"]) in setting["weights"]
    exact, coarse = result["act"]
    assert exact["mean_clusters"] == 24 and exact["relative_error"] < 1e-5
    assert coarse["mean_clusters"] == 1 and coarse["relative_error"] > 1e-3
    with pytest.raises(SystemExit, match="stride 16"):
        bench.main([*common, "--stride", "16"])


@pytest.mark.slow  # COCO AP evaluations of several models
def test_ap_sweep_of_plain_and_act(bench, checkpoint):
    out = checkpoint["root"] / "ap.json"
    bench.main(["--checkpoint", str(checkpoint["path"]), "--image-size", "64", "96", "--stride", "32",
                "--hashes", "2", "--runs", "1", "--warmup", "0", "--json", str(out),
                "--ap", "--ap-bucket-width", "1e-6", "--ap-batch-size", "2"])  # fmt: skip
    ap = json.loads(out.read_text())["ap"]
    plain, (exact,) = ap["plain"], ap["act"]
    assert plain["images"] == exact["images"] == 2
    assert exact["AP"] == pytest.approx(plain["AP"], abs=1e-9)
    assert exact["ap_drop"] == pytest.approx(0, abs=1e-9)
    # Every real token is its own cluster; ACT then costs more than plain (hashing on top).
    assert exact["mean_clusters"] == pytest.approx(exact["mean_tokens"]) and exact["mean_tokens"] > 1
    assert exact["flops_ratio"] > 1 and exact["core_flops_ratio"] > exact["flops_ratio"]
    assert "mean_clusters" not in plain


@pytest.mark.slow  # COCO AP evaluations of several models
def test_ap_sweep_overrides_reach_every_evaluation(bench, checkpoint):
    out = checkpoint["root"] / "ap_small.json"
    bench.main(["--checkpoint", str(checkpoint["path"]), "--image-size", "64", "96", "--stride", "32",
                "--hashes", "2", "--runs", "1", "--warmup", "0", "--json", str(out), "--ap",
                "--ap-bucket-width", "1e-6", "--ap-set", "data.augment.eval_size=64",
                "--ap-set", "data.augment.eval_max_size=64"])  # fmt: skip
    ap = json.loads(out.read_text())["ap"]
    assert ap["overrides"] == ["data.augment.eval_size=64", "data.augment.eval_max_size=64"]
    (exact,) = ap["act"]
    # 96 px synthetic images evaluated at 64 px: a 2 x 2 map at stride 32 (3 x 3 without the override).
    assert exact["mean_tokens"] == pytest.approx(4)
    for row in (ap["plain"], exact):
        assert "data.augment.eval_size=64" in row["overrides"]
    with pytest.raises(SystemExit, match="eval_sise.*did you mean 'eval_size'"):
        bench.main(["--checkpoint", str(checkpoint["path"]), "--hashes", "2", "--runs", "1", "--warmup", "0",
                    "--json", str(out), "--ap", "--ap-set", "data.augment.eval_sise=64"])  # fmt: skip
    with pytest.raises(SystemExit, match="add --ap"):
        bench.main(["--checkpoint", str(checkpoint["path"]), "--ap-set", "data.augment.eval_size=64"])
