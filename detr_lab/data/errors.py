"""Exceptions of the data pipeline. Every message names the file, image id or key at fault.

They subclass ValueError and take a single message argument, so a DataLoader worker can re-raise
them in the main process with the message (and so the file name) intact.
"""

from __future__ import annotations


class DatasetError(ValueError):
    """A dataset file, image or annotation is missing or invalid."""


class MissingImageError(DatasetError):
    """An image file named by the annotations does not exist."""


class CorruptImageError(DatasetError):
    """An image file exists but cannot be decoded."""


class AnnotationWarning(UserWarning):
    """Annotations were repaired (degenerate boxes clipped or dropped, sizes disagreeing with the file)."""


class ClassMappingWarning(UserWarning):
    """A dataset's classes were matched to a model's by name, its own ids being different."""
