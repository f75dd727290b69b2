"""Convert an official DETR, Deformable DETR or DINO checkpoint into a detr_lab checkpoint.

    python tools/convert_checkpoint.py detr-r50-e632da11.pth detr_r50.pt
    python tools/convert_checkpoint.py detr-r101-dc5-a2e86def.pth detr_r101_dc5.pt --dilation
    python tools/convert_checkpoint.py r50_deformable_detr-checkpoint.pth deformable_detr_r50.pt
    python tools/convert_checkpoint.py checkpoint0011_4scale.pth dino_4scale_r50.pt

The architecture is read from the weights; pass what they cannot tell (--dilation for DC5 models,
--num-heads when not 8, --num-queries for the proposal count of a two-stage Deformable DETR; for
DINO it is checked against the weights).
"""

from __future__ import annotations

import argparse
import sys

from detr_lab.checkpoints import convert_official_checkpoint


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("src", help="official checkpoint (.pth)")
    parser.add_argument("dst", help="where to write the detr_lab checkpoint")
    parser.add_argument("--dilation", action="store_true", help="the model has a dilated last stage (DC5)")
    parser.add_argument("--num-heads", type=int, help="attention heads (default 8)")
    parser.add_argument(
        "--num-queries",
        type=int,
        help="expected query count (checked against the weights); for a two-stage Deformable DETR "
        "the proposals kept (default 300)",
    )
    parser.add_argument("--debug", action="store_true", help="show the full traceback on errors")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    overrides: dict = {}
    if args.dilation:
        overrides["dilation"] = True
    if args.num_heads is not None:
        overrides["num_heads"] = args.num_heads
    if args.num_queries is not None:
        overrides["num_queries"] = args.num_queries
    try:
        path = convert_official_checkpoint(args.src, args.dst, **overrides)
    except Exception as err:
        if args.debug:
            raise
        message = " ".join(str(err).split()) or type(err).__name__
        print(f"error: {message}", file=sys.stderr)
        return 1
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
