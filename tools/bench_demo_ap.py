"""Benchmark: validation AP of the CPU demo after 5, 10 and 15 minutes of training.

    python tools/bench_demo_ap.py [--config configs/demo.yaml] [--minutes 5 10 15]
                                  [--output-dir runs/bench_demo] [--set key=value ...]

Trains the config from scratch (Lightning's per-epoch validation switched off) and, as soon as the
training time (wall clock since training started, minus the time spent evaluating) passes each mark,
evaluates the whole synthetic validation set with COCOeval and saves a checkpoint. Stops after the
last mark. Writes `<output-dir>/demo_ap.csv` and `<output-dir>/demo_ap.png` (AP and AP50 against
training minutes). `cpu_minutes` is the CPU time the training process used (all its threads), which
shows how much of the wall time the machine actually gave it. Numbers depend on the machine and on
what else runs on it.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
from pathlib import Path

from detr_lab.engine.cli import add_common_arguments, run_tool

FIELDS = ("mark_minutes", "train_minutes", "wall_minutes", "cpu_minutes", "epoch", "global_step",
          "AP", "AP50", "AP75", "APs", "APm", "APl", "AR100")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="bench_demo_ap.py", description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/demo.yaml")
    parser.add_argument("--minutes", type=float, nargs="+", default=[5.0, 10.0, 15.0], help="marks (minutes)")
    parser.add_argument("--output-dir", default="runs/bench_demo")
    add_common_arguments(parser)
    return parser.parse_args(argv)


def write_csv(records, path: Path) -> None:
    with open(path, "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(FIELDS)
        for r in records:
            stats = [f"{r.stats[name]:.4f}" for name in FIELDS[6:]]
            writer.writerow([f"{r.mark_minutes:g}", f"{r.train_minutes:.2f}", f"{r.wall_minutes:.2f}",
                             f"{r.cpu_minutes:.2f}", r.epoch, r.global_step, *stats])


def write_plot(records, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    minutes = [r.train_minutes for r in records]
    figure, axes = plt.subplots(figsize=(6, 4))
    for name, style in (("AP", "o-"), ("AP50", "s--")):
        axes.plot(minutes, [r.stats[name] for r in records], style, label=name)
    for r in records:
        axes.annotate(f"{r.stats['AP']:.3f}", (r.train_minutes, r.stats["AP"]), textcoords="offset points",
                      xytext=(0, 6), ha="center", fontsize=8)
    axes.set_xlabel("training time (minutes, evaluation excluded)")
    axes.set_ylabel("COCO box AP (synthetic val)")
    axes.set_ylim(0, 1)
    axes.set_xlim(0, max(minutes) * 1.05 if minutes else 1)
    axes.grid(alpha=0.3)
    axes.legend()
    axes.set_title(title, fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    def body() -> None:
        import torch

        from detr_lab.config import load_config
        from detr_lab.engine.callbacks import TimedEvaluation
        from detr_lab.engine.trainer import train

        output_dir = Path(args.output_dir)
        overrides = [
            *args.overrides,
            f"trainer.output_dir={output_dir}",
            "trainer.max_epochs=100000",  # the last mark stops training
            "trainer.check_val_every_n_epoch=100000",  # evaluation happens at the marks instead
            "trainer.max_time_minutes=0",  # the marks count training time, not the config's wall budget
            "trainer.summary=false",  # the marks' table and plot are this tool's summary
        ]
        cfg = load_config(args.config, overrides)
        timed = TimedEvaluation(args.minutes, checkpoint_dir=output_dir / "checkpoints")
        train(cfg, callbacks=[timed], progress_bar=False)
        csv_path, png_path = output_dir / "demo_ap.csv", output_dir / "demo_ap.png"
        write_csv(timed.records, csv_path)
        title = f"{args.config}, {os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}"
        write_plot(timed.records, png_path, title)
        for r in timed.records:
            print(f"{r.mark_minutes:g} min: AP {r.stats['AP']:.4f}  AP50 {r.stats['AP50']:.4f}  "
                  f"(epoch {r.epoch}, step {r.global_step}, training {r.train_minutes:.2f} min)")
        print(f"wrote {csv_path} and {png_path}")

    return run_tool("bench_demo_ap.py", body, debug=args.debug)


if __name__ == "__main__":
    sys.exit(main())
