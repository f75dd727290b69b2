"""RT-DETRv2-R18 or D-FINE-N on onnxruntime: detr_lab's export against the official repository's own.

    python tools/bench_official_onnx.py --official-dir /tmp/rtdetr_official/rtdetrv2_pytorch \
        [--family rtdetrv2|dfine] [--official-python PY] [--checkpoint OFFICIAL.pth] [--size 640]
        [--threads 1 2] [--runs 10] [--warmup 2] [--block 1] [--work-dir runs/bench_official_onnx]
        [--official-exporter torchscript|as-is] [--profile] [--skip-export] [--json PATH]

`--family dfine` (with `--official-dir` the root of Peterande/D-FINE) measures D-FINE-N the same way.

1. Weights: an official checkpoint (`--checkpoint`, {'model': ...} or {'ema': {'module': ...}}) or, by
   default, the synthetic weights of the family's test fixture (tests/fixtures/rtdetrv2_r18vd.pt,
   tests/fixtures/dfine_n.pt: `synth_state_dict(spec, seed)` + its architecture constants), with the
   decoder's `anchors` / `valid_mask` buffers computed for `--size`. Written as {'model': state}.
2. The official export: the official export script (`tools/export_onnx.py`; D-FINE:
   `tools/deployment/export_onnx.py`, which traces at 640 x 640 only), run as a separate program in
   `--official-dir` (its deploy() model + post-processor, opset 16, dynamic batch, inputs `images` and
   `orig_target_sizes`, `--check`), with the backbone's `pretrained=False` (no download). The official
   code is never imported here. `--official-exporter torchscript` (default) runs the script unchanged
   except that `torch.onnx.export` defaults to the TorchScript exporter (`dynamo=False`), the exporter
   it was written for: PyTorch >= 2.9 switched the default to the torch.export-based exporter, which
   needs onnxscript. `as-is` runs the script exactly as it is.
3. detr_lab: the same checkpoint through `tools/convert_checkpoint.py`, then `tools/export.py` with its
   default options at `--size` x `--size` (batch 1).
4. Both graphs run on one image of uniform noise in [0, 1) (the official input convention; neither
   graph normalizes); detr_lab's outputs, post-processed as the official graph does (top 300
   sigmoid scores over every (query, class)), must agree with the official ones.
5. For every `--threads` value, one onnxruntime session per graph with that many intra-op threads,
   batch 1; the two take turns (`--block` timed calls per turn after an untimed one; default: turns of
   one call), `--warmup` untimed rounds, then `--runs` timed ones; medians of the
   wall and process CPU times and their ratio detr_lab / official. `--profile` adds onnxruntime's
   per-operator profile (one thread).

Prints a markdown table, the node counts per operator type of both graphs, the machine and the
commands run; writes everything as JSON (default WORK_DIR/report.json).
"""

from __future__ import annotations

import argparse
import glob
import os
import shlex
import subprocess
import sys
from pathlib import Path

from detr_lab.engine.cli import ToolError, add_common_arguments, run_tool
from detr_lab.errors import InputNotFoundError

