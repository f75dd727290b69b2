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
import re
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

_TEMPORARY = re.compile(r".+\.tmp-(\d+)$")


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def remove_stale_temporaries(directory: str | os.PathLike) -> list[Path]:
    """Delete `<file>.tmp-<pid>` files (partial checkpoint writes of `AtomicCheckpointIO`) in
    `directory` whose writing process no longer runs on this machine (killed mid-write, e.g. by
    kill -9); return the deleted paths. The files of live processes are left alone."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    removed = []
    for path in directory.iterdir():
        match = _TEMPORARY.fullmatch(path.name)
        if match and path.is_file() and not _process_alive(int(match.group(1))):
            path.unlink(missing_ok=True)
            removed.append(path)
    return sorted(removed)


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
