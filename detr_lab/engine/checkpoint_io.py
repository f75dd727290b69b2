"""Checkpoint files of training runs: written atomically, read with `weights_only=True`.

Lightning's own writer serializes to memory and then writes the bytes through an fsspec transaction,
which for local paths goes to a temporary file in the system temp directory and is then moved into
place; when that directory is on another filesystem than the run (common on clusters: /tmp is local
disk, runs live on shared storage) the move degrades to copying into the destination, so a process
killed mid-copy leaves a truncated `last.ckpt`. `AtomicCheckpointIO` writes through
`detr_lab.io.atomic_torch_save` (a temporary file next to the destination, fsync, rename, which
POSIX guarantees to be atomic on one filesystem) and reads through `detr_lab.io.safe_load`, so a
failed write names the file and the operating system's reason (disk full, read-only, permission
denied) and a failed `--resume` names the checkpoint and why it cannot be read.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from detr_lab.io import atomic_torch_save, safe_load


def _is_local(path: Any) -> bool:
    return "://" not in str(path) or str(path).startswith("file://")


class AtomicCheckpointIO(TorchCheckpointIO):
    """Saves via `atomic_torch_save`; loads via `safe_load` (tensors, containers, primitives only).

    Remote paths (`s3://...`) go through Lightning's own fsspec reader and writer.
    Raises (from `save_checkpoint`): FileWriteError naming the path and the reason.
    Raises (from `load_checkpoint`): CheckpointError naming the path: missing, unreadable, corrupt,
        or refused because it holds pickled code.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        if not _is_local(path):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} does not take storage_options")
        atomic_torch_save(checkpoint, Path(str(path).removeprefix("file://")))

    def load_checkpoint(
        self, path: Any, map_location: Any = lambda storage, loc: storage, weights_only: Any = None
    ) -> dict[str, Any]:
        # Training checkpoints hold tensors, numbers, strings and plain containers only.
        if not _is_local(path):
            return super().load_checkpoint(path, map_location=map_location, weights_only=True)
        return safe_load(Path(str(path).removeprefix("file://")), map_location=map_location)