REPO = Path(__file__).resolve().parent.parent
SYNTH_WEIGHTS = REPO / "tests" / "fixtures" / "synth_weights.py"
# Per family: the test fixture of its synthetic weights, the official config and export script, the
# official config updates (`-u`; None: the script takes none), the decoder's anchor strides.
FAMILIES = {
    "rtdetrv2": {
        "title": "RT-DETRv2-R18",
        "fixture": REPO / "tests" / "fixtures" / "rtdetrv2_r18vd.pt",
        "config": "configs/rtdetrv2/rtdetrv2_r18vd_120e_coco.yml",
        "script": "tools/export_onnx.py",
        "updates": ["PResNet.pretrained=False"],
        "strides": (8, 16, 32),
    },
    "dfine": {
        "title": "D-FINE-N",
        "fixture": REPO / "tests" / "fixtures" / "dfine_n.pt",
        "config": "configs/dfine/dfine_hgnetv2_n_coco.yml",
        "script": "tools/deployment/export_onnx.py",
        "updates": None,  # the script turns HGNetv2's pretrained off itself, and traces at 640 x 640
        "strides": (16, 32),
    },
}
# `python -c SHIM tools/export_onnx.py ARGS...`: the official script with the TorchScript exporter
SHIM = (
    "import functools, runpy, sys, torch; "
    "torch.onnx.export = functools.partial(torch.onnx.export, dynamo=False); "
    "sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')"
)
NAMES = ("detr_lab", "official")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="bench_official_onnx.py", description=__doc__.splitlines()[0])
    parser.add_argument("--official-dir", type=Path, required=True,
                        help="the official code: RT-DETR's rtdetrv2_pytorch folder, or D-FINE's root")
    parser.add_argument("--family", choices=sorted(FAMILIES), default="rtdetrv2",
                        help="rtdetrv2 (R18, default) or dfine (D-FINE-N)")
    parser.add_argument("--official-python", default=sys.executable,
                        help="Python with the official requirements installed (default: this one)")
    parser.add_argument("--official-config", help="the official YAML (default: the family's R18 / N config)")
    parser.add_argument("--official-exporter", choices=("torchscript", "as-is"), default="torchscript",
                        help="run the official script with the TorchScript exporter (default) or unchanged")
    parser.add_argument("--checkpoint", type=Path, help="official weights of the model (default: synthetic)")
    parser.add_argument("--size", type=int, default=640, help="square input side (default 640)")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2],
                        help="onnxruntime intra-op threads, one measurement each (default 1 2)")
    parser.add_argument("--runs", type=int, default=10,
                        help="timed runs per graph and thread count (default 10)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed rounds first (default 2)")
    parser.add_argument("--block", type=int, default=1,
                        help="timed calls per turn, after one untimed call (default 1: the graphs take "
                        "turns call by call; > 1 keeps one session's spinning threads off the other's calls)")
    parser.add_argument("--profile", action="store_true", help="also profile both graphs per operator type")
    parser.add_argument("--work-dir", type=Path, default=Path("runs/bench_official_onnx"),
                        help="checkpoints and ONNX files (default runs/bench_official_onnx)")
    parser.add_argument("--skip-export", action="store_true",
                        help="time the ONNX files already in --work-dir (from an earlier run) again")
    parser.add_argument("--json", type=Path, help="report path (default WORK_DIR/report.json)")
    add_common_arguments(parser, overrides=False)
    args = parser.parse_args(argv)
    if args.size < 32 or args.size % 32:
        parser.error(f"--size must be a positive multiple of 32, got {args.size}")
    if args.runs < 1 or args.block < 1 or args.warmup < 0 or min(args.threads) < 1:
        parser.error("--runs, --block and --threads must be >= 1 and --warmup >= 0")
    if args.family == "dfine" and args.size != 640:
        parser.error("--family dfine: the official D-FINE export script traces at 640 only (--size 640)")
    args.official_config = args.official_config or FAMILIES[args.family]["config"]
    return args


# ------------------------------------------------------------------------------------------ weights
def synthetic_state(family: str) -> dict:
    """The family's test fixture's synthetic official state dict (anchors: replaced by the caller)."""
    import importlib.util

    import torch

    fixture = torch.load(FAMILIES[family]["fixture"], weights_only=True)
    spec = importlib.util.spec_from_file_location("detr_lab_bench_synth_weights", SYNTH_WEIGHTS)
    synth = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(synth)
    state = synth.synth_state_dict(dict(fixture["state_dict_spec"]), fixture["weights_seed"])
    state.update(fixture["state_dict_overrides"])  # architecture constants (anchors: replaced below)
    return state


def official_state(args: argparse.Namespace) -> dict:
    import torch

    from detr_lab.benchmark.onnx_compare import rtdetr_anchors

    if args.checkpoint is None:
        state = synthetic_state(args.family)
    else:
        loaded = torch.load(args.checkpoint, map_location="cpu", weights_only=True)
        state = loaded["ema"]["module"] if "ema" in loaded else loaded.get("model", loaded)
    if "decoder.anchors" not in state:
        raise ToolError("the weights hold no decoder.anchors: not an official RT-DETR checkpoint")
    state = dict(state)
    strides = FAMILIES[args.family]["strides"]
    state["decoder.anchors"], state["decoder.valid_mask"] = rtdetr_anchors(args.size, args.size, strides)
    return state


