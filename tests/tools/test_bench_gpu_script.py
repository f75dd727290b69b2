"""tools/bench_gpu.sh runs on the CPU (`--device cpu --tiny`), so the GPU run cannot rot unnoticed: the
deformable core and every member's inference and training step, float32 and bf16, in one JSON."""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest

from factories import REPO

MEMBERS = {"detr_r50", "deformable", "dino_4scale", "rtdetrv2_r50vd", "dfine_l"}
# The two members cheapest to step on the CPU (all five at --tiny: about 4 minutes of CPU time).
CI_MEMBERS = {"dino_4scale", "dfine_l"}


def test_bench_gpu_script_measures_every_member_by_default():
    text = (REPO / "tools" / "bench_gpu.sh").read_text()
    default = text.split('CONFIGS=${BENCH_GPU_CONFIGS:-"', 1)[1].split('"}', 1)[0]
    configs = default.replace("\\\n", " ").split()
    assert {config.removeprefix("configs/").removesuffix(".yaml") for config in configs} == MEMBERS
    assert all((REPO / config).is_file() for config in configs)


@pytest.mark.slow  # two R50-class models built and stepped once at 64 x 64
@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_bench_gpu_script_runs_on_the_cpu_and_writes_one_report(tmp_path):
    configs = " ".join(f"configs/{name}.yaml" for name in sorted(CI_MEMBERS))
    env = {**os.environ, "PYTHONPATH": str(REPO), "MODEL_TIMEOUT": "900", "BENCH_GPU_CONFIGS": configs}
    done = subprocess.run(
        ["bash", str(REPO / "tools" / "bench_gpu.sh"), "--device", "cpu", "--tiny", "--out", str(tmp_path)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1200,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((tmp_path / "bench_gpu.json").read_text())
    assert report["device"] == "cpu" and report["tiny"] is True
    rows = report["deformable_core"]["rows"]
    assert {(r["kind"], r["pass"], r["dtype"], r["impl"]) for r in rows} == {
        (kind, step, dtype, impl) for kind in ("encoder", "decoder")
        for step in ("forward", "forward+backward") for dtype in ("float32", "bfloat16")
        for impl in ("reference", "cpu_fast")
    }
    models = {model["name"]: model for model in report["models"]["models"]}
    assert set(models) == CI_MEMBERS
    for name, model in models.items():
        cases = {case["task"]: case for case in model["cases"]}
        assert set(cases) == {"inference", "train_step"}, name
        for task, case in cases.items():
            assert set(case["modes"]) == {"fast", "fast_bf16"}, (name, task)
            assert all(mode["wall_s"]["median"] > 0 for mode in case["modes"].values()), (name, task)


def test_bench_gpu_script_refuses_an_unknown_device(tmp_path):
    done = subprocess.run(
        ["bash", str(REPO / "tools" / "bench_gpu.sh"), "--device", "tpu", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=60,
    )
    assert done.returncode == 2 and "--device is 'tpu'; expected cuda or cpu" in done.stderr
