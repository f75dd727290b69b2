"""The optional `export` extra (onnx, onnxruntime): imported only where it is needed."""

from __future__ import annotations

import importlib
from types import ModuleType

INSTALL_HINT = 'pip install -e ".[export]"'


class MissingExtraError(ImportError):
    """onnx or onnxruntime is not installed; the message says what to install."""


def require(name: str) -> ModuleType:
    """Import `name` ("onnx" or "onnxruntime"), or raise `MissingExtraError` naming the extra."""
    try:
        return importlib.import_module(name)
    except ImportError:
        raise MissingExtraError(
            f"'{name}' is not installed; ONNX export and onnxruntime inference need the export extra: "
            f"{INSTALL_HINT}"
        ) from None
