"""Benchmark: a detr_lab member against its official code, same weights, one process.

    python tools/bench_official_train.py --family detr --official-dir ../detr \
        [--tasks train_step inference] [--train-size 512x683] [--train-batch 2] \
        [--inference-size 800x1066] [--runs 5] [--warmup 1] [--threads 2] [--json out.json]

`--official-dir` is a checkout of the family's official repository:
- `--family detr`: facebookresearch/detr; `deformable`: fundamentalvision/Deformable-DETR. The model
  is built from the official argument parser's defaults (DETR-R50; Deformable-DETR-R50, single-scale
  queries, no refinement).
- `--family rtdetrv2`: the `rtdetrv2_pytorch` folder of lyuwenyu/RT-DETR; `dfine`: Peterande/D-FINE.
  The model and criterion are built from the official YAML (`--official-config`; default
  RT-DETRv2-R18 `configs/rtdetrv2/rtdetrv2_r18vd_120e_coco.yml`, D-FINE-N
  `configs/dfine/dfine_hgnetv2_n_coco.yml`) by its own `YAMLConfig`, the backbone's `pretrained` off.
  Sizes default to 640 x 640 for these two.

The official model gets random weights, and those weights are converted into detr_lab's model
(`convert_official`, as an official checkpoint would be), so both sides compute the same function.
Each task times both sides in turns, alternating which goes first (`detr_lab.timer.time_interleaved`),
and reports the medians and detr_lab / official.

- train_step: zero the gradients, forward in train mode (dropout on; the denoising queries of the
  members that have them, from the same targets), Hungarian matching and the set loss with auxiliary
  losses against the same random targets, backward; no optimizer step, on both sides (detr_lab: the
  training paths `tools/benchmark.py --tasks train_step` times as "fast"). The official RT-DETRv2 /
  D-FINE step is its training loop's: `model(images, targets=targets)`, `criterion(outputs, targets,
  epoch=0, step=0, global_step=0, epoch_step=1)`, the sum of the (already weighted) terms.
- inference: one forward pass in eval mode (detr_lab: `optimize_for_inference` under
  `torch.inference_mode`, as `eval.py` runs it; official: its model under `torch.no_grad`).

The official code is imported from its folder as it is. For DETR and Deformable DETR, three things
are adapted in this process only, never in their files:
- `util/misc.py` compares torchvision's version with `float(torchvision.__version__[:3])` ("0.2" for
  0.29) and would import helpers that torchvision removed long ago: the version reads "0.99" while
  the official modules are imported;
- its backbone asks torchvision for ImageNet weights (`pretrained=is_main_process()`): the ResNet
  constructors it reaches are given `weights=None`, so nothing is downloaded;
- Deformable DETR's `MSDeformAttnFunction` is its compiled CUDA extension: on the CPU the call goes to
  the repository's own pure-PyTorch `ms_deform_attn_core_pytorch` (same file), the official CPU path.
RT-DETRv2 and D-FINE run unchanged (their deformable attention has a PyTorch path of its own).
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
    "dino": ("configs/dino_4scale.yaml", "models/dino/dino.py"),
    "rtdetrv2": ("configs/rtdetrv2_r18vd.yaml", "src/zoo/rtdetr/rtdetrv2_decoder.py"),
    "dfine": ("configs/dfine_n.yaml", "src/zoo/dfine/dfine_decoder.py"),
}
REPOSITORIES = {"detr": "facebookresearch/detr", "deformable": "fundamentalvision/Deformable-DETR",
                "dino": "IDEA-Research/DINO",
                "rtdetrv2": "lyuwenyu/RT-DETR (its rtdetrv2_pytorch folder)", "dfine": "Peterande/D-FINE"}
# The families built from an official YAML: default config, and the update that keeps the backbone's
# ImageNet weights from being downloaded.
YAML_FAMILIES = {
    "rtdetrv2": ("configs/rtdetrv2/rtdetrv2_r18vd_120e_coco.yml", {"PResNet": {"pretrained": False}}),
    "dfine": ("configs/dfine/dfine_hgnetv2_n_coco.yml", {"HGNetv2": {"pretrained": False}}),
}
OFFICIAL_PACKAGES = ("models", "util", "datasets", "engine", "main", "src")
DINO_CONFIG = "config/DINO/DINO_4scale.py"  # the official DINO-4scale-R50 config (SLConfig)
# Where each argparse family keeps its ResNet constructors and its deformable attention (package prefix).
BACKBONE_MODULES = {"detr": "models.backbone", "deformable": "models.backbone",
                    "dino": "models.dino.backbone"}
DEFORMABLE_OPS = {"deformable": "models.ops", "dino": "models.dino.ops"}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="bench_official_train.py", description=__doc__.splitlines()[0])
    parser.add_argument("--family", choices=sorted(FAMILIES), required=True)
    parser.add_argument("--official-dir", required=True, help="checkout of the official repository")
    parser.add_argument("--tasks", nargs="+", choices=("train_step", "inference"),
                        default=["train_step", "inference"])
    parser.add_argument("--official-config", help="rtdetrv2 / dfine: the official YAML, relative to "
                        "--official-dir (default: RT-DETRv2-R18 / D-FINE-N)")
    parser.add_argument("--config", help="detr_lab's config of the same member (default: the family's)")
    parser.add_argument("--train-size", help="HxW of the training batch (default 512x683; 640x640 for "
                        "rtdetrv2 / dfine)")
    parser.add_argument("--train-batch", type=int, default=2, help="images per training step (default 2)")
    parser.add_argument("--inference-size", help="HxW, batch 1 (default 800x1066; 640x640 for rtdetrv2 / "
                        "dfine)")
    parser.add_argument("--runs", type=int, default=5, help="timed calls per side (default 5)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed calls per side first (default 1)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    parser.add_argument("--objects", type=int, default=5, help="random objects per training image")
    parser.add_argument("--json", help="also write the report here")
    add_common_arguments(parser, overrides=False)
    args = parser.parse_args(argv)
    square = args.family in YAML_FAMILIES
    args.train_size = args.train_size or ("640x640" if square else "512x683")
    args.inference_size = args.inference_size or ("640x640" if square else "800x1066")
    if args.official_config is not None and not square:
        parser.error(f"--official-config is for the YAML families ({', '.join(YAML_FAMILIES)}), not "
                     f"--family {args.family}")
    args.official_config = args.official_config or YAML_FAMILIES.get(args.family, (None,))[0]
    args.config = args.config or FAMILIES[args.family][0]
    return args


def check_official_dir(family: str, folder: Path) -> None:
    """Raise InputNotFoundError / InputError unless `folder` holds the official repository of `family`."""
    if not folder.is_dir():
        raise InputNotFoundError(f"--official-dir {folder}: no such folder")
    marker = FAMILIES[family][1]
    markers = [marker] if family in YAML_FAMILIES else [marker, "main.py"]
    if not all((folder / name).is_file() for name in markers):
        raise InputError(f"--official-dir {folder}: no {' and '.join(markers)} there; expected a checkout of "
                         f"{REPOSITORIES[family]} for --family {family}")


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


@contextlib.contextmanager
def tensors_stay_on_cpu():
    """Inside the block `Tensor.cuda()` returns the tensor itself and `Tensor.to("cuda")` goes to the CPU
    (DINO's denoising and its loss send the tensors they make to "cuda" by name; on a CPU-only machine
    that would raise)."""
    import torch

    real_cuda, real_to = torch.Tensor.cuda, torch.Tensor.to

    def to(self, *args, **kwargs):
        if args and isinstance(args[0], str) and args[0] == "cuda":
            args = ("cpu", *args[1:])
        return real_to(self, *args, **kwargs)

    torch.Tensor.cuda, torch.Tensor.to = (lambda self, *args, **kwargs: self), to
    try:
        yield
    finally:
        torch.Tensor.cuda, torch.Tensor.to = real_cuda, real_to


def _without_download(constructor):
    def build(*args, pretrained: bool = False, **kwargs):
        return constructor(*args, weights=None, **kwargs)

    return build


def import_official(family: str, folder: Path) -> types.SimpleNamespace:
    """The official repository's `main` (argument parser), `models` (build_model) and `util.misc`."""
    import torchvision

    if any(name in sys.modules for name in OFFICIAL_PACKAGES):
        raise InputError("official modules already imported in this process (one family per run)")
    if family in DEFORMABLE_OPS:  # the compiled CUDA extension, imported at the top of its functions module
        sys.modules["MultiScaleDeformableAttention"] = types.ModuleType("MultiScaleDeformableAttention")
    sys.path.insert(0, str(folder))
    with torchvision_version("0.99"):
        misc = importlib.import_module("util.misc")
        main = importlib.import_module("main")
        models = importlib.import_module("models")
        backbone = importlib.import_module(BACKBONE_MODULES[family])
    backbone.torchvision = types.SimpleNamespace(models=types.SimpleNamespace(**{
        name: _without_download(getattr(torchvision.models, name))
        for name in ("resnet18", "resnet34", "resnet50", "resnet101")
    }))
    if family in DEFORMABLE_OPS:
        functions = importlib.import_module(f"{DEFORMABLE_OPS[family]}.functions.ms_deform_attn_func")
        module = importlib.import_module(f"{DEFORMABLE_OPS[family]}.modules.ms_deform_attn")

        class CpuFunction:  # the official CPU path in place of the CUDA extension
            @staticmethod
            def apply(value, spatial_shapes, level_start_index, locations, weights, im2col_step):
                return functions.ms_deform_attn_core_pytorch(value, spatial_shapes, locations, weights)

        module.MSDeformAttnFunction = CpuFunction
    slconfig = importlib.import_module("util.slconfig") if family == "dino" else None
    return types.SimpleNamespace(main=main, models=models, misc=misc, slconfig=slconfig, folder=folder)


