"""The benchmark package's shared parts: timer, machine description, table, report, and the thin
tools/bench_deformable_core.py built on them."""

from __future__ import annotations

import json
import time

import pytest
import torch

from detr_lab.benchmark.machine import describe_machine, machine_line, package_version
from detr_lab.benchmark.report import format_table, write_report
from detr_lab.timer import ratio, time_interleaved

from factories import load_tool


def test_calls_take_turns_in_alternating_order():
    order = []
    calls = {name: (lambda name=name: order.append(name)) for name in ("a", "b", "c")}
    times = time_interleaved(calls, runs=3, warmup=1)
    assert order == ["a", "b", "c"] + ["a", "b", "c", "c", "b", "a", "a", "b", "c"]
    assert all(len(times[name]["wall"]) == len(times[name]["cpu"]) == 3 for name in calls)
    with pytest.raises(ValueError, match="runs must be >= 1"):
        time_interleaved(calls, runs=0, warmup=0)


def test_sleeping_counts_as_wall_time_not_cpu_time():
    times = time_interleaved({"sleep": lambda: time.sleep(0.02)}, runs=2, warmup=0)["sleep"]
    assert all(wall >= 0.02 for wall in times["wall"])
    assert all(cpu < 0.02 for cpu in times["cpu"])


def test_ratio_rounds_and_refuses_zero():
    assert ratio(1.0, 3.0) == 0.3333 and ratio(1.0, 0.0) is None


def test_one_machine_description():
    info = describe_machine("cpu")
    assert info["torch"] == torch.__version__ and info["torch_threads"] == torch.get_num_threads()
    assert info["torchvision"] and info["device"] == "cpu" and "gpu_name" not in info
    assert info["triton"] == package_version("triton")
    assert info["onnxruntime"] == package_version("onnxruntime")
    assert package_version("no-such-distribution-here") is None
    line = machine_line({**info, "load_average_end": [0.5, 0.5, 0.5]})
    assert line.startswith(f"machine: {info['cpu_model']}") and line.endswith("-> [0.5, 0.5, 0.5]")
    assert ("onnxruntime" in line) == (info["onnxruntime"] is not None)


def test_table_and_report(tmp_path):
    table = format_table(("name", "ms"), [("reference", "12.5"), ("fast", "3")])
    assert table.splitlines() == ["name       ms", "---------  ----", "reference  12.5", "fast       3"]
    with pytest.raises(ValueError, match="has 1 cells; the header has 2"):
        format_table(("name", "ms"), [("x",)])
    path = write_report({"machine": {"cpu_model": "x"}, "rows": [1]}, tmp_path / "out" / "r.json")
    assert json.loads(path.read_text()) == {"machine": {"cpu_model": "x"}, "rows": [1]}


def test_deformable_core_tool_is_thin_and_writes_the_shared_report(tmp_path, capsys):
    tool = load_tool("bench_deformable_core")
    out = tmp_path / "core.json"
    code = tool.main(["--kinds", "decoder", "--runs", "1", "--warmup", "0", "--no-backward", "--threads", "1",
                      "--json", str(out)])  # fmt: skip
    assert code == 0
    report = json.loads(out.read_text())
    assert set(report) == {"machine", "settings", "rows"} and report["machine"]["torch_threads"] == 1
    assert [(row["impl"], row["pass"]) for row in report["rows"]] == [
        ("reference", "forward"), ("cpu_fast", "forward")
    ]
    assert report["rows"][0]["speedup"] == 1.0
    printed = capsys.readouterr().out
    assert "speed-up" in printed and "cpu_fast" in printed and f"wrote {out}" in printed
    assert tool.main(["--device", "cuda", "--json", str(out)]) == (1 if not torch.cuda.is_available() else 0)