# ----------------------------------------------------------------------------------------- commands
def commands(args: argparse.Namespace, work: Path) -> dict[str, dict]:
    """The three programs run: argv and working directory of each."""
    family = FAMILIES[args.family]
    checkpoint, official_onnx = work / "official_checkpoint.pth", work / "official.onnx"
    converted, ours = work / "detr_lab.pt", work / "detr_lab.onnx"
    script = ["-c", SHIM, family["script"]] if args.official_exporter == "torchscript" else [family["script"]]
    argv = [args.official_python, *script, "-c", args.official_config, "-r", str(checkpoint)]
    if family["updates"] is None:  # D-FINE's script: writes next to the checkpoint, 640 x 640
        argv += ["--check"]
    else:
        updates = list(family["updates"])
        if args.size != 640:  # the official config's eval_spatial_size
            updates.append(f"eval_spatial_size=[{args.size}, {args.size}]")
        argv += ["-o", str(official_onnx), "-s", str(args.size), "--check", "-u", *updates]
    return {
        "official_export": {"cwd": str(args.official_dir), "argv": argv},
        "detr_lab_convert": {
            "cwd": str(REPO),
            "argv": [sys.executable, "tools/convert_checkpoint.py", str(checkpoint), str(converted)],
        },
        "detr_lab_export": {
            "cwd": str(REPO),
            "argv": [sys.executable, "tools/export.py", "--checkpoint", str(converted), "--output", str(ours),
                     "--height", str(args.size), "--width", str(args.size)],
        },
    }


def run_command(name: str, command: dict) -> None:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    print(f"[{name}] (cd {command['cwd']} && {shlex.join(command['argv'])})", file=sys.stderr, flush=True)
    done = subprocess.run(command["argv"], cwd=command["cwd"], env=env, capture_output=True, text=True)
    if done.returncode != 0:
        tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-15:])
        raise ToolError(f"{name} failed (exit {done.returncode}):\n{tail}")


# ------------------------------------------------------------------------------------------ measure
def feeds_for(size: int) -> dict[str, dict]:
    import numpy as np

    images = np.random.default_rng(0).random((1, 3, size, size), dtype=np.float32)
    return {
        "detr_lab": {"images": images, "padding_mask": np.zeros((1, size, size), bool)},
        "official": {"images": images, "orig_target_sizes": np.array([[size, size]], np.int64)},
    }


def check_agreement(paths: dict[str, Path], feeds: dict[str, dict], size: int) -> dict:
    from detr_lab.benchmark.onnx_compare import compare_detections, make_session, official_postprocess

    logits, boxes = make_session(paths["detr_lab"], 1).run(["pred_logits", "pred_boxes"], feeds["detr_lab"])
    official = make_session(paths["official"], 1).run(["labels", "boxes", "scores"], feeds["official"])
    ours = official_postprocess(logits[0], boxes[0], size, size, top=official[2].shape[-1])
    return compare_detections(ours, tuple(a[0] for a in official))


