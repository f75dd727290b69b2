"""Checkpoint files of training runs: written atomically, read with `weights_only=True`.

Lightning's own writer serializes to memory and then writes the bytes through an fsspec transaction,
which for local paths goes to a temporary file in the system temp directory and is then moved into
place; when that directory is on another filesystem than the run (common on clusters: /tmp is local
disk, runs live on shared storage) the move degrades to copying into the destination, so a process
killed mid-copy leaves a truncated `last.ckpt`. `AtomicCheckpointIO` writes next to the destination
and renames, which POSIX guarantees to be atomic on one filesystem.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO


def _is_local(path: Any) -> bool:
    return "://" not in str(path) or str(path).startswith("file://")


class AtomicCheckpointIO(TorchCheckpointIO):
    """Saves via `<file>.tmp-<pid>` + `os.replace`; loads `weights_only=True` (tensors, primitives)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        if not _is_local(path):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} does not take storage_options")
        path = Path(str(path).removeprefix("file://"))
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
        try:
            with open(tmp, "wb") as file:
                torch.save(checkpoint, file)
                file.flush()
                os.fsync(file.fileno())
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)

    def load_checkpoint(
        self, path: Any, map_location: Any = lambda storage, loc: storage, weights_only: Any = None
    ) -> dict[str, Any]:
        # Training checkpoints hold tensors, numbers, strings and plain containers only.
        return super().load_checkpoint(path, map_location=map_location, weights_only=True)
