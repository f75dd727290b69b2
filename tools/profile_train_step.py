"""Where a training step's time goes: forward parts, matcher, loss terms, backward, optimizer, Lightning.

    python tools/profile_train_step.py --config configs/detr_r50.yaml [--size 512x683] [--batch 2]
        [--steps 5] [--warmup 1] [--threads N] [--no-lightning] [--json out.json] [--set key=value ...]

Builds the config's model with random weights (nothing downloaded) and times training steps on one
fixed random batch, by hand (each phase on its own) and through Lightning (`DetectionModule` and the
standard Trainer); see `detr_lab.benchmark.train_profile`. Prints one line per phase (median ms and
share of the step) and the Lightning step's median with its difference from the hand-timed step.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from detr_lab.engine.cli import add_common_arguments, add_print_config_argument, print_config, run_tool


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="profile_train_step.py", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="YAML config of the model (and its loss, optim)")
    parser.add_argument("--size", default="512x683", help="HxW of the batch's images (default 512x683)")
    parser.add_argument("--batch", type=int, default=2, help="images per step (default 2)")
    parser.add_argument("--objects", type=int, default=5, help="random objects per image (default 5)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps each way (default 5)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first (default 1)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    parser.add_argument("--no-lightning", action="store_true", help="only the hand-timed step")
    parser.add_argument("--json", help="also write the numbers here")
    add_print_config_argument(parser)
    add_common_arguments(parser)
    return parser.parse_args(argv)


def format_profile(phases: dict[str, float]) -> list[str]:
    """Lines `phase  ms  share`, the step's phases in order, each part under its phase."""
    total = phases["total"]
    order = ["zero_grad", "forward", "loss", "backward", "clip_grad_norm", "optimizer_step"]
    lines = [f"{'phase':<28}{'ms':>10}{'share':>8}"]
    for name in order:
        lines.append(f"{name:<28}{phases[name] * 1000:>10.1f}{phases[name] / total:>8.1%}")
        for part in sorted(key for key in phases if key.startswith(f"{name}/")):
            lines.append(f"  {part:<26}{phases[part] * 1000:>10.1f}{phases[part] / total:>8.1%}")
    lines.append(f"{'step (by hand)':<28}{total * 1000:>10.1f}{1:>8.0%}")
    return lines


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    def body() -> None:
        if args.print_config:
            print_config(args.config, args.overrides)
            return
        import torch

        from detr_lab.benchmark.detectors import benchmark_config, parse_size
        from detr_lab.benchmark.machine import describe_machine, machine_line
        from detr_lab.benchmark.train_profile import fixed_batch, lightning_step_times, profile_manual_steps
        from detr_lab.engine.module import DetectionModule
        from detr_lab.errors import InputError
        from detr_lab.files import atomic_write_text

        for name in ("batch", "objects", "steps"):
            if getattr(args, name) < 1:
                raise InputError(f"--{name} must be >= 1, got {getattr(args, name)}")
        if args.warmup < 0:
            raise InputError(f"--warmup must be >= 0, got {args.warmup}")
        height, width = parse_size(args.size)
        if args.threads is not None:
            torch.set_num_threads(args.threads)
        cfg = benchmark_config(args.config, args.overrides)
        classes = cfg.model.num_classes
        torch.manual_seed(cfg.trainer.seed)
        module = DetectionModule(cfg, list(range(1, classes + 1)), [f"class{i}" for i in range(classes)])
        batch = fixed_batch(cfg, args.batch, height, width, objects=args.objects)
        print(machine_line(describe_machine("cpu")), f"| torch threads {torch.get_num_threads()}")
        print(f"{args.config}: training step, {args.batch} x {height} x {width}, median of {args.steps} "
              f"steps after {args.warmup}")
        phases = profile_manual_steps(module, batch, steps=args.steps, warmup=args.warmup)
        print("\n".join(format_profile(phases)))
        report = {"config": args.config, "size": [height, width], "batch": args.batch, "steps": args.steps,
                  "threads": torch.get_num_threads(), "phases": phases}
        if not args.no_lightning:
            seconds = lightning_step_times(module, batch, steps=args.steps, warmup=args.warmup)
            median = statistics.median(seconds)
            report["lightning_step"] = seconds
            print(f"{'step (Lightning)':<28}{median * 1000:>10.1f}  (Lightning loop, callbacks and "
                  f"logging: {(median - phases['total']) * 1000:+.1f} ms)")
        if args.json:
            atomic_write_text(Path(args.json), json.dumps(report, indent=2) + "\n")
            print(f"written to {args.json}")

    return run_tool("profile_train_step.py", body, debug=args.debug)


if __name__ == "__main__":
    sys.exit(main())
