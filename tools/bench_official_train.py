"""Benchmark: detr_lab's DETR or Deformable DETR against the official code, same weights, one process.

    python tools/bench_official_train.py --family detr --official-dir ../detr \
        [--tasks train_step inference] [--train-size 512x683] [--train-batch 2] \
        [--inference-size 800x1066] [--runs 5] [--warmup 1] [--threads 2] [--json out.json]

`--official-dir` is a checkout of facebookresearch/detr (`--family detr`) or of
fundamentalvision/Deformable-DETR (`--family deformable`). Its model is built from its own argument
parser's defaults (DETR-R50; Deformable-DETR-R50, single-scale queries, no refinement), with random
weights, and those weights are converted into detr_lab's model (`convert_official`, as an official
checkpoint would be), so both sides compute the same function. Each task times both sides in turns,
alternating which goes first (`detr_lab.timer.time_interleaved`), and reports the medians and
detr_lab / official.

- train_step: zero the gradients, forward in train mode (dropout on), Hungarian matching and the set
  loss with auxiliary losses against the same random targets, backward; no optimizer step, on both
  sides (detr_lab: the training paths `tools/benchmark.py --tasks train_step` times as "fast").
- inference: one forward pass in eval mode (detr_lab: `optimize_for_inference` under
  `torch.inference_mode`, as `eval.py` runs it; official: its model under `torch.no_grad`).

The official code is imported from its folder as it is. Three things are adapted in this process
only, never in its files:
- `util/misc.py` compares torchvision's version with `float(torchvision.__version__[:3])` ("0.2" for
  0.29) and would import helpers that torchvision removed long ago: the version reads "0.99" while
  the official modules are imported;
- its backbone asks torchvision for ImageNet weights (`pretrained=is_main_process()`): the ResNet
  constructors it reaches are given `weights=None`, so nothing is downloaded;
- Deformable DETR's `MSDeformAttnFunction` is its compiled CUDA extension: on the CPU the call goes to
  the repository's own pure-PyTorch `ms_deform_attn_core_pytorch` (same file), the official CPU path.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import sys
import types
from pathlib import Path

from detr_lab.engine.cli import add_common_arguments, run_tool
from detr_lab.errors import InputError, InputNotFoundError

FAMILIES = {  # family -> (detr_lab config, a file that identifies the official repository)
    "detr": ("configs/detr_r50.yaml", "models/detr.py"),
    "deformable": ("configs/deformable.yaml", "models/deformable_detr.py"),
}
OFFICIAL_PACKAGES = ("models", "util", "datasets", "engine", "main")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="bench_official_train.py", description=__doc__.splitlines()[0])
    parser.add_argument("--family", choices=sorted(FAMILIES), required=True)
    parser.add_argument("--official-dir", required=True, help="checkout of the official repository")
    parser.add_argument("--tasks", nargs="+", choices=("train_step", "inference"),
                        default=["train_step", "inference"])
    parser.add_argument("--train-size", default="512x683", help="HxW of the training batch (default 512x683)")
    parser.add_argument("--train-batch", type=int, default=2, help="images per training step (default 2)")
    parser.add_argument("--inference-size", default="800x1066", help="HxW, batch 1 (default 800x1066)")
    parser.add_argument("--runs", type=int, default=5, help="timed calls per side (default 5)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed calls per side first (default 1)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    parser.add_argument("--objects", type=int, default=5, help="random objects per training image")
    parser.add_argument("--json", help="also write the report here")
    add_common_arguments(parser, overrides=False)
    return parser.parse_args(argv)


def check_official_dir(family: str, folder: Path) -> None:
    """Raise InputNotFoundError / InputError unless `folder` holds the official repository of `family`."""
    if not folder.is_dir():
        raise InputNotFoundError(f"--official-dir {folder}: no such folder")
    marker = FAMILIES[family][1]
    if not (folder / marker).is_file() or not (folder / "main.py").is_file():
        repository = "facebookresearch/detr" if family == "detr" else "fundamentalvision/Deformable-DETR"
        raise InputError(f"--official-dir {folder}: no {marker} and main.py there; expected a checkout of "
                         f"{repository} for --family {family}")


@contextlib.contextmanager
def torchvision_version(text: str):
    """torchvision.__version__ reads `text` inside the block (see the module docstring)."""
    import torchvision

    real = torchvision.__version__
    torchvision.__version__ = text
    try:
        yield
    finally:
        torchvision.__version__ = real


def _without_download(constructor):
    def build(*args, pretrained: bool = False, **kwargs):
        return constructor(*args, weights=None, **kwargs)

    return build


def import_official(family: str, folder: Path) -> types.SimpleNamespace:
    """The official repository's `main` (argument parser), `models` (build_model) and `util.misc`."""
    import torchvision

    if any(name in sys.modules for name in OFFICIAL_PACKAGES):
        raise InputError("official modules already imported in this process (one family per run)")
    if family == "deformable":  # the compiled CUDA extension, imported at the top of its functions module
        sys.modules["MultiScaleDeformableAttention"] = types.ModuleType("MultiScaleDeformableAttention")
    sys.path.insert(0, str(folder))
    with torchvision_version("0.99"):
        misc = importlib.import_module("util.misc")
        main = importlib.import_module("main")
        models = importlib.import_module("models")
        backbone = importlib.import_module("models.backbone")
    backbone.torchvision = types.SimpleNamespace(models=types.SimpleNamespace(**{
        name: _without_download(getattr(torchvision.models, name))
        for name in ("resnet18", "resnet34", "resnet50", "resnet101")
    }))
    if family == "deformable":
        functions = importlib.import_module("models.ops.functions.ms_deform_attn_func")
        module = importlib.import_module("models.ops.modules.ms_deform_attn")

        class CpuFunction:  # the official CPU path in place of the CUDA extension
            @staticmethod
            def apply(value, spatial_shapes, level_start_index, locations, weights, im2col_step):
                return functions.ms_deform_attn_core_pytorch(value, spatial_shapes, locations, weights)

        module.MSDeformAttnFunction = CpuFunction
    return types.SimpleNamespace(main=main, models=models, misc=misc)


