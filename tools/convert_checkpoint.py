"""Convert an official checkpoint (DETR, Deformable DETR, DINO, RT-DETR, D-FINE, DEIM) to detr_lab's.

    python tools/convert_checkpoint.py detr-r50-e632da11.pth detr_r50.pt
    python tools/convert_checkpoint.py detr-r101-dc5-a2e86def.pth detr_r101_dc5.pt --dilation
    python tools/convert_checkpoint.py r50_deformable_detr-checkpoint.pth deformable_detr_r50.pt
    python tools/convert_checkpoint.py checkpoint0011_4scale.pth dino_4scale_r50.pt
    python tools/convert_checkpoint.py rtdetrv2_r18vd_120e_coco_rerun_48.1.pth rtdetrv2_r18vd.pt
    python tools/convert_checkpoint.py rtdetrv2_r18vd_dsp_3x_coco.pth r18vd_dsp.pt --sampling discrete
    python tools/convert_checkpoint.py dfine_n_coco.pth dfine_n.pt
    python tools/convert_checkpoint.py deim_dfine_hgnetv2_n_coco_160e.pth deim_dfine_n.pt --recipe deim

The architecture is read from the weights; pass what they cannot tell (--dilation for DC5 models,
--num-heads when not 8, --num-queries for the proposal count of a two-stage Deformable DETR; for
DINO it is checked against the weights; RT-DETR: the query count, default 300), --sampling discrete
for RT-DETRv2's `_dsp` models, --eval-layers for the decoder layers RT-DETR runs in evaluation, and
--recipe deim for DEIM-D-FINE checkpoints (D-FINE's key layout; SiLU heads and the MAL loss).
"""

from __future__ import annotations

import argparse
import sys

from detr_lab.checkpoints import convert_official_checkpoint
from detr_lab.engine.cli import check_not_an_input


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
    parser.add_argument("--recipe", choices=("dfine", "deim"),
                        help="D-FINE family: deim for DEIM-D-FINE checkpoints (SiLU heads, MAL loss), "
                        "which the weights do not distinguish (default dfine)")
    parser.add_argument("--sampling", choices=("default", "discrete"),
                        help="RT-DETRv2: the decoder's sampling method (the _dsp models: discrete)")
    parser.add_argument("--eval-layers", type=int,
                        help="RT-DETR: decoder layers run in evaluation (default: all; R50-m: 3)")
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
    if args.sampling is not None:
        overrides["sampling"] = args.sampling
    if args.eval_layers is not None:
        overrides["eval_layers"] = args.eval_layers
    if args.recipe is not None:
        overrides["recipe"] = args.recipe
    try:
        check_not_an_input(args.dst, {"src": args.src}, option="dst")
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