def build_official(official: types.SimpleNamespace):
    """(model, criterion, args) from the official parser's defaults (DINO: and its DINO-4scale config
    file's values, as its `main` merges them), on the CPU."""
    if official.slconfig is None:
        args = official.main.get_args_parser().parse_args(["--device", "cpu"])
        model, criterion, _ = official.models.build_model(args)
        return model, criterion, args
    path = official.folder / DINO_CONFIG
    args = official.main.get_args_parser().parse_args(["--config_file", str(path), "--device", "cpu"])
    for key, value in official.slconfig.SLConfig.fromfile(str(path))._cfg_dict.to_dict().items():
        setattr(args, key, value)
    args.use_ema, args.debug = False, False
    model, criterion, _ = official.main.build_model_main(args)
    return model, criterion, args


def build_yaml_official(family: str, folder: Path, config: str):
    """(model, criterion) of RT-DETRv2 / D-FINE from the official YAML, by the official `YAMLConfig`."""
    path = folder / config
    if not path.is_file():
        raise InputNotFoundError(f"--official-config {config}: no such file under {folder}")
    if any(name in sys.modules for name in OFFICIAL_PACKAGES):
        raise InputError("official modules already imported in this process (one family per run)")
    sys.path.insert(0, str(folder))
    core = importlib.import_module("src.core")
    built = core.YAMLConfig(str(path), **YAML_FAMILIES[family][1])
    return built.model, built.criterion


