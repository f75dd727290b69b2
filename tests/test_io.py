"""detr_lab.io: the one atomic writer, safe loading, the state-dict diff, and the errors they raise.

Write failures are injected by monkeypatching, because the tests run as root on one filesystem: a
full disk cannot be had without a tiny tmpfs (not available here), and chmod does not stop root from
writing into a read-only or forbidden folder. Each injected `OSError` carries the errno the
operating system would give (ENOSPC, EROFS, EACCES).
"""

from __future__ import annotations

import errno
import io
import json
import os
import re
from pathlib import Path

import pytest
import torch
from PIL import Image

from detr_lab.checkpoints import load_checkpoint, save_checkpoint
from detr_lab.config import load_config, save_config
from detr_lab.engine.checkpoint_io import AtomicCheckpointIO
from detr_lab.engine.cli import run_tool
from detr_lab.engine.evaluator import CocoEvaluator
from detr_lab.io import (
    CheckpointError,
    FileWriteError,
    atomic_torch_save,
    atomic_write,
    atomic_write_text,
    diff_state_dicts,
    safe_load,
)
from detr_lab.models.build import build_model
from detr_lab.visualize.draw import save_picture

from factories import tiny_overrides

TINY = tiny_overrides(decoder__num_layers=1, num_queries=4, num_classes=2)


class SomeClass:
    pass


class _RunsCode:
    def __reduce__(self):
        return (os.getcwd, ())


def _os_error(code: int) -> OSError:
    return OSError(code, os.strerror(code))


def _leftovers(folder: Path, keep: set[str]) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name not in keep)


# ------------------------------------------------------------------------------- atomic writer
def test_atomic_write_replaces_whole_file_and_leaves_nothing_else(tmp_path):
    target = tmp_path / "new" / "folder" / "a.txt"
    assert atomic_write_text(target, "first") == target
    atomic_write_text(target, "second")
    assert target.read_text() == "second"
    atomic_torch_save({"w": torch.arange(4)}, tmp_path / "t.pt")
    assert torch.equal(safe_load(tmp_path / "t.pt")["w"], torch.arange(4))
    assert _leftovers(target.parent, {"a.txt"}) == []
    with pytest.raises(ValueError, match="mode must be 'wb' or 'w', got 'a'"):
        with atomic_write(target, "a"):
            pass


def test_failed_write_keeps_previous_file_and_removes_temporary(tmp_path):
    target = tmp_path / "a.txt"
    atomic_write_text(target, "previous")
    with pytest.raises(FileWriteError, match=rf"^cannot write {re.escape(str(target))}: No space left"):
        with atomic_write(target, "w") as file:
            file.write("half")
            raise _os_error(errno.ENOSPC)
    assert target.read_text() == "previous"
    assert _leftovers(tmp_path, {"a.txt"}) == []


@pytest.mark.parametrize(
    ("code", "reason"),
    [(errno.ENOSPC, "No space left on device"), (errno.EROFS, "Read-only file system"),
     (errno.EACCES, "Permission denied")],
)
def test_every_writer_fsyncs_and_names_path_and_cause(tmp_path, monkeypatch, code, reason):
    """Checkpoints, training checkpoints, configs and COCO results all go through the one writer:
    an fsync failing with `code` (as on a full or read-only disk) surfaces as "cannot write <path>:
    <reason>", and the file written before stays intact."""
    cfg = load_config(overrides=TINY)
    model = build_model(cfg.model)
    evaluator = CocoEvaluator(None, [1, 2])  # writing results needs no ground truth
    evaluator.results = {1: [{"image_id": 1, "category_id": 1, "bbox": [0, 0, 1, 1], "score": 0.5}]}
    writers = {
        "model.pt": lambda path: save_checkpoint(path, model, cfg, [1, 2], ["a", "b"]),
        "last.ckpt": lambda path: AtomicCheckpointIO().save_checkpoint({"epoch": 1}, path),
        "config.yaml": lambda path: save_config(cfg, path),
        "results.json": lambda path: evaluator.write_results(path),
    }
    for name, write in writers.items():
        write(tmp_path / name)
    before = {name: (tmp_path / name).read_bytes() for name in writers}

    real_fsync, synced = os.fsync, []

    def failing_fsync(fd):
        synced.append(fd)
        raise _os_error(code)

    monkeypatch.setattr(os, "fsync", failing_fsync)
    for name, write in writers.items():
        synced.clear()
        path = tmp_path / name
        with pytest.raises(FileWriteError) as failure:
            write(path)
        assert synced, f"{name}: written without fsync"
        assert str(failure.value) == f"cannot write {path}: {reason}"
        assert failure.value.errno == code and failure.value.filename == str(path)
        assert path.read_bytes() == before[name]
    monkeypatch.setattr(os, "fsync", real_fsync)
    assert _leftovers(tmp_path, set(writers)) == []
    assert json.loads((tmp_path / "results.json").read_text())[0]["image_id"] == 1


class _DiskFullFile(io.RawIOBase):
    """A writable file that takes `room` bytes and then fails as a full disk does."""

    def __init__(self, room: int) -> None:
        self.room = room

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        if len(data) > self.room:
            raise _os_error(errno.ENOSPC)
        self.room -= len(data)
        return len(data)


