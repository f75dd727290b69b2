"""Activation functions by name, for the parts whose activation is a config choice.

`model.decoder.activation` (feed-forward blocks, D-FINE's quality heads) and `model.mlp_activation`
(box, proposal and query-position MLPs): "relu" (DETR .. D-FINE) or "silu" (DEIM).
"""

from __future__ import annotations

from collections.abc import Callable

import torch.nn.functional as F
from torch import Tensor

ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {"relu": F.relu, "silu": F.silu}


def activation_function(name: str) -> Callable[[Tensor], Tensor]:
    """The function named `name` (a key of `ACTIVATIONS`).

    Raises:
        ValueError: an unknown name (the message lists the known ones).
    """
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; expected one of: {', '.join(ACTIVATIONS)}")
    return ACTIVATIONS[name]
