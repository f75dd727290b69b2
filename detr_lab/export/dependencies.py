"""The optional `export` extra (onnx, onnxruntime): imported only where it is needed."""

from __future__ import annotations

import importlib
from types import ModuleType

from detr_lab.engine.cli import ToolError

INSTALL_HINT = 'pip install -e ".[export]"'


class MissingExtraError(ToolError):
    """onnx or onnxruntime is not installed; the message says what to install (tools print it as is)."""


def require(name: str) -> ModuleType:
    """Import `name` ("onnx" or "onnxruntime"), or raise `MissingExtraError` naming the extra."""
    try:
        return importlib.import_module(name)
    except ImportError:
        raise MissingExtraError(
            f"'{name}' is not installed; ONNX export and onnxruntime inference need the export extra: "
            f"{INSTALL_HINT}"
        ) from None
