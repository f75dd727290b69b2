"""Atomic file writes (standard library only): the one writer for checkpoints, configs and reports.

    with atomic_write("runs/x/config.yaml", "w") as f:  # temporary file, fsync, rename
        f.write(text)
    atomic_write_text("runs/x/results.json", text)

A write that fails (disk full, read-only folder, no permission) raises `FileWriteError` "cannot
write <path>: <reason>", also where the failure surfaced inside a serializer as a wrapper error
(torch reports a failed write as "[enforce fail at inline_container.cc] unexpected pos"; the
`OSError` it hides is found in the exception chain). The destination keeps its previous content
until the rename, which POSIX makes atomic within one filesystem.

This module imports only the standard library, so `detr_lab.config` can write through it without
importing torch; `detr_lab.io` re-exports it beside the torch-specific reading and saving.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO


class FileWriteError(OSError):
    """Writing a file failed; the message names the path and the operating system's reason.

    `errno`, `strerror` and `filename` are those of the underlying `OSError`.
    """

    def __init__(self, path: str | os.PathLike, cause: OSError) -> None:
        super().__init__(cause.errno, cause.strerror or str(cause), str(path))
        self.message = f"cannot write {path}: {cause.strerror or cause}"

    def __str__(self) -> str:
        return self.message


# ------------------------------------------------------------------------------------ writing
def _os_error_in_chain(err: BaseException) -> OSError | None:
    """The first `OSError` among `err`, its cause and its context (torch wraps failed writes)."""
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        if isinstance(current, OSError):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


def _fsync_directory(directory: Path) -> None:
    """Make a rename inside `directory` durable (no-op where directories cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _create_temporary(folder: Path, name: str) -> tuple[int, str]:
    """Create and open `.<name>.<random>.tmp` in `folder` (exclusive create), returning (fd, path).

    The file is created with mode 0o666 less the process umask, as `open()` creates any file (a
    `tempfile.mkstemp` file is 0600 whatever the umask, which kept checkpoints, configs, pictures and
    ONNX files of a shared run unreadable for the rest of the group).
    """
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)
    for _ in range(100):
        candidate = folder / f".{name}.{secrets.token_hex(6)}.tmp"
        try:
            return os.open(candidate, flags, 0o666), str(candidate)
        except FileExistsError:
            continue
    raise FileExistsError(f"no free temporary name for {folder / name}")


@contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb", *, encoding: str = "utf-8") -> Iterator[IO]:
    """Open a temporary file beside `path`; on success flush, fsync and rename it onto `path`.

    The temporary file (`.<name>.<random>.tmp` in the destination folder, so the rename stays on one
    filesystem) is removed on any failure, and `path` keeps its previous content. Missing parent
    folders are created. The new file's mode follows the umask (0o666 less it), like any file `open()`
    creates.

    Args:
        mode: "wb" (bytes) or "w" (text, in `encoding`).
    Raises:
        FileWriteError: the folder, the temporary file, the write, the fsync or the rename failed; the
            message names `path` and the operating system's reason (e.g. "No space left on device",
            "Read-only file system", "Permission denied").
        ValueError: a mode other than "wb" or "w".
    """
    if mode not in ("wb", "w"):
        raise ValueError(f"atomic_write: mode must be 'wb' or 'w', got {mode!r}")
    path = Path(path)
    tmp_name: str | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, tmp_name = _create_temporary(path.parent, path.name)
        with open(handle, mode, encoding=None if "b" in mode else encoding) as file:
            yield file
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp_name, path)
        tmp_name = None
        _fsync_directory(path.parent)
    except (OSError, RuntimeError) as err:  # RuntimeError: torch's wrapper around a failed write
        cause = _os_error_in_chain(err)
        if cause is not None and not isinstance(cause, FileWriteError):
            raise FileWriteError(path, cause) from err
        raise
    finally:
        if tmp_name is not None:
            Path(tmp_name).unlink(missing_ok=True)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write `text` (UTF-8) to `path` through `atomic_write`; returns `path`. Raises `FileWriteError`."""
    with atomic_write(path, "w") as file:
        file.write(text)
    return Path(path)