def build_official(official: types.SimpleNamespace):
    """(model, criterion, args) from the official parser's defaults, on the CPU."""
    args = official.main.get_args_parser().parse_args(["--device", "cpu"])
    model, criterion, _ = official.models.build_model(args)
    return model, criterion, args


def build_detr_lab(family: str, official_model):
    """detr_lab's model (the official weights, converted) and criterion, with the config's loss."""
    import dataclasses

    from detr_lab.benchmark.detectors import benchmark_config
    from detr_lab.checkpoints import convert_official
    from detr_lab.models.build import build_criterion, build_model

    converted, state = convert_official({"model": official_model.state_dict()})
    cfg = benchmark_config(FAMILIES[family][0])
    cfg = dataclasses.replace(cfg, model=converted.model)
    model = build_model(cfg.model)
    model.load_state_dict(state)
    return model, build_criterion(cfg.model, cfg.loss), cfg


def official_train_step(model, criterion, samples, targets):
    weights = criterion.weight_dict

    def call() -> None:
        model.zero_grad(set_to_none=True)
        losses = criterion(model(samples), targets)
        total = sum(losses[name] * weights[name] for name in losses if name in weights)
        total.backward()

    return call


def official_inference(model, samples):
    import torch

    def call() -> dict:
        with torch.no_grad():
            return model(samples)

    return call


def parse_size(text: str) -> tuple[int, int]:
    from detr_lab.benchmark.detectors import parse_size as parse

    return parse(text)


