"""File I/O every other module shares: safe reading, one atomic writer, state-dict comparison.

    state = safe_load("model.pt")                      # torch.load(weights_only=True), clear errors
    with atomic_write("runs/x/config.yaml", "w") as f:  # temporary file, fsync, rename
        f.write(text)
    atomic_torch_save(payload, "runs/x/model.pt")
    diff = diff_state_dicts(model.state_dict(), state)  # missing / unexpected / other shape

This module is a leaf: it imports only torch, the standard library and `detr_lab.files` (the
atomic writer, standard library only, re-exported here), so any module of detr_lab (backbones,
checkpoints, the training engine, the evaluator) can use it without an import cycle.

Errors name the file and the operating system's cause: a failed write is a `FileWriteError`
"cannot write <path>: <reason>" (see `detr_lab.files`), a file that cannot be loaded a
`CheckpointError` "<path>: <reason>".
"""

from __future__ import annotations

import argparse
import os
import pickle
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from detr_lab.files import FileWriteError, atomic_write, atomic_write_text

__all__ = [
    "SAFE_GLOBALS",
    "CheckpointError",
    "FileWriteError",
    "StateDictDiff",
    "atomic_torch_save",
    "atomic_write",
    "atomic_write_text",
    "diff_state_dicts",
    "safe_load",
]

# Globals a checkpoint may hold besides tensors and containers: official DETR / Deformable DETR
# checkpoints store their training arguments as an `argparse.Namespace`.
SAFE_GLOBALS: tuple[type, ...] = (argparse.Namespace,)


class CheckpointError(ValueError):
    """A checkpoint file or dict cannot be read or does not fit the model. The message says which."""


# ------------------------------------------------------------------------------------ reading
_GLOBAL_PATTERNS = (
    re.compile(r"Unsupported global: GLOBAL ([\w.<>]+)"),
    re.compile(r"unsupported GLOBAL ([\w.<>]+)"),
)


def _refused_globals(path: Path, message: str) -> list[str]:
    """Names of the globals that made a weights-only load fail (read without running them)."""
    allowed = {f"{cls.__module__}.{cls.__qualname__}" for cls in SAFE_GLOBALS}
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:  # an unreadable archive: fall back to the loader's message
        names = []
    names = [name for name in names if name not in allowed]
    if not names:
        names = [m.group(1) for pattern in _GLOBAL_PATTERNS if (m := pattern.search(message))]
    return names


def safe_load(path: str | os.PathLike, *, map_location: Any = "cpu") -> Any:
    """`torch.load(path, weights_only=True)` with one-line errors naming the file.

    Tensors, containers, numbers, strings and `argparse.Namespace` (official checkpoints store their
    training arguments as one) load; anything that needs other pickled code (functions, classes,
    numpy arrays) is refused without being run.

    Args:
        map_location: as `torch.load`'s (default: every tensor on the CPU).
    Raises:
        CheckpointError: the file is missing, not a file, unreadable (the message gives the operating
            system's reason), not a PyTorch file, or refused because it names unsafe globals (the
            message lists them).
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint file not found: {path}")
    if not path.is_file():
        raise CheckpointError(f"checkpoint path is not a file: {path}")
    try:
        with torch.serialization.safe_globals(list(SAFE_GLOBALS)):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        names = _refused_globals(path, str(err))
        if names:
            raise CheckpointError(
                f"{path}: refused: loading it would run pickled code (unsafe global {', '.join(names)}); "
                "only tensors, containers, numbers and strings are accepted"
            ) from None
        raise CheckpointError(
            f"{path}: not a readable PyTorch checkpoint (corrupt or another format)"
        ) from None
    except OSError as err:
        raise CheckpointError(f"{path}: cannot read: {err.strerror or err}") from None
    except Exception as err:  # corrupt files surface as many error types (zip, pickle, index, EOF)
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({first_line})") from None


# ------------------------------------------------------------------------------------ writing
def atomic_torch_save(obj: Any, path: str | os.PathLike) -> Path:
    """`torch.save(obj)` to `path` through `atomic_write`; returns `path`. Raises `FileWriteError`."""
    with atomic_write(path, "wb") as file:
        torch.save(obj, file)
    return Path(path)


# ----------------------------------------------------------------------------- state dicts
@dataclass
class StateDictDiff:
    """How a state dict compares with a model's: keys by name, shapes as tuples.

    `matched`: same name and shape; `missing`: in the model only; `unexpected`: in the state dict
    only; `mismatched`: (name, shape in the state dict, shape in the model).
    """

    matched: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = field(default_factory=list)

    @property
    def exact(self) -> bool:
        """True when every key matches by name and shape, in both directions."""
        return not (self.missing or self.unexpected or self.mismatched)

    def summary(self, examples: int = 5) -> str:
        """One line: the count of each kind of difference with up to `examples` names each (sorted)."""
        problems = []
        if self.missing:
            names = ", ".join(sorted(self.missing)[:examples])
            problems.append(f"{len(self.missing)} missing (e.g. {names})")
        if self.unexpected:
            names = ", ".join(sorted(self.unexpected)[:examples])
            problems.append(f"{len(self.unexpected)} unexpected (e.g. {names})")
        if self.mismatched:
            shapes = "; ".join(
                f"{name}: {given} vs model {expected}"
                for name, given, expected in sorted(self.mismatched)[:examples]
            )
            problems.append(f"{len(self.mismatched)} with a different shape (e.g. {shapes})")
        return "; ".join(problems) if problems else "all keys match"


def diff_state_dicts(expected: Mapping[str, Tensor], given: Mapping[str, Tensor]) -> StateDictDiff:
    """Compare `given` (e.g. a checkpoint's weights) with `expected` (a model's `state_dict()`).

    Lists keep `expected`'s order for matched, missing and mismatched keys and `given`'s order for
    unexpected ones.
    """
    diff = StateDictDiff()
    for name, tensor in expected.items():
        if name not in given:
            diff.missing.append(name)
        elif tuple(given[name].shape) != tuple(tensor.shape):
            diff.mismatched.append((name, tuple(given[name].shape), tuple(tensor.shape)))
        else:
            diff.matched.append(name)
    diff.unexpected = [name for name in given if name not in expected]
    return diff
