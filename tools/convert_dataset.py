"""COCO jsons from a YOLO dataset: `python tools/convert_dataset.py DATA.yaml --output-dir DIR`.

Writes `DIR/instances_<split>.json` for each split the data.yaml names (or only `--split`), with
`file_name`s relative to the dataset folder (the data.yaml's `path`) and category id = YOLO class
index. An invalid label line stops the conversion with its file, line and value (exit code 1).

Then prints the `--set` overrides that train on the converted files, and with `--write-config FILE`
writes a config that trains as is: `--base` (default configs/demo.yaml) with the data section and
`model.num_classes` of the converted set.

    python tools/convert_dataset.py set/data.yaml --output-dir set/coco --write-config set.yaml
    python tools/train.py --config set.yaml
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from detr_lab.engine.cli import ToolError, add_common_arguments, run_tool

DEFAULT_BASE = Path(__file__).resolve().parent.parent / "configs" / "demo.yaml"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="convert_dataset.py", description=__doc__.splitlines()[0])
    parser.add_argument("data_yaml", help="the YOLO dataset's data.yaml")
    parser.add_argument("--output-dir", required=True, help="folder for instances_<split>.json")
    parser.add_argument("--split", choices=("train", "val"), help="convert this split only")
    parser.add_argument("--write-config", metavar="FILE",
                        help="write a training config for the converted set")
    parser.add_argument("--base", default=str(DEFAULT_BASE),
                        help="the config --write-config builds on (default configs/demo.yaml)")
    add_common_arguments(parser, overrides=False)
    return parser.parse_args(argv)


def training_overrides(root: Path, annotations: dict[str, Path], num_classes: int) -> list[str]:
    """The `--set` overrides that train on converted COCO files: images relative to the dataset folder
    `root`, the annotation file of each split, the class count."""
    overrides = ["data.dataset=coco", "data.format=coco", f"data.root={root.resolve()}"]
    for split, path in annotations.items():
        overrides += [f"data.{split}_images=.", f"data.{split}_annotations={path.resolve()}"]
    return [*overrides, f"model.num_classes={num_classes}"]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    def body() -> None:
        from detr_lab.config import load_config, save_config
        from detr_lab.data.yolo import read_data_yaml, write_coco_json

        description = read_data_yaml(args.data_yaml)
        splits = [args.split] if args.split else list(description.splits)
        written = {}
        for split in splits:
            path = write_coco_json(args.data_yaml, split, Path(args.output_dir) / f"instances_{split}.json")
            written[split] = path
            print(f"{split}: {path} (images relative to {description.root})")
        overrides = training_overrides(description.root, written, len(description.names))
        print("train on it with: python tools/train.py --config CONFIG " +
              " ".join(f"--set {item}" for item in overrides))
        if args.write_config:
            if set(written) != {"train", "val"}:
                raise ToolError("--write-config needs both splits converted (leave out --split)")
            name = Path(args.write_config).stem
            cfg = load_config(args.base, [*overrides, f"trainer.output_dir=runs/{name}"])
            print(f"config written to {save_config(cfg, args.write_config)}; "
                  f"train with: python tools/train.py --config {args.write_config}")

    return run_tool("convert_dataset.py", body, debug=args.debug)


if __name__ == "__main__":
    sys.exit(main())
