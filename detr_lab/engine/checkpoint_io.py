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

import os
import re
from pathlib import Path
from typing import Any

from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from detr_lab.io import atomic_torch_save, safe_load

# Partial writes: `.<name>.<random>.tmp` of `detr_lab.files.atomic_write`, and `<name>.tmp-<pid>` of
# earlier versions of this writer.
_TEMPORARY = re.compile(r"^\..+\.tmp$")
_TEMPORARY_WITH_PID = re.compile(r".+\.tmp-(\d+)$")


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _files_open_on_this_machine() -> set[str] | None:
    """Paths held open by any process (from /proc); None where /proc cannot tell."""
    proc = Path("/proc")
    if not (proc / "self" / "fd").is_dir():
        return None
    held: set[str] = set()
    for fd_dir in proc.glob("[0-9]*/fd"):
        try:
            entries = list(fd_dir.iterdir())
        except OSError:  # gone, or another user's process
            continue
        for entry in entries:
            try:
                held.add(os.readlink(entry))
            except OSError:
                continue
    return held


def remove_stale_temporaries(directory: str | os.PathLike) -> list[Path]:
    """Delete partial checkpoint writes left in `directory` by processes killed mid-write (kill -9);
    return the deleted paths. A `<name>.tmp-<pid>` file goes when its process no longer runs; a
    `.<name>.<random>.tmp` file when no process on this machine holds it open (Linux /proc; elsewhere
    these are left alone). Files being written are never touched."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    candidates = [path for path in directory.iterdir() if path.is_file()]
    held = None
    removed = []
    for path in candidates:
        with_pid = _TEMPORARY_WITH_PID.fullmatch(path.name)
        if with_pid:
            stale = not _process_alive(int(with_pid.group(1)))
        elif _TEMPORARY.fullmatch(path.name):
            held = _files_open_on_this_machine() if held is None else held
            stale = held is not None and str(path.resolve()) not in held
        else:
            continue
        if stale:
            path.unlink(missing_ok=True)
            removed.append(path)
    return sorted(removed)


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
