"""Fixtures shared by every test folder; the factories behind them live in tests/factories.py."""

from __future__ import annotations

from types import ModuleType

import pytest
import torch

from factories import load_synth_weights


@pytest.fixture(scope="session")
def synth_weights() -> ModuleType:
    """The `tests/fixtures/synth_weights.py` module (see `load_synth_weights`)."""
    return load_synth_weights()


@pytest.fixture(autouse=True)
def torch_threads_given_back():
    """Every test ends with torch's thread count as it found it: a tool run in-process with `--threads 1`
    would otherwise leave the rest of the session single-threaded, and results that hinge on rounding
    (near-tied top-k selections) would then depend on which tests ran before."""
    threads = torch.get_num_threads()
    yield
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
