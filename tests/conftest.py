"""Fixtures shared by every test folder; the factories behind them live in tests/factories.py."""

from __future__ import annotations

from types import ModuleType

import pytest

from factories import load_synth_weights


@pytest.fixture(scope="session")
def synth_weights() -> ModuleType:
    """The `tests/fixtures/synth_weights.py` module (see `load_synth_weights`)."""
    return load_synth_weights()

