"""COCO jsons from a YOLO dataset: `python tools/convert_dataset.py DATA.yaml --output-dir DIR`.

Writes `DIR/instances_<split>.json` for each split the data.yaml names (or only `--split`), with
`file_name`s relative to the dataset folder (the data.yaml's `path`) and category id = YOLO class
index. An invalid label line stops the conversion with its file, line and value (exit code 1).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from detr_lab.engine.cli import add_common_arguments, run_tool


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="convert_dataset.py", description=__doc__.splitlines()[0])
    parser.add_argument("data_yaml", help="the YOLO dataset's data.yaml")
    parser.add_argument("--output-dir", required=True, help="folder for instances_<split>.json")
    parser.add_argument("--split", choices=("train", "val"), help="convert this split only")
    add_common_arguments(parser, overrides=False)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    def body() -> None:
        from detr_lab.data.yolo import read_data_yaml, write_coco_json

        description = read_data_yaml(args.data_yaml)
        splits = [args.split] if args.split else list(description.splits)
        for split in splits:
            path = write_coco_json(args.data_yaml, split, Path(args.output_dir) / f"instances_{split}.json")
            print(f"{split}: {path} (images relative to {description.root})")

    return run_tool("convert_dataset.py", body, debug=args.debug)


if __name__ == "__main__":
    sys.exit(main())
