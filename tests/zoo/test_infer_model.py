"""`tools/infer.py --model NAME|FOLDER`: a zoo model fetched from a local `file://` address into the
cache named by DETR_LAB_CACHE_DIR, and a Hub-style folder; refusals as one line."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch
from PIL import Image

from detr_lab.predict import predictor as predictor_module
from detr_lab.zoo import ZOO, ZooEntry, load_pretrained, save_pretrained

from factories import load_tool, official_detr_spec, quick_official_state

SMALL = ["--set", "data.augment.eval_size=64", "--set", "data.augment.eval_max_size=96"]


@pytest.fixture(scope="module")
def infer():
    return load_tool("infer")


@pytest.fixture()
def zoo_model(tmp_path, monkeypatch):
    """A zoo entry "tiny-detr" whose file (a tiny official DETR checkpoint) is a local file:// address.
    (`optimize_for_inference`, which traces the backbone for seconds, is left out: not under test.)"""
    monkeypatch.setattr(predictor_module, "optimize_for_inference", lambda model: model)
    published = tmp_path / "published" / "tiny-detr-x.pth"
    published.parent.mkdir()
    torch.save({"model": quick_official_state(official_detr_spec(classes=91))}, published)
    entry = ZooEntry("tiny-detr", "detr", "tiny", "local/tiny", "tiny-detr-x.pth", published.as_uri(),
                     published.as_uri(), sha256_prefix=hashlib.sha256(published.read_bytes()).hexdigest()[:8])
    monkeypatch.setitem(ZOO, entry.name, entry)
    monkeypatch.setenv("DETR_LAB_CACHE_DIR", str(tmp_path / "cache"))
    return entry


@pytest.fixture()
def images(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    pixels = np.random.default_rng(0).integers(0, 255, (60, 90, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(folder / "a.png")
    return folder


def test_infer_with_a_zoo_name_then_a_model_folder(tmp_path, infer, zoo_model, images, capsys):
    out = tmp_path / "out"
    assert infer.main([str(images), "--model", "tiny-detr", "--output-dir", str(out), *SMALL]) == 0
    assert (tmp_path / "cache" / "zoo" / "tiny-detr-x.pth").is_file()
    result = json.loads((out / "detections.json").read_text())
    assert [image["file"] for image in result["images"]] == [str(images / "a.png")]
    assert (out / "a.jpg").is_file()
    assert "downloading" in capsys.readouterr().err

    folder = save_pretrained(tmp_path / "folder", load_pretrained("tiny-detr")[0])
    out2 = tmp_path / "out2"
    assert infer.main([str(images), "--model", str(folder), "--output-dir", str(out2), *SMALL]) == 0
    again = json.loads((out2 / "detections.json").read_text())
    assert again["images"][0]["detections"] == result["images"][0]["detections"]
    assert "downloading" not in capsys.readouterr().err  # the cached file served the second load


def test_infer_refusals_are_one_line(tmp_path, infer, zoo_model, images, capsys, monkeypatch):
    bad = ZooEntry(**{**zoo_model.to_dict(), "sha256_prefix": "0000000z", "config_overrides": ()})
    monkeypatch.setitem(ZOO, "tiny-detr", bad)
    assert infer.main([str(images), "--model", "tiny-detr", "--output-dir", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("infer.py: error: file:") and "does not start with the published 0000000z" in err
    assert not (tmp_path / "cache" / "zoo").exists() or not any((tmp_path / "cache" / "zoo").iterdir())

    assert infer.main([str(images), "--model", "no-such-model"]) == 1
    assert "no model folder, zoo name or Hub repository" in capsys.readouterr().err
    with pytest.raises(SystemExit) as stop:
        infer.main([str(images), "--model", "tiny-detr", "--checkpoint", "x.pt"])
    assert stop.value.code == 2
    assert "--checkpoint FILE or --model NAME|FOLDER" in capsys.readouterr().err
