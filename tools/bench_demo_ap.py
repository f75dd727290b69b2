"""Benchmark: validation AP of CPU demos after 5, 10 and 15 minutes of training, config after config.

    python tools/bench_demo_ap.py [--config configs/demo.yaml configs/demo_dino.yaml ...]
                                  [--minutes 5 10 15] [--output-dir runs/bench_demo] [--set key=value ...]

Trains each config from scratch in turn (Lightning's per-epoch validation switched off) and, as soon
as the training time (wall clock since training started, minus the time spent evaluating) passes each
mark, evaluates the whole synthetic validation set with COCOeval and saves a checkpoint (under
`<output-dir>/<config name>/`). Stops after the last mark. Writes one `<output-dir>/demo_ap.csv` (a
row per config and mark) and one `<output-dir>/demo_ap.png` (AP against training minutes, a curve per
config). The default compares the current demo, the DINO demo and the current demo with denoising
only. A schedule given relative to the run (`optim.lr_drop_at`, ...) runs against `--schedule-minutes` of
training time (default: the config's `trainer.max_time_minutes`, which the marks replace; none when it
is 0). `cpu_minutes` is the CPU time the training process used (all its threads), which shows how
much of the wall time the machine actually gave it. Numbers depend on the machine and on what else
runs on it.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
from pathlib import Path

from detr_lab.engine.cli import add_common_arguments, run_tool
from detr_lab.files import atomic_write

DEFAULT_CONFIGS = ["configs/demo.yaml", "configs/demo_dino.yaml", "configs/demo_denoising.yaml"]
FIELDS = ("config", "mark_minutes", "train_minutes", "wall_minutes", "cpu_minutes", "epoch", "global_step",
          "AP", "AP50", "AP75", "APs", "APm", "APl", "AR100")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="bench_demo_ap.py", description=__doc__.splitlines()[0])
    parser.add_argument("--config", nargs="+", default=DEFAULT_CONFIGS, help="configs trained in turn")
    parser.add_argument("--minutes", type=float, nargs="+", default=[5.0, 10.0, 15.0], help="marks (minutes)")
    parser.add_argument("--output-dir", default="runs/bench_demo")
    parser.add_argument("--schedule-minutes", type=float, default=None,
                        help="time budget of relative LR schedules (default: each config's max_time_minutes)")
    add_common_arguments(parser)
    return parser.parse_args(argv)


def write_csv(runs: dict[str, list], path: Path) -> None:
    """One row per (config, mark); `runs` maps a config name to its `TimedEvaluation` records."""
    with atomic_write(path, "w") as file:
        writer = csv.writer(file)
        writer.writerow(FIELDS)
        for config, records in runs.items():
            for r in records:
                stats = [f"{r.stats[name]:.4f}" for name in FIELDS[7:]]
                times = [f"{r.train_minutes:.2f}", f"{r.wall_minutes:.2f}", f"{r.cpu_minutes:.2f}"]
                writer.writerow([config, f"{r.mark_minutes:g}", *times, r.epoch, r.global_step, *stats])


def write_plot(runs: dict[str, list], path: Path, title: str) -> None:
    """AP (solid) and AP50 (dashed) against training minutes, one colour per config."""
    from matplotlib.figure import Figure

    from detr_lab.visualize.curves import plot_ap
    from detr_lab.visualize.draw import save_figure

    rows = {name: [{"minutes": r.train_minutes, **r.stats} for r in runs[name]] for name in runs}
    figure = Figure(figsize=(7, 4.5), dpi=120)
    axes = figure.subplots()
    plot_ap(axes, rows, x="minutes", x_label="training time (minutes, evaluation excluded)", annotate=True)
    axes.set_ylabel("COCO box AP (synthetic val)")
    minutes = [row["minutes"] for config_rows in rows.values() for row in config_rows]
    axes.set_xlim(0, max(minutes) * 1.05 if minutes else 1)
    axes.set_title(title, fontsize=9)
    figure.tight_layout()
    save_figure(figure, path)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    def body() -> None:
        import torch

        from detr_lab.config import load_config
        from detr_lab.engine.callbacks import TimedEvaluation
        from detr_lab.engine.trainer import train

        output_dir = Path(args.output_dir)
        names = [Path(config).stem for config in args.config]
        if len(set(names)) != len(names):
            raise ValueError(f"--config: give configs with distinct file names, got {args.config}")
        configs, budgets = {}, {}
        for name, config in zip(names, args.config, strict=True):
            overrides = [
                *args.overrides,
                f"trainer.output_dir={output_dir / name}",
                "trainer.max_epochs=100000",  # the last mark stops training
                "trainer.check_val_every_n_epoch=100000",  # evaluation happens at the marks instead
                "trainer.max_time_minutes=0",  # the marks count training time, not the config's wall budget
                "trainer.summary=false",  # the marks' table and plot are this tool's summary
            ]
            configs[name] = load_config(config, overrides)  # every config checked before any training
            own_budget = load_config(config, args.overrides).trainer.max_time_minutes
            budgets[name] = args.schedule_minutes or own_budget
        runs: dict[str, list] = {}
        csv_path, png_path = output_dir / "demo_ap.csv", output_dir / "demo_ap.png"
        title = f"{os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}"
        for name, cfg in configs.items():
            timed = TimedEvaluation(args.minutes, checkpoint_dir=output_dir / name / "checkpoints",
                                    schedule_minutes=budgets[name] or None)
            train(cfg, callbacks=[timed], progress_bar=False)
            runs[name] = timed.records
            write_csv(runs, csv_path)  # after each config, so a stopped run keeps what it measured
            write_plot(runs, png_path, title)
            for r in timed.records:
                print(f"{name} {r.mark_minutes:g} min: AP {r.stats['AP']:.4f}  AP50 {r.stats['AP50']:.4f}  "
                      f"(epoch {r.epoch}, step {r.global_step}, training {r.train_minutes:.2f} min)")
        print(f"wrote {csv_path} and {png_path}")

    return run_tool("bench_demo_ap.py", body, debug=args.debug)


if __name__ == "__main__":
    sys.exit(main())
