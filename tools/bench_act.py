"""Encoder self-attention cost of ACT (adaptive clustering) against plain attention.

Measures, for each number of hash rounds L and bucket width r, ACT's clusters, FLOPs, error and CPU
time against plain attention on one encoder self-attention call (synthetic tokens, a tokens file or
a trained checkpoint's encoder inputs), and optionally the COCO AP of a checkpoint with ACT swapped
in (`--ap`). `detr_lab.benchmark.act` describes every figure and input.

    python tools/bench_act.py --hashes 16 20 24 32 --bucket-width 1 4 --json runs/bench_act.json
    python tools/bench_act.py --checkpoint runs/demo_act_teacher/checkpoints/last.ckpt --threads 1 \
        --hashes 16 20 24 32 --bucket-width 1 2 4 \
        --ap --ap-set data.augment.eval_size=480 --ap-set data.augment.eval_max_size=800
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from detr_lab.benchmark.act import ActBenchError, ActBenchSettings, format_act_table, run
from detr_lab.benchmark.report import write_report


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="bench_act.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--hashes", type=int, nargs="+", default=[16, 20, 24, 32], help="values of L")
    parser.add_argument("--bucket-width", type=float, nargs="+", default=[1.0], help="values of r")
    parser.add_argument("--image-size", type=int, nargs=2, default=[800, 1066], metavar=("H", "W"))
    parser.add_argument("--stride", type=int, default=16, help="feature stride (16 = DC5)")
    parser.add_argument("--embed-dim", type=int, default=256)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0, help="seeds weights, synthetic tokens and hashing")
    parser.add_argument("--tokens", type=Path,
                        help="torch.save'd [B, HW, d] tensor or dict (detr_lab.benchmark.act)")  # fmt: skip
    parser.add_argument("--checkpoint", type=Path, help="trained model checkpoint (detr_lab.benchmark.act)")
    parser.add_argument("--config", type=Path, help="YAML giving the dataset (default: the checkpoint's)")
    parser.add_argument("--image", type=Path, help="image to run (default: the first val image)")
    parser.add_argument("--layer", type=int, default=0, help="encoder layer whose inputs are captured")
    parser.add_argument("--ap", action="store_true",
                        help="AP of plain vs ACT attention (detr_lab.benchmark.act)")  # fmt: skip
    parser.add_argument("--ap-hashes", type=int, nargs="+", help="L values of the AP sweep "
                        "(default --hashes)")  # fmt: skip
    parser.add_argument("--ap-bucket-width", type=float, nargs="+", help="r values of the AP sweep "
                        "(default --bucket-width)")  # fmt: skip
    parser.add_argument("--ap-batch-size", type=int, default=1, help="images per forward pass (AP sweep)")
    parser.add_argument("--ap-set", action="append", default=[], metavar="KEY=VALUE",
                        help="config override for every evaluation of the AP sweep, e.g. "
                        "data.augment.eval_size=480 (repeatable)")  # fmt: skip
    parser.add_argument("--field-size", type=int, default=8, help="synthetic: low-res field rows")
    parser.add_argument("--noise", type=float, default=0.1, help="synthetic: white-noise std")
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--json", type=Path, default=Path("runs/bench_act.json"), help="output JSON path")
    return parser.parse_args(argv)


def settings_from(args: argparse.Namespace) -> ActBenchSettings:
    """The parsed options as `ActBenchSettings` (same names; `--json` is `output`)."""
    names = [f.name for f in dataclasses.fields(ActBenchSettings) if f.name != "output"]
    values = {name: getattr(args, name) for name in names}
    return ActBenchSettings(**values, output=args.json)


def main(argv: list[str] | None = None) -> None:
    """Run the benchmark, print the table, write the JSON. Conflicting options exit with their message."""
    args = parse_args(argv)
    try:
        result = run(settings_from(args))
    except ActBenchError as err:
        raise SystemExit(f"bench_act.py: error: {err}") from None
    print(format_act_table(result))
    print(f"wrote {write_report(result, args.json)}", file=sys.stderr)


if __name__ == "__main__":
    main()
