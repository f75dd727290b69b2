"""The library's own errors: what callers of detr_lab catch, and what the tools print as one line.

A leaf: standard library only, nothing from detr_lab, so that every package may raise these.

    DetrLabError                 base: the message is for the user and names the file or value at fault
      InputError(ValueError)     an argument or input value the library cannot take
      InputNotFoundError(FileNotFoundError)   a named input file (image, checkpoint, config, model)
      MissingExtraError(ImportError)          an optional dependency is absent; says what to install
    Interrupted(BaseException)   a run stopped by SIGINT / SIGTERM at a safe point

The built-in bases keep `except ValueError` / `except FileNotFoundError` / `except ImportError`
clauses working. Other errors of the library keep their homes beside their data: `ConfigError`
(`detr_lab.config`), `CheckpointError` and `FileWriteError` (`detr_lab.io`), `DatasetError` and its
subclasses (`detr_lab.data.errors`). The command-line layer (`detr_lab.engine.cli`) turns all of
them into one line and an exit code; the library itself never raises the tools' `ToolError`.
"""

from __future__ import annotations


class DetrLabError(Exception):
    """An error whose message alone tells the user what to fix (tools print it without a traceback)."""


class InputError(DetrLabError, ValueError):
    """An argument or input value out of its range, or one that does not fit the model (e.g. a
    `model.*` override given to an exported ONNX model); the message names the argument."""


class InputNotFoundError(DetrLabError, FileNotFoundError):
    """A file the caller named (image, folder, checkpoint, config, ONNX model) does not exist."""


class MissingExtraError(DetrLabError, ImportError):
    """An optional dependency (onnx, onnxruntime) is not installed; the message says what to install."""


class Interrupted(BaseException):
    """A run stopped by SIGINT or SIGTERM at a safe point; the message says what was saved and how to
    continue (tools exit with `EXIT_INTERRUPTED`).

    A BaseException, like KeyboardInterrupt, so that no `except Exception` swallows it; not a
    KeyboardInterrupt, because Lightning turns that into `sys.exit(1)`.
    """
