"""Check a dataset against a config before training: `python tools/doctor.py --config X.yaml [--brief]`.

Reports on the train and val splits (categories and num_classes, empty images, degenerate or
out-of-image boxes, duplicate ids, objects per image against num_queries, image sizes and padding,
file sizes against the annotations, class balance) and suggests settings for small datasets.
Exit codes: 0 no blocking problem, 1 something would make training fail or silently wrong,
2 an invalid config or command line.
"""

from __future__ import annotations

import argparse
import sys

from detr_lab.engine.cli import (
    EXIT_FAILURE,
    add_common_arguments,
    add_print_config_argument,
    print_config,
    run_tool,
)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="doctor.py", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="YAML config giving the dataset and the model")
    parser.add_argument("--brief", action="store_true",
                        help="open a sample of the image files only (the check run when training starts)")
    parser.add_argument("--json", metavar="PATH", help="also write the findings as JSON")
    add_print_config_argument(parser)
    add_common_arguments(parser)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    found_errors = []

    def body() -> None:
        if args.print_config:
            print_config(args.config, args.overrides)
            return
        from detr_lab.config import load_config
        from detr_lab.data.doctor import diagnose

        report = diagnose(load_config(args.config, args.overrides), brief=args.brief)
        print(report.text())
        if args.json:
            print(f"findings written to {report.write_json(args.json)}")
        found_errors.extend(report.errors)

    code = run_tool("doctor.py", body, debug=args.debug)
    return EXIT_FAILURE if code == 0 and found_errors else code


if __name__ == "__main__":
    sys.exit(main())