def summarize_pair(times: dict) -> dict:
    import statistics

    from detr_lab.timer import summarize

    ours, theirs = times["detr_lab"], times["official"]
    return {
        "detr_lab": summarize(ours["wall"]),
        "official": summarize(theirs["wall"]),
        "detr_lab_cpu": summarize(ours["cpu"]),
        "official_cpu": summarize(theirs["cpu"]),
        "ratio": statistics.median(ours["wall"]) / statistics.median(theirs["wall"]),
        "paired_ratio": statistics.median(a / b for a, b in zip(ours["wall"], theirs["wall"], strict=True)),
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    def body() -> None:
        import copy

        import torch

        from detr_lab.benchmark.detectors import (
            inference_call,
            random_batch,
            random_targets,
            train_step_call,
            use_fast_paths,
        )
        from detr_lab.benchmark.machine import describe_machine, machine_line
        from detr_lab.files import atomic_write_text
        from detr_lab.models.optimize import optimize_for_inference
        from detr_lab.timer import time_interleaved

        folder = Path(args.official_dir).resolve()
        check_official_dir(args.family, folder)
        for name in ("runs", "train_batch", "objects"):
            if getattr(args, name) < 1:
                raise InputError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
        train_size, inference_size = parse_size(args.train_size), parse_size(args.inference_size)
        if args.threads is not None:
            torch.set_num_threads(args.threads)
        torch.manual_seed(0)
        official = import_official(args.family, folder)
        official_model, official_criterion, _ = build_official(official)
        model, criterion, cfg = build_detr_lab(args.family, official_model)
        device = torch.device("cpu")
        generator = torch.Generator().manual_seed(0)
        report = {"family": args.family, "official_dir": str(folder),
                  "machine": machine_line(describe_machine(device)),
                  "threads": torch.get_num_threads(), "runs": args.runs, "warmup": args.warmup, "tasks": {}}
        print(report["machine"], f"| torch threads {report['threads']}")

        def nested(images, mask):
            return official.misc.NestedTensor(images, mask)

        if "train_step" in args.tasks:
            height, width = train_size
            images, mask = random_batch(args.train_batch, height, width, device, generator)
            targets = random_targets(args.train_batch, height, width, num_classes=cfg.model.num_classes,
                                     objects_per_image=args.objects, device=device, generator=generator)
            ours = use_fast_paths(copy.deepcopy(model)).train()
            theirs = official_model.train()
            official_criterion.train()
            samples = nested(images, mask)
            calls = {"detr_lab": train_step_call(ours, criterion, images, mask, targets),
                     "official": official_train_step(theirs, official_criterion, samples, targets)}
            times = time_interleaved(calls, runs=args.runs, warmup=args.warmup)
            report["tasks"]["train_step"] = {"size": [height, width], "batch": args.train_batch,
                                             **summarize_pair(times)}
            del ours
        if "inference" in args.tasks:
            height, width = inference_size
            images, mask = random_batch(1, height, width, device, generator)
            ours = optimize_for_inference(copy.deepcopy(model).eval())
            theirs = official_model.eval()
            calls = {"detr_lab": inference_call(ours, images, mask),
                     "official": official_inference(theirs, nested(images, mask))}
            check = {name: call() for name, call in calls.items()}
            difference = (check["detr_lab"]["pred_logits"] - check["official"]["pred_logits"]).abs().max()
            times = time_interleaved(calls, runs=args.runs, warmup=args.warmup)
            report["tasks"]["inference"] = {"size": [height, width], "batch": 1, **summarize_pair(times),
                                            "max_logit_difference": float(difference)}
        for task, result in report["tasks"].items():
            size = "x".join(str(v) for v in result["size"])
            ours_s, theirs_s = result["detr_lab"]["median"], result["official"]["median"]
            print(f"{args.family} {task} {result['batch']} x {size}: detr_lab {ours_s:.3f} s, official "
                  f"{theirs_s:.3f} s (median of {args.runs}), detr_lab / official {result['ratio']:.2f} "
                  f"(paired {result['paired_ratio']:.2f})")
            if "max_logit_difference" in result:
                print(f"  largest logit difference from the official outputs: "
                      f"{result['max_logit_difference']:.2e}")
        if args.json:
            atomic_write_text(Path(args.json), json.dumps(report, indent=2) + "\n")
            print(f"report written to {args.json}")

    return run_tool("bench_official_train.py", body, debug=args.debug)


if __name__ == "__main__":
    sys.exit(main())
