"""The optional `export` extra (onnx, onnxruntime): imported only where it is needed."""

from __future__ import annotations

import importlib
from types import ModuleType

from detr_lab.errors import MissingExtraError

__all__ = ["INSTALL_HINT", "MissingExtraError", "require"]

INSTALL_HINT = 'pip install -e ".[export]"'


def require(name: str) -> ModuleType:
    """Import `name` ("onnx" or "onnxruntime") and return the module.

    Raises:
        MissingExtraError (`detr_lab.errors`): the module is not installed; the message names the extra.
    """
    try:
        return importlib.import_module(name)
    except ImportError:
        raise MissingExtraError(
            f"'{name}' is not installed; ONNX export and onnxruntime inference need the export extra: "
            f"{INSTALL_HINT}"
        ) from None
