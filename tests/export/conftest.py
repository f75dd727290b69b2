"""Fixtures of the export tests (see export_helpers)."""

from __future__ import annotations

import pytest
from export_helpers import DATA_YAML, VARIANTS, make_checkpoint


@pytest.fixture(scope="session")
def data_config(tmp_path_factory):
    root = tmp_path_factory.mktemp("export_data")
    path = root / "data.yaml"
    path.write_text(DATA_YAML.format(root=root))
    return path


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory):
    directory = tmp_path_factory.mktemp("export_ckpts")
    return {variant: make_checkpoint(directory, variant) for variant in VARIANTS}
