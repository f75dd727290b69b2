"""Device names -> `torch.device` (shared by evaluation and the Python prediction API; no Lightning)."""

from __future__ import annotations

import torch


def resolve_device(device: str) -> torch.device:
    """"auto" -> CUDA when available, else CPU; anything else as torch.device (error if unavailable)."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device '{device}' requested but CUDA is not available")
    return resolved
