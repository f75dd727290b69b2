"""Importing the builders the part tables name as "module:function" (attention variants, necks, query
sources), when the first part of that kind is built. Standard library only, so the pure-data tables
that `detr_lab.config` reads stay free of torch."""

from __future__ import annotations

import importlib
from typing import Any


def import_builder(reference: str, what: str) -> Any:
    """The function a table names as "module:function".

    Raises:
        ValueError: it cannot be imported (the message names `what` and the reference).
    """
    module_name, _, function_name = reference.partition(":")
    try:
        return getattr(importlib.import_module(module_name), function_name)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"{what}: cannot import its builder {reference!r}: {err}") from None
