"""Checkpoints and configs written by the release before the assembled detector (weights layout 1)
load through the versioned migration and give that release's outputs.

The fixtures in `tests/fixtures/weights_v1/` were written by that release (`make_fixtures.py` says
how): detr_lab-format checkpoints of DETR, one-stage and two-stage Deformable DETR, a Lightning
`last.ckpt` of a two-step two-stage run with EMA, and each model's outputs on one batch.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from detr_lab.checkpoints import load_checkpoint
from detr_lab.checkpoints.migrate import WEIGHTS_VERSION, migrate_state_dict
from detr_lab.config import ConfigError, load_config
from detr_lab.config_migration import migrate_config_data
from detr_lab.io import CheckpointError, safe_load

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "weights_v1"
EXPECTED = torch.load(FIXTURES / "expected.pt", weights_only=True)


CASES = [("detr", None, 0), ("deformable", None, 2), ("two_stage", "proposals", 4), ("vit", None, 2)]


@pytest.mark.parametrize(("name", "source", "box_dim"), CASES)
def test_version_1_checkpoints_load_and_give_their_outputs(name, source, box_dim):
    stored = safe_load(FIXTURES / f"{name}.pt")
    assert stored["version"] == 1 and any(k.startswith("input_proj.") for k in stored["state_dict"])
    loaded = load_checkpoint(FIXTURES / f"{name}.pt")
    assert loaded.config.model.query_source == source and loaded.model.query_spec.box_dim == box_dim
    assert loaded.class_names == ["a", "b", "c", "d", "e", "f"]
    neck = "simple_pyramid" if name == "vit" else "projection"  # the pyramid left the ViT backbone
    assert loaded.config.model.neck.type == neck
    with torch.no_grad():
        outputs = loaded.model(EXPECTED["images"], EXPECTED["padding_mask"])
    for key in ("pred_logits", "pred_boxes"):
        torch.testing.assert_close(outputs[key], EXPECTED["outputs"][name][key], rtol=0, atol=1e-6)


def test_version_1_lightning_ema_checkpoint_loads_the_average():
    stored = safe_load(FIXTURES / "ema_last.ckpt")
    assert "current_model_state" in stored and "weights_version" not in stored["detr_lab"]
    assert stored["detr_lab"]["config"]["model"]["two_stage"] is True  # a version-1 config
    loaded = load_checkpoint(FIXTURES / "ema_last.ckpt")
    assert loaded.config.model.query_source == "proposals"
    average = stored["state_dict"]["model.proposal_queries.query_proj.weight"]
    raw = stored["current_model_state"]["model.proposal_queries.query_proj.weight"]
    assert not torch.equal(average, raw)  # the run moved the weights; the file holds the average
    torch.testing.assert_close(loaded.model.query_source.query_proj.weight, average, rtol=0, atol=0)


def test_resume_hook_renames_the_average_and_the_raw_weights():
    from detr_lab.engine.module import DetectionModule

    checkpoint = safe_load(FIXTURES / "ema_last.ckpt")
    meta = checkpoint["detr_lab"]
    cfg = load_config(overrides=[f"{k}={v}" for k, v in _dotted(meta["config"])])  # stored config, migrated
    module = DetectionModule(cfg, meta["category_ids"], meta["class_names"])
    module.on_load_checkpoint(checkpoint)
    for key in ("state_dict", "current_model_state"):
        names = {k for k in checkpoint[key] if k.startswith("model.")}
        assert names == {"model." + k for k in module.model.state_dict()}, key
    assert meta["weights_version"] == WEIGHTS_VERSION
    module.load_state_dict(checkpoint["current_model_state"])  # strict: every name fits


def _dotted(tree: dict, prefix: str = "") -> list[tuple[str, object]]:
    items = []
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            items += _dotted(value, f"{prefix}{key}.")
        elif not isinstance(value, dict):
            items.append((f"{prefix}{key}", "null" if value is None else value))
    return items


def test_state_dict_renames_and_versions():
    state = {"input_proj.0.weight": 1, "query_embed.weight": 2, "proposal_queries.memory_proj.bias": 3,
             "reference_points_head.bias": 4, "class_embed.weight": 5,
             "teacher.query_embed.weight": 6, "backbone.pyramid.branches.0.1.weight": 7}  # fmt: skip
    assert migrate_state_dict(state, 1) == {
        "neck.input_proj.0.weight": 1, "query_source.query_embed.weight": 2,
        "query_source.memory_proj.bias": 3, "query_source.reference_points_head.bias": 4,
        "class_embed.weight": 5, "teacher.query_embed.weight": 6, "neck.pyramid.branches.0.1.weight": 7,
    }  # fmt: skip
    prefixed = migrate_state_dict({"model.input_proj.0.weight": 1, "criterion.x": 2}, 1, prefix="model.")
    assert prefixed == {"model.neck.input_proj.0.weight": 1, "criterion.x": 2}
    assert migrate_state_dict(state, WEIGHTS_VERSION) == state
    with pytest.raises(CheckpointError, match="weights layout version 7"):
        migrate_state_dict(state, 7)


def test_version_1_config_keys_are_migrated():
    flags = {"anchor_boxes": True, "mixed_query_selection": True, "two_stage": False}
    legacy = OmegaConf.create({"model": flags})
    migrated = OmegaConf.to_container(migrate_config_data(legacy))
    assert migrated == {"model": {"query_source": "mixed_selection"},
                        "loss": {"terms": ["labels", "cardinality", "boxes", "box_parts"]}}  # fmt: skip
    anchors = migrate_config_data(OmegaConf.create({"model": {"anchor_boxes": True}}))
    assert anchors.model.query_source == "learned_anchors"
    vit_backbone = {"type": "vit", "pyramid_channels": 64}
    vit = migrate_config_data(OmegaConf.create({"model": {"backbone": vit_backbone}}))
    assert OmegaConf.to_container(vit.model) == {
        "backbone": {"type": "vit"}, "neck": {"type": "simple_pyramid", "options": {"channels": 64}}
    }
    resnet_backbone = {"type": "resnet", "pyramid_channels": None}
    resnet = migrate_config_data(OmegaConf.create({"model": {"backbone": resnet_backbone}}))
    assert OmegaConf.to_container(resnet.model) == {"backbone": {"type": "resnet"}}  # a stored null: dropped
    cfg = load_config(overrides=["model.decoder.cross_attention=deformable", "model.box_refine=true",
                                 "model.two_stage=true"])  # fmt: skip
    assert cfg.model.query_source == "proposals"
    with pytest.raises(ConfigError, match="'model.two_stage' and 'model.anchor_boxes' together"):
        load_config(overrides=["model.two_stage=true", "model.anchor_boxes=true"])