def test_disk_full_inside_torch_serializer_names_path_and_cause(tmp_path, monkeypatch, capsys):
    """torch turns a failed write into "[enforce fail at inline_container.cc] unexpected pos"; the
    error and the tools' one-line message must give the path and "No space left on device" instead."""
    cfg = load_config(overrides=TINY)
    model = build_model(cfg.model)
    path = save_checkpoint(tmp_path / "model.pt", model, cfg, [1, 2], ["a", "b"])
    before = path.read_bytes()
    real_save = torch.save

    def save_onto_full_disk(obj, f, *args, **kwargs):
        real_save(obj, _DiskFullFile(room=512), *args, **kwargs)

    monkeypatch.setattr(torch, "save", save_onto_full_disk)
    with pytest.raises(FileWriteError) as failure:
        save_checkpoint(path, model, cfg, [1, 2], ["a", "b"])
    assert str(failure.value) == f"cannot write {path}: No space left on device"
    assert "inline_container" not in str(failure.value)
    assert path.read_bytes() == before and _leftovers(tmp_path, {"model.pt"}) == []

    code = run_tool("train.py", lambda: save_checkpoint(path, model, cfg, [1, 2], ["a", "b"]), debug=False)
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1
    assert f"cannot write {path}: No space left on device" in err


# -------------------------------------------------------------------------------- safe loading
def test_refused_globals_are_named_not_called_corrupt(tmp_path):
    """A payload naming a forbidden global is refused (and says which), whatever wording torch uses:
    an unknown class ("Unsupported global") and a function of a blocked module ("... is blocked")."""
    for name, payload, culprit in [
        ("object.pt", {"x": SomeClass()}, f"{__name__}.SomeClass"),
        ("blocked.pt", {"x": _RunsCode()}, "posix.getcwd"),
    ]:
        path = tmp_path / name
        torch.save(payload, path)
        for load in (safe_load, load_checkpoint, AtomicCheckpointIO().load_checkpoint):
            with pytest.raises(CheckpointError) as refused:
                load(path)
            message = str(refused.value)
            assert message.startswith(f"{path}: refused: ") and f"unsafe global {culprit}" in message
            assert "corrupt" not in message and "weights_only" not in message


def test_argparse_namespace_is_allowed_and_not_reported(tmp_path):
    path = tmp_path / "args.pt"
    torch.save({"args": __import__("argparse").Namespace(lr=1.0), "x": SomeClass()}, path)
    with pytest.raises(CheckpointError) as refused:
        safe_load(path)
    assert "SomeClass" in str(refused.value) and "Namespace" not in str(refused.value)


# --------------------------------------------------------------------------- state-dict diff
def test_diff_state_dicts_lists_each_kind_of_difference():
    expected = {"a": torch.zeros(2), "b": torch.zeros(3), "c": torch.zeros(1, 4)}
    given = {"a": torch.ones(2), "c": torch.ones(4, 1), "extra": torch.ones(1)}
    diff = diff_state_dicts(expected, given)
    assert diff.matched == ["a"] and diff.missing == ["b"] and diff.unexpected == ["extra"]
    assert diff.mismatched == [("c", (4, 1), (1, 4))] and not diff.exact
    assert diff.summary() == (
        "1 missing (e.g. b); 1 unexpected (e.g. extra); "
        "1 with a different shape (e.g. c: (4, 1) vs model (1, 4))"
    )
    assert diff_state_dicts(expected, expected).exact


def test_other_errors_pass_through_and_leave_no_temporary(tmp_path):
    target = tmp_path / "a.txt"
    with pytest.raises(KeyError, match="not an I/O error"):
        with atomic_write(target, "w") as file:
            file.write("x")
            raise KeyError("not an I/O error")
    assert not target.exists() and _leftovers(tmp_path, set()) == []


@pytest.mark.parametrize("umask", [0o022, 0o007])
def test_written_files_follow_the_umask(tmp_path, umask):
    """Checkpoints, training checkpoints, configs, results and pictures are created 0o666 less the umask,
    as `open()` creates files (a temporary file of `tempfile.mkstemp` is 0600 whatever the umask)."""
    cfg = load_config(overrides=TINY)
    model = build_model(cfg.model)
    writers = {
        "model.pt": lambda path: save_checkpoint(path, model, cfg, [1, 2], ["a", "b"]),
        "last.ckpt": lambda path: AtomicCheckpointIO().save_checkpoint({"epoch": 1}, path),
        "config.yaml": lambda path: save_config(cfg, path),
        "detections.json": lambda path: atomic_write_text(path, "{}"),
        "example.jpg": lambda path: save_picture(Image.new("RGB", (4, 3)), path),
    }  # the ONNX exporter writes through atomic_write too
    previous = os.umask(umask)
    try:
        for name, write in writers.items():
            write(tmp_path / name)
            (tmp_path / f"plain-{name}").write_bytes(b"")  # what any other program would create
    finally:
        os.umask(previous)
    modes = {name: (tmp_path / name).stat().st_mode & 0o777 for name in writers}
    assert modes == {name: 0o666 & ~umask for name in writers}
    assert all((tmp_path / f"plain-{name}").stat().st_mode & 0o777 == 0o666 & ~umask for name in writers)
