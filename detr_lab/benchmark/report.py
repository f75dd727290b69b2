"""The one report writer and table layout of the benchmarks.

A report is a JSON-serializable dict holding at least `machine` (`describe_machine`); it is written
atomically through `detr_lab.io`. Tables are plain text: left-aligned columns, a dashed rule under
the header.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

from detr_lab.io import atomic_write_text


def format_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Columns padded to their widest cell, a dashed rule under `header`.

    Raises:
        ValueError: a row with another number of cells than `header`.
    """
    for row in rows:
        if len(row) != len(header):
            raise ValueError(f"table row {list(row)} has {len(row)} cells; the header has {len(header)}")
    table = [tuple(header), *(tuple(row) for row in rows)]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)) for row in table]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(line.rstrip() for line in lines)


def write_report(report: dict, path: str | os.PathLike) -> Path:
    """Write `report` as indented JSON (atomically) and return the path.

    Raises:
        FileWriteError: the file cannot be written (the message names the path and the reason).
    """
    return atomic_write_text(path, json.dumps(report, indent=2))
