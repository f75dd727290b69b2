"""A quiet console for training and evaluation: what Lightning and the libraries under it print that
tells a user nothing about their run is left out, once, when a trainer is built (`quiet_console`).

Left out:
- Lightning's device banner ("GPU available: ...", "TPU available: ...") and its advertising tips
  ("Tip: For seamless cloud ..."), which it logs through its rank-zero loggers;
- deprecation warnings that Lightning's own code raises against the installed torch (its pytree
  helpers' `LeafSpec`), which no setting of ours can avoid.

Everything else goes through: warnings about the run (`TrainingHealthWarning`), errors, and the
progress bar. `warning_line` formats a warning as one line without the file path and source line.
"""

from __future__ import annotations

import logging
import warnings

# Rank-zero loggers of Lightning (the pytorch package's and fabric's).
LIGHTNING_LOGGERS = ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero")
# Message beginnings dropped from those loggers.
NOISE_PREFIXES = ("GPU available:", "TPU available:", "HPU available:", "\N{ELECTRIC LIGHT BULB} Tip:")
# Deprecation warnings raised inside libraries, not by our calls (regular expressions of their messages).
LIBRARY_DEPRECATIONS = (r"`isinstance\(treespec, LeafSpec\)` is deprecated",)


class DropNoise(logging.Filter):
    """Drops log records whose message starts with one of `prefixes`."""

    def __init__(self, prefixes: tuple[str, ...] = NOISE_PREFIXES) -> None:
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.getMessage()).startswith(self.prefixes)


def quiet_console() -> None:
    """Install the filters described in the module docstring (idempotent)."""
    for name in LIGHTNING_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, DropNoise) for f in logger.filters):
            logger.addFilter(DropNoise())
    for message in LIBRARY_DEPRECATIONS:
        warnings.filterwarnings("ignore", message=message)


def warning_line(message, category, filename, lineno, line=None) -> str:
    """`warnings.formatwarning` replacement: `<Category>: <message>` on one line, without the path."""
    return f"{category.__name__}: {message}\n"
