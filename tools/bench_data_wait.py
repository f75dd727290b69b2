"""The share of training-step time spent waiting for data, for a config and loader worker counts.

    python tools/bench_data_wait.py --config configs/demo.yaml --workers 0 2 --steps 30 \
        [--set data.root=/tmp/synthetic ...] [--json runs/data_wait.json]

Trains `--steps` steps (no validation, no checkpoints kept: the run goes to a temporary folder) once per
worker count and prints, for each, the share of the step's wall time spent between one training batch
and the next (`detr_lab.benchmark.data_wait.DataWait`). A share reads the same on a busy machine.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from detr_lab.benchmark.data_wait import DataWait
from detr_lab.benchmark.machine import describe_machine
from detr_lab.benchmark.report import write_report
from detr_lab.config import load_config
from detr_lab.engine.cli import add_common_arguments, run_tool
from detr_lab.engine.trainer import train


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="bench_data_wait.py", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="training config YAML")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2], help="data.num_workers values")
    parser.add_argument("--steps", type=int, default=30, help="training steps per run (default 30)")
    parser.add_argument("--skip", type=int, default=2, help="first batches left out (default 2)")
    parser.add_argument("--json", type=Path, default=Path("runs/data_wait.json"), help="report path")
    add_common_arguments(parser)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    def body() -> None:
        results = []
        for workers in args.workers:
            with tempfile.TemporaryDirectory() as run_dir:
                cfg = load_config(args.config, [
                    *args.overrides, f"data.num_workers={workers}", f"trainer.max_steps={args.steps}",
                    "trainer.max_epochs=1", "trainer.check_val_every_n_epoch=1000", "trainer.summary=false",
                    f"trainer.output_dir={run_dir}", "trainer.max_time_minutes=0",
                ])
                wait = DataWait(skip=args.skip)
                train(cfg, progress_bar=False, callbacks=[wait])
            result = {"num_workers": workers, **wait.summary()}
            results.append(result)
            print(f"num_workers {workers}: waiting for data {result['share']:.1%} of the step time "
                  f"({result['batches']} batches)", flush=True)
        report = {"config": args.config, "overrides": args.overrides, "machine": describe_machine("cpu"),
                  "results": results}
        print(json.dumps(results))
        print(f"report written to {write_report(report, args.json)}")

    return run_tool("bench_data_wait.py", body, debug=args.debug)


if __name__ == "__main__":
    sys.exit(main())
