"""The optional `export` extra (onnx, onnxruntime, openvino, nncf, sahi): imported only where it is needed."""

from __future__ import annotations

import importlib
from types import ModuleType

from detr_lab.errors import MissingExtraError

__all__ = ["INSTALL_HINT", "MissingExtraError", "require"]

INSTALL_HINT = 'pip install -e ".[export]"'

# module -> what needs it (named in the error)
USES = {
    "onnx": "ONNX export",
    "onnxruntime": "onnxruntime inference and INT8 quantization for onnxruntime",
    "openvino": "OpenVINO conversion and inference (--format openvino, --backend openvino)",
    "nncf": "INT8 quantization for OpenVINO (NNCF post-training quantization)",
    "sahi": "sliced inference (--slice)",
}


def require(name: str) -> ModuleType:
    """Import `name` (a key of `USES`: "onnx", "onnxruntime", "openvino", "nncf", "sahi") and return it.

    Raises:
        MissingExtraError (`detr_lab.errors`): the module is not installed; the message names the extra.
    """
    try:
        return importlib.import_module(name)
    except ImportError:
        package = name.split(".")[0]
        raise MissingExtraError(
            f"'{package}' is not installed; {USES.get(package, 'this command')} needs the export extra: "
            f"{INSTALL_HINT} (or pip install {package})"
        ) from None