def build_detr_lab(config: str, official_model):
    """detr_lab's model (the official weights, converted) and criterion, with the config's loss."""
    import dataclasses

    from detr_lab.benchmark.detectors import benchmark_config
    from detr_lab.checkpoints import convert_official
    from detr_lab.models.build import build_criterion, build_model

    converted, state = convert_official({"model": official_model.state_dict()})
    cfg = benchmark_config(config)
    cfg = dataclasses.replace(cfg, model=converted.model)
    model = build_model(cfg.model)
    model.load_state_dict(state)
    return model, build_criterion(cfg.model, cfg.loss), cfg


def official_train_step(model, criterion, samples, targets, *, with_targets: bool = False):
    """The official DETR / Deformable DETR / DINO training step (DINO's model takes the targets, for
    its denoising queries); the weighted sum of the terms in its `weight_dict`."""
    weights = criterion.weight_dict

    def call() -> None:
        model.zero_grad(set_to_none=True)
        with tensors_stay_on_cpu() if with_targets else contextlib.nullcontext():
            outputs = model(samples, targets) if with_targets else model(samples)
            losses = criterion(outputs, targets)
        total = sum(losses[name] * weights[name] for name in losses if name in weights)
        total.backward()

    return call


def yaml_official_train_step(model, criterion, images, targets):
    """The official RT-DETRv2 / D-FINE training loop's step (its terms come weighted)."""

    def call() -> None:
        model.zero_grad(set_to_none=True)
        outputs = model(images, targets=targets)
        losses = criterion(outputs, targets, epoch=0, step=0, global_step=0, epoch_step=1)
        sum(losses.values()).backward()

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
        yaml_family = args.family in YAML_FAMILIES
        if yaml_family:
            official = None
            built = build_yaml_official(args.family, folder, args.official_config)
            official_model, official_criterion = built
        else:
            official = import_official(args.family, folder)
            official_model, official_criterion, _ = build_official(official)
        model, criterion, cfg = build_detr_lab(args.config, official_model)
        device = torch.device("cpu")
        generator = torch.Generator().manual_seed(0)
        report = {"family": args.family, "official_dir": str(folder), "config": args.config,
                  "official_config": args.official_config,
                  "machine": machine_line(describe_machine(device)),
                  "threads": torch.get_num_threads(), "runs": args.runs, "warmup": args.warmup, "tasks": {}}
        print(report["machine"], f"| torch threads {report['threads']}")

        def nested(images, mask):  # the official input: DETR's NestedTensor, RT-DETR's bare batch
            return images if yaml_family else official.misc.NestedTensor(images, mask)

        if "train_step" in args.tasks:
            height, width = train_size
            images, mask = random_batch(args.train_batch, height, width, device, generator)
            targets = random_targets(args.train_batch, height, width, num_classes=cfg.model.num_classes,
                                     objects_per_image=args.objects, device=device, generator=generator)
            ours = use_fast_paths(copy.deepcopy(model)).train()
            theirs = copy.deepcopy(official_model).train()  # batch norms in train mode move their statistics
            official_criterion.train()
            samples = nested(images, mask)
            if yaml_family:
                official_step = yaml_official_train_step(theirs, official_criterion, samples, targets)
            else:
                official_step = official_train_step(theirs, official_criterion, samples, targets,
                                                    with_targets=args.family == "dino")
            calls = {"detr_lab": train_step_call(ours, criterion, images, mask, targets),
                     "official": official_step}
            times = time_interleaved(calls, runs=args.runs, warmup=args.warmup)
            report["tasks"]["train_step"] = {"size": [height, width], "batch": args.train_batch,
                                             **summarize_pair(times)}
            del ours, theirs
        if "inference" in args.tasks:
            height, width = inference_size
            images, mask = random_batch(1, height, width, device, generator)
            ours = optimize_for_inference(copy.deepcopy(model).eval())
            theirs = official_model.eval()
            calls = {"detr_lab": inference_call(ours, images, mask),
                     "official": official_inference(theirs, nested(images, mask))}
            # Same function: both models in float64, eager (in float32, a random-weight RT-DETR / D-FINE
            # flips near-tied queries of its top-k selection on rounding alone).
            exact = {"detr_lab": inference_call(copy.deepcopy(model).double().eval(), images.double(), mask),
                     "official": official_inference(copy.deepcopy(official_model).double().eval(),
                                                    nested(images.double(), mask))}
            logits = {name: call()["pred_logits"] for name, call in exact.items()}
            del exact
            times = time_interleaved(calls, runs=args.runs, warmup=args.warmup)
            report["tasks"]["inference"] = {
                "size": [height, width], "batch": 1, **summarize_pair(times),
                "max_logit_difference_float64": float((logits["detr_lab"] - logits["official"]).abs().max()),
            }
        for task, result in report["tasks"].items():
            size = "x".join(str(v) for v in result["size"])
            ours_s, theirs_s = result["detr_lab"]["median"], result["official"]["median"]
            print(f"{args.family} {task} {result['batch']} x {size}: detr_lab {ours_s:.3f} s, official "
                  f"{theirs_s:.3f} s (median of {args.runs}), detr_lab / official {result['ratio']:.2f} "
                  f"(paired {result['paired_ratio']:.2f})")
            if "max_logit_difference_float64" in result:
                print(f"  largest logit difference from the official outputs (both in float64): "
                      f"{result['max_logit_difference_float64']:.2e}")
        if args.json:
            atomic_write_text(Path(args.json), json.dumps(report, indent=2) + "\n")
            print(f"report written to {args.json}")

    return run_tool("bench_official_train.py", body, debug=args.debug)


if __name__ == "__main__":
    sys.exit(main())
