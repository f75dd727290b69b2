"""detr_lab checkpoint format, Lightning checkpoints and safe loading."""

from __future__ import annotations

import argparse

import pytest
import torch

from detr_lab.checkpoints import CheckpointError, load_checkpoint, safe_load, save_checkpoint
from detr_lab.config import ConfigError, config_to_dict, load_config
from detr_lab.models.attention.clustering import AdaptiveClusteringAttention
from detr_lab.models.backbones import ResNetBackbone
from detr_lab.models.build import build_model

from factories import tiny_overrides

TINY = tiny_overrides()
CATEGORY_IDS = [1, 5, 9]
CLASS_NAMES = ["cat", "dog", "bird"]


def _pickled_function():
    return 0


class _Payload:
    pass


@pytest.fixture(scope="module")
def tiny():
    cfg = load_config(overrides=TINY)
    torch.manual_seed(0)
    return cfg, build_model(cfg.model).eval()


def _inputs():
    g = torch.Generator().manual_seed(3)
    return torch.randn(1, 3, 64, 64, generator=g), torch.zeros(1, 64, 64, dtype=torch.bool)


def _assert_same_weights(a, b):
    state_a, state_b = a.state_dict(), b.state_dict()
    assert state_a.keys() == state_b.keys()
    for key in state_a:
        torch.testing.assert_close(state_a[key], state_b[key], rtol=0, atol=0)


# ------------------------------------------------------------------------------------- safe_load
def test_safe_load_refuses_pickled_code(tmp_path):
    for name, payload, culprit in [
        ("function.pt", {"state_dict": {}, "hook": _pickled_function}, "_pickled_function"),
        ("object.pt", {"state_dict": {}, "extra": _Payload()}, "_Payload"),
    ]:
        path = tmp_path / name
        torch.save(payload, path)
        with pytest.raises(
            CheckpointError, match=rf"{name}: refused: loading it would run pickled code .*{culprit}"
        ):
            safe_load(path)
        with pytest.raises(CheckpointError, match="refused"):
            load_checkpoint(path)


def test_safe_load_reads_tensors_and_training_arguments(tmp_path):
    path = tmp_path / "ok.pt"
    torch.save(
        {"model": {"w": torch.ones(2)}, "args": argparse.Namespace(lr=1e-4, backbone="resnet50")}, path
    )
    loaded = safe_load(path)
    assert loaded["args"].backbone == "resnet50" and loaded["model"]["w"].tolist() == [1.0, 1.0]


def test_safe_load_missing_and_unreadable_files(tmp_path):
    with pytest.raises(CheckpointError, match="checkpoint file not found: .*nothing.pt"):
        safe_load(tmp_path / "nothing.pt")
    with pytest.raises(CheckpointError, match="not a file"):
        safe_load(tmp_path)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"this is not a checkpoint" * 4)
    with pytest.raises(CheckpointError, match="garbage.pt: not a readable PyTorch checkpoint"):
        safe_load(garbage)


# ---------------------------------------------------------------------------- detr_lab format
def test_save_and_load_round_trip(tmp_path, tiny):
    cfg, model = tiny
    path = save_checkpoint(tmp_path / "run" / "model.pt", model, cfg, CATEGORY_IDS, CLASS_NAMES)
    assert [p.name for p in path.parent.iterdir()] == ["model.pt"]  # no temporary file left behind
    raw = safe_load(path)
    assert (raw["format"], raw["version"]) == ("detr_lab", 2)
    assert set(raw) == {"format", "version", "config", "state_dict", "category_ids", "class_names"}

    loaded = load_checkpoint(path)
    assert loaded.category_ids == CATEGORY_IDS and loaded.class_names == CLASS_NAMES
    assert loaded.config == cfg and not loaded.model.training
    _assert_same_weights(loaded.model, model)
    images, mask = _inputs()
    with torch.no_grad():
        torch.testing.assert_close(
            loaded.model(images, mask)["pred_boxes"], model(images, mask)["pred_boxes"]
        )


def test_save_checks_class_metadata(tmp_path, tiny):
    cfg, model = tiny
    with pytest.raises(CheckpointError, match="2 category ids and 3 class names .* num_classes=3"):
        save_checkpoint(tmp_path / "x.pt", model, cfg, [1, 2], CLASS_NAMES)
    assert not (tmp_path / "x.pt").exists()


