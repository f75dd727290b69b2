"""Checkpoints and configs written by the release before the assembled detector (weights layout 1)
load through the versioned migration and give that release's outputs.

The fixtures in `tests/fixtures/weights_v1/` were written by that release (`make_fixtures.py` says
how): detr_lab-format checkpoints of DETR, one-stage and two-stage Deformable DETR, a Lightning
`last.ckpt` of a two-step two-stage run with EMA, and each model's outputs on one batch.
"""

from __future__ import annotations

import re
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


CASES = [("detr", None, 0), ("deformable", None, 2), ("two_stage", "proposals", 4), ("vit", None, 2),
         ("dino", "mixed_selection", 4), ("dab", "learned_anchors", 4)]


@pytest.mark.parametrize(("name", "source", "box_dim"), CASES)
def test_version_1_checkpoints_load_and_give_their_outputs(name, source, box_dim):
    stored = safe_load(FIXTURES / f"{name}.pt")
    assert stored["version"] == 1 and any(k.startswith("input_proj.") for k in stored["state_dict"])
    loaded = load_checkpoint(FIXTURES / f"{name}.pt")
    assert loaded.config.model.query_source == source and loaded.model.query_spec.box_dim == box_dim
    assert loaded.class_names == ["a", "b", "c", "d", "e", "f"]
    neck = "simple_pyramid" if name == "vit" else "projection"  # the pyramid left the ViT backbone
    assert loaded.config.model.neck.type == neck
    # Version-1 anchor-box models logged loss_xy / loss_hw: the migrated config selects box_parts.
    assert ("box_parts" in loaded.config.loss.terms) == (name in ("dino", "dab"))
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


def _stored_v1(**model: object) -> dict:
    """The parts of a complete version-1 config that the migration reads: all three family flags and
    the backbone's `pyramid_channels`, as every run saved them."""
    flags = {"two_stage": False, "anchor_boxes": False, "mixed_query_selection": False}
    backbone = {"type": "resnet", "pyramid_channels": None, **model.pop("backbone", {})}
    terms = ["labels", "cardinality", "boxes"]
    return {"model": {**flags, **model, "backbone": backbone}, "loss": {"terms": terms}}


def test_stored_version_1_configs_are_migrated():
    dino = OmegaConf.to_container(migrate_config_data(OmegaConf.create(
        _stored_v1(anchor_boxes=True, mixed_query_selection=True))))  # fmt: skip
    assert dino["model"]["query_source"] == "mixed_selection"
    assert dino["loss"]["terms"] == ["labels", "cardinality", "boxes", "box_parts"]
    assert not {"two_stage", "anchor_boxes", "mixed_query_selection"} & set(dino["model"])
    dab = migrate_config_data(OmegaConf.create(_stored_v1(anchor_boxes=True)))
    assert dab.model.query_source == "learned_anchors"
    two_stage = migrate_config_data(OmegaConf.create(_stored_v1(two_stage=True)))
    assert two_stage.model.query_source == "proposals" and two_stage.loss.terms[-1] == "boxes"
    vit = migrate_config_data(OmegaConf.create(_stored_v1(backbone={"type": "vit", "pyramid_channels": 64})))
    assert OmegaConf.to_container(vit.model.neck) == {"type": "simple_pyramid", "options": {"channels": 64}}
    resnet = OmegaConf.to_container(migrate_config_data(OmegaConf.create(_stored_v1())).model)
    assert resnet["backbone"] == {"type": "resnet"}  # a stored null pyramid_channels: dropped
    assert resnet["query_source"] is None
    with pytest.raises(ValueError, match="'model.two_stage' and 'model.anchor_boxes' together"):
        migrate_config_data(OmegaConf.create(_stored_v1(two_stage=True, anchor_boxes=True)))


def test_version_1_keys_in_files_and_overrides_name_their_replacement():
    """A YAML file or override setting one family flag is not guessed at: `false` could mean the
    default source or "keep the inherited one"."""
    for override, replacement in [
        ("model.two_stage=true", "'model.query_source: proposals'"),
        ("model.two_stage=false", "'model.query_source: proposals'"),
        ("model.anchor_boxes=true", "'model.query_source: learned_anchors'"),
        ("model.mixed_query_selection=false", "'model.query_source: mixed_selection'"),
        ("model.backbone.pyramid_channels=64", "'model.neck: {type: simple_pyramid"),
    ]:
        key = override.split("=")[0]
        with pytest.raises(ConfigError, match=f"'{key}' was replaced by {re.escape(replacement)}"):
            load_config("configs/demo_dino.yaml", [override])
    with pytest.raises(ValueError, match="must be true or false, got .maybe."):
        migrate_config_data(OmegaConf.create(_stored_v1(two_stage="maybe")))
