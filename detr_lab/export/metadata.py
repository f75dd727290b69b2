"""What an exported ONNX file carries besides the graph: classes, category ids, the model config.

Stored as ONNX `metadata_props` (string key -> JSON value), so an `.onnx` file alone is enough to
predict: the config gives the evaluation transform and the post-processing, the classes name the
detections. Keys: `detr_lab.format` ("detr_lab-onnx"), `detr_lab.version` (1), `detr_lab.category_ids`,
`detr_lab.class_names`, `detr_lab.config`, `detr_lab.traced_size` ([B, H, W], or null when dynamic).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass

from detr_lab.config import Config, config_from_dict, config_to_dict

FORMAT_NAME = "detr_lab-onnx"
FORMAT_VERSION = 1
PREFIX = "detr_lab."


class MetadataError(ValueError):
    """An ONNX file without (or with broken) detr_lab metadata."""


@dataclass
class ExportMetadata:
    """Class metadata and config of an exported model (class index -> category id / name)."""

    category_ids: list[int]
    class_names: list[str]
    config: Config
    traced_size: tuple[int, int, int] | None = None  # (B, H, W) of a fixed-size export, None if dynamic

    @classmethod
    def from_loaded(cls, loaded) -> ExportMetadata:
        """From a `detr_lab.checkpoints.LoadedCheckpoint`."""
        return cls(list(loaded.category_ids), list(loaded.class_names), loaded.config)

    def store(self, proto, *, traced_size: Sequence[int] | None) -> None:
        """Write the metadata into an `onnx.ModelProto` (replacing earlier detr_lab entries)."""
        values = {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "category_ids": [int(i) for i in self.category_ids],
            "class_names": [str(n) for n in self.class_names],
            "config": config_to_dict(self.config),
            "traced_size": None if traced_size is None else [int(v) for v in traced_size],
        }
        kept = [p for p in proto.metadata_props if not p.key.startswith(PREFIX)]
        del proto.metadata_props[:]
        proto.metadata_props.extend(kept)
        for key, value in values.items():
            entry = proto.metadata_props.add()
            entry.key, entry.value = PREFIX + key, json.dumps(value)

    @classmethod
    def from_properties(cls, properties: dict[str, str], source: str) -> ExportMetadata:
        """Read back from a key -> value map (`onnxruntime` `custom_metadata_map`, or the proto's).

        Raises:
            MetadataError: naming `source` and the missing or invalid key.
        """

        def read(key: str):
            if PREFIX + key not in properties:
                raise MetadataError(
                    f"{source}: no '{PREFIX}{key}' metadata; not a model written by detr_lab's export"
                )
            try:
                return json.loads(properties[PREFIX + key])
            except json.JSONDecodeError as err:
                raise MetadataError(f"{source}: metadata '{PREFIX}{key}' is not JSON ({err})") from None

        if read("format") != FORMAT_NAME or read("version") != FORMAT_VERSION:
            raise MetadataError(
                f"{source}: metadata format {read('format')!r} version {read('version')!r}; "
                f"this code reads {FORMAT_NAME!r} version {FORMAT_VERSION}"
            )
        config = config_from_dict(read("config"), f"{source} (metadata config)")
        category_ids, class_names = read("category_ids"), read("class_names")
        if not (len(category_ids) == len(class_names) == config.model.num_classes):
            raise MetadataError(
                f"{source}: {len(category_ids)} category ids and {len(class_names)} class names for "
                f"num_classes={config.model.num_classes}"
            )
        traced = read("traced_size")
        return cls([int(i) for i in category_ids], [str(n) for n in class_names], config,
                   None if traced is None else tuple(int(v) for v in traced))