def test_loading_never_fetches_imagenet_weights(tmp_path, tiny, monkeypatch):
    cfg, model = tiny
    stored = load_config(overrides=[*TINY, "model.backbone.pretrained=true"])
    path = save_checkpoint(tmp_path / "model.pt", model, stored, CATEGORY_IDS, CLASS_NAMES)

    def no_download(self):
        raise AssertionError("tried to download ImageNet weights")

    monkeypatch.setattr(ResNetBackbone, "download_imagenet_weights", no_download)
    loaded = load_checkpoint(path)
    assert loaded.config.model.backbone.pretrained  # the stored config is returned as stored
    _assert_same_weights(loaded.model, model)


def test_overrides_rebuild_with_other_attention(tmp_path, tiny):
    cfg, model = tiny
    path = save_checkpoint(tmp_path / "model.pt", model, cfg, CATEGORY_IDS, CLASS_NAMES)
    loaded = load_checkpoint(path, overrides=["model.encoder.attention=act", "model.encoder.act.q_hashes=4"])
    assert isinstance(loaded.model.transformer.encoder.layers[0].self_attn, AdaptiveClusteringAttention)
    assert loaded.config.model.encoder.attention == "act"
    _assert_same_weights(loaded.model, model)
    with pytest.raises(ConfigError, match="model.encoder.atention.*did you mean 'attention'"):
        load_checkpoint(path, overrides=["model.encoder.atention=act"])
    with pytest.raises(ConfigError, match="key.path=value"):
        load_checkpoint(path, overrides=["model.encoder.attention"])


def test_mismatch_between_config_and_weights(tmp_path, tiny):
    cfg, model = tiny
    path = save_checkpoint(tmp_path / "model.pt", model, cfg, CATEGORY_IDS, CLASS_NAMES)
    with pytest.raises(
        CheckpointError, match=r"different shape .*query_embed\.weight: \(6, 32\) vs model \(9, 32\)"
    ):
        load_checkpoint(path, overrides=["model.num_queries=9"])
    with pytest.raises(CheckpointError, match=r"missing .*transformer\.encoder\.layers\.1\."):
        load_checkpoint(path, overrides=["model.encoder.num_layers=2"])
    with pytest.raises(CheckpointError, match=r"unexpected .*transformer\.decoder\.layers\.1\."):
        load_checkpoint(path, overrides=["model.decoder.num_layers=1"])


def test_bad_checkpoint_dicts(tiny):
    cfg, model = tiny
    good = {
        "format": "detr_lab",
        "version": 1,
        "config": config_to_dict(cfg),
        "state_dict": model.state_dict(),
        "category_ids": CATEGORY_IDS,
        "class_names": CLASS_NAMES,
    }
    with pytest.raises(CheckpointError, match="version 3; this code reads versions 1 to 2"):
        load_checkpoint({**good, "version": 3})
    with pytest.raises(CheckpointError, match="lacks 'class_names'"):
        load_checkpoint({k: v for k, v in good.items() if k != "class_names"})
    with pytest.raises(CheckpointError, match="unknown checkpoint layout.*top-level keys: \\['weights'\\]"):
        load_checkpoint({"weights": {}})
    with pytest.raises(CheckpointError, match="3 category ids and 2 class names"):
        load_checkpoint({**good, "class_names": ["a", "b"]})


# ------------------------------------------------------------------------------------- Lightning
def test_lightning_checkpoint(tmp_path, tiny):
    cfg, model = tiny
    state = {f"model.{k}": v for k, v in model.state_dict().items()}
    state["criterion.class_weights"] = torch.ones(4)
    state["teacher.model.query_source.query_embed.weight"] = torch.zeros(6, 32)
    checkpoint = {
        "epoch": 3,
        "global_step": 120,
        "state_dict": state,
        "optimizer_states": [],
        "detr_lab": {"config": config_to_dict(cfg), "category_ids": CATEGORY_IDS, "class_names": CLASS_NAMES},
    }
    path = tmp_path / "last.ckpt"
    torch.save(checkpoint, path)
    for source in (path, checkpoint):
        loaded = load_checkpoint(source)
        assert loaded.category_ids == CATEGORY_IDS and loaded.class_names == CLASS_NAMES
        _assert_same_weights(loaded.model, model)
    with pytest.raises(CheckpointError, match="without 'model.\\*' weights"):
        load_checkpoint({**checkpoint, "state_dict": {"criterion.x": torch.ones(1)}})