def profile(paths: dict[str, Path], feeds: dict[str, dict], work: Path, runs: int) -> dict[str, dict]:
    from detr_lab.benchmark.onnx_compare import make_session, profile_by_op_type, time_sessions

    for old in glob.glob(str(work / "profile_*.json")):
        os.remove(old)
    sessions = {
        name: make_session(paths[name], 1, profile_prefix=str(work / f"profile_{name}")) for name in NAMES
    }
    time_sessions(sessions, feeds, runs=runs, warmup=0)
    return {name: profile_by_op_type(session.end_profiling()) for name, session in sessions.items()}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    def body() -> None:
        import torch

        from detr_lab.benchmark.machine import describe_machine, load_average, machine_line
        from detr_lab.benchmark.onnx_compare import (
            format_comparison,
            make_session,
            op_type_counts,
            ratios,
            runtime_versions,
            time_sessions,
        )
        from detr_lab.benchmark.report import write_report

        work = args.work_dir.resolve()
        work.mkdir(parents=True, exist_ok=True)
        family = FAMILIES[args.family]
        script = args.official_dir / family["script"]
        if not script.is_file():
            raise InputNotFoundError(
                f"{script} not found (--official-dir: RT-DETR's rtdetrv2_pytorch folder, or D-FINE's root)"
            )
        planned = commands(args, work)
        paths = {"detr_lab": work / "detr_lab.onnx", "official": work / "official.onnx"}
        if args.skip_export:
            missing = [str(p) for p in paths.values() if not p.is_file()]
            if missing:
                raise InputNotFoundError(f"--skip-export: no earlier export at {', '.join(missing)}")
        else:
            torch.save({"model": official_state(args)}, work / "official_checkpoint.pth")
            for name, command in planned.items():
                run_command(name, command)
            written = work / "official_checkpoint.onnx"  # D-FINE's script: named after the checkpoint
            if family["updates"] is None and written.is_file():
                written.replace(paths["official"])
        feeds = feeds_for(args.size)
        agreement = check_agreement(paths, feeds, args.size)
        print(f"agreement (top 300 detections of one image): {agreement}", file=sys.stderr)
        if agreement["max_score_difference"] > 1e-4:
            raise ToolError(f"the two graphs disagree: {agreement}; they do not hold the same model")

        machine = describe_machine("cpu")
        machine.update(runtime_versions())
        rows = []
        for threads in args.threads:
            sessions = {name: make_session(paths[name], threads) for name in NAMES}
            times = time_sessions(sessions, feeds, runs=args.runs, warmup=args.warmup, block=args.block)
            row = {"threads": threads, "times": times,
                   "ratios": {"detr_lab": ratios(times, "detr_lab", "official")}}
            rows.append(row)
            medians = {name: times[name]["wall_s"]["median"] * 1e3 for name in NAMES}
            print(f"{threads} thread(s): detr_lab {medians['detr_lab']:.0f} ms, official "
                  f"{medians['official']:.0f} ms, ratio {row['ratios']['detr_lab']}",
                  file=sys.stderr, flush=True)
        machine["load_average_end"] = load_average()
        report = {
            "machine": machine,
            "settings": {"family": args.family, "size": args.size, "batch": 1, "threads": args.threads,
                         "runs": args.runs, "block": args.block,
                         "warmup": args.warmup, "weights": str(args.checkpoint or "synthetic (test fixture)"),
                         "official_exporter": args.official_exporter},
            "commands": planned,
            "agreement": agreement,
            "op_types": {name: op_type_counts(paths[name]) for name in NAMES},
            "results": rows,
        }
        if args.profile:
            report["profile_ms_by_op_type"] = profile(paths, feeds, work, max(args.runs // 2, 3))

        print(f"{family['title']}, {args.size} x {args.size}, batch 1, onnxruntime {machine['onnxruntime']}, "
              f"median of {args.runs} runs (after {args.warmup} warm-up rounds), the graphs taking turns:\n")
        print(format_comparison(rows, NAMES, baseline="official"))
        print()
        for name in NAMES:
            counts = report["op_types"][name]
            top = ", ".join(f"{op} {n}" for op, n in list(counts.items())[:12])
            print(f"{name} graph: {sum(counts.values())} nodes ({top}, ...)")
        if args.profile:
            for name in NAMES:
                ops = report["profile_ms_by_op_type"][name]
                top = ", ".join(f"{op} {ms:.1f}" for op, ms in list(ops.items())[:10])
                print(f"{name} profile, ms per run (1 thread): total {sum(ops.values()):.1f}: {top}")
        print(machine_line(machine))
        print("\ncommands:")
        for name, command in planned.items():
            print(f"  # {name}\n  (cd {command['cwd']} && {shlex.join(command['argv'])})")
        path = write_report(report, args.json or work / "report.json")
        print(f"report written to {path}")

    return run_tool("bench_official_onnx.py", body, debug=args.debug)


if __name__ == "__main__":
    sys.exit(main())
