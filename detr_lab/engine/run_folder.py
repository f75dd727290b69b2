"""A training run owns its folder: one run at a time, and a new run never writes over an earlier one's.

    with claim_run_folder(output_dir, resuming_from=ckpt_path):   # InputError when it may not start
        trainer.fit(...)

Two rules, checked before anything is written into `trainer.output_dir`:

- **A lock.** `<output_dir>/.run.lock` is locked (`fcntl.flock`, exclusive, released by the operating
  system when the process ends, also on kill -9) for as long as the run lasts. A second run started
  on the same folder stops at once, naming the process that holds it. Where `fcntl` is missing
  (Windows) only the second rule applies.
- **No silent replacement.** A new run (no `--resume`, or `--resume auto` with no `last.ckpt`) refuses a
  folder whose `checkpoints/` already holds checkpoints, and so does a run resumed from a checkpoint of
  another folder: the message names the folder and the way out (`--resume auto` to continue that run,
  or another `trainer.output_dir`). Folders are not versioned behind the user's back: the folder
  named in the config is the folder the run writes.

Under DDP only the global-rank-0 process takes the lock (the other ranks of the same run write into
the same folder); every rank checks the folder, so they stop together.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from lightning.pytorch.utilities import rank_zero_only

from detr_lab.errors import InputError

try:
    import fcntl
except ImportError:  # Windows: no advisory locks here
    fcntl = None

LOCK_FILE = ".run.lock"
CHECKPOINT_SUFFIX = ".ckpt"


def earlier_checkpoints(checkpoint_dir: str | os.PathLike) -> list[Path]:
    """The checkpoint files (`*.ckpt`, not the partial `.*.tmp` writes) in `checkpoint_dir`, sorted."""
    directory = Path(checkpoint_dir)
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.iterdir()
                  if p.is_file() and p.suffix == CHECKPOINT_SUFFIX and not p.name.startswith("."))


def check_may_start(output_dir: str | os.PathLike, checkpoint_dir: str | os.PathLike,
                    resuming_from: str | os.PathLike | None) -> None:
    """Refuse a run that would write over the checkpoints of an earlier run in `output_dir`.

    Args:
        resuming_from: the checkpoint the run resumes, or None for a new run. Resuming a checkpoint of
            `checkpoint_dir` itself continues that run and is allowed.
    Raises:
        InputError: `checkpoint_dir` holds checkpoints and the run is new, or resumes a checkpoint of
            another folder; the message names the folder, what it holds and the two ways out.
    """
    found = earlier_checkpoints(checkpoint_dir)
    if not found:
        return
    if resuming_from is not None and Path(resuming_from).resolve().parent == Path(checkpoint_dir).resolve():
        return
    names = ", ".join(p.name for p in found[:3]) + (f" and {len(found) - 3} more" if len(found) > 3 else "")
    how = "continue that run with --resume auto" if any(p.name == "last.ckpt" for p in found) else (
        "move those files away")
    if resuming_from is None:
        start = "a new run"
    else:
        start = f"resuming {resuming_from} (a checkpoint of another folder)"
    raise InputError(
        f"trainer.output_dir {output_dir} holds the checkpoints of an earlier run ({names}) and {start} "
        f"would write over them; {how}, or set trainer.output_dir to a new folder"
    )


def _holder(lock_path: Path) -> str:
    try:
        text = lock_path.read_text().strip()
    except OSError:
        text = ""
    return f" ({text})" if text else ""


@contextmanager
def lock_run_folder(output_dir: str | os.PathLike) -> Iterator[Path | None]:
    """Hold an exclusive lock on `<output_dir>/.run.lock` while inside (the folder is created).

    Yields the lock file's path (None where `fcntl` is missing). The file keeps the holder's pid, host
    and start time, for the message a second run gets.
    Raises:
        InputError: another process holds the lock; the message names it and the way out.
    """
    directory = Path(output_dir)
    if fcntl is None:
        yield None
        return
    directory.mkdir(parents=True, exist_ok=True)
    lock_path = directory / LOCK_FILE
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise InputError(
                f"trainer.output_dir {directory} is in use by another training run{_holder(lock_path)}; "
                "wait for it to end, or set trainer.output_dir to another folder"
            ) from None
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime())
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}, since {started}\n".encode(), 0)
        try:
            yield lock_path
        finally:
            os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


@contextmanager
def claim_run_folder(output_dir: str | os.PathLike, checkpoint_dir: str | os.PathLike,
                     resuming_from: str | os.PathLike | None) -> Iterator[None]:
    """`lock_run_folder` (global rank 0 only), then `check_may_start`, for the whole `with` block.

    The check runs under the lock, so two runs started together cannot both pass it.
    Raises:
        InputError: see `lock_run_folder` and `check_may_start`.
    """
    if rank_zero_only.rank == 0:
        with lock_run_folder(output_dir):
            check_may_start(output_dir, checkpoint_dir, resuming_from)
            yield
    else:
        check_may_start(output_dir, checkpoint_dir, resuming_from)
        yield
