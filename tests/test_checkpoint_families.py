"""The official-family registry: adding a family is one module that calls `register_family`."""

from __future__ import annotations

import pytest
import torch

from detr_lab.checkpoints import OFFICIAL_FAMILIES, CheckpointError, OfficialFamily, official_family
from detr_lab.checkpoints.family import register_family


def test_detr_and_deformable_detr_register_themselves():
    assert {"DETR", "Deformable DETR"} <= {family.name for family in OFFICIAL_FAMILIES}


def test_a_registered_family_is_found_by_its_keys_and_names_are_unique():
    toy = OfficialFamily(
        name="Toy DETR",
        override_keys=(),
        matches=lambda state: "toy.marker" in state,
        infer_config=lambda state, overrides: None,
        rules=[],
        fields=lambda groups: groups,
    )
    state = {"toy.marker": torch.zeros(1)}
    with pytest.raises(CheckpointError, match=r"toy.pth: not an official checkpoint of a known family"):
        official_family(state, "toy.pth")
    register_family(toy)
    try:
        assert official_family(state, "toy.pth") is toy
        with pytest.raises(ValueError, match="'Toy DETR' is already registered"):
            register_family(toy)
    finally:
        OFFICIAL_FAMILIES.remove(toy)
