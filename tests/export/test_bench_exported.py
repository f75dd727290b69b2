"""tools/bench_exported.py: a checkpoint's PyTorch fast path against its exported files."""

from __future__ import annotations

import json

import pytest
import torch

from detr_lab.checkpoints import load_checkpoint
from detr_lab.export.metadata import ExportMetadata
from detr_lab.export.onnx_export import export_onnx

from factories import load_tool

pytest.importorskip("onnxruntime", reason="the export extra is not installed")


def test_times_every_backend_and_reports_the_ratio(checkpoints, tmp_path, capsys):
    loaded = load_checkpoint(checkpoints["detr"])
    onnx_path = export_onnx(loaded.model, tmp_path / "detr.onnx", metadata=ExportMetadata.from_loaded(loaded),
                            height=64, width=96, batch=1)
    report = tmp_path / "report.json"
    argv = ["--checkpoint", str(checkpoints["detr"]), "--file", f"onnxruntime={onnx_path}", "--size", "64x96",
            "--threads", "1", "--runs", "2", "--warmup", "1", "--json", str(report)]
    threads = torch.get_num_threads()
    assert load_tool("bench_exported").main(argv) == 0
    assert torch.get_num_threads() == threads  # the tool's --threads 1 does not outlive it
    out = capsys.readouterr().out
    assert "pytorch_fast" in out and "onnxruntime" in out and "machine:" in out
    data = json.loads(report.read_text())
    backends = data["results"][0]["backends"]
    assert set(backends) == {"pytorch_fast", "onnxruntime"}
    assert len(backends["onnxruntime"]["wall_ms"]["values"]) == 2
    median = backends["onnxruntime"]["wall_ms"]["median"]
    assert backends["onnxruntime"]["vs_pytorch_fast"] == pytest.approx(
        backends["pytorch_fast"]["wall_ms"]["median"] / median, rel=1e-2
    )


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--file", "onnxruntime"], "expected NAME=PATH"),
        (["--file", "a=x.onnx", "--file", "a=y.onnx"], "given twice"),
        (["--file", "ort=missing.onnx"], "missing.onnx not found"),
        (["--file", "pytorch_fast=x.onnx"], "name pytorch_fast"),
        (["--size", "64by96"], "expected HxW"),
    ],
)
def test_bad_input_is_one_line_and_non_zero(checkpoints, tmp_path, monkeypatch, capsys, extra, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "x.onnx").write_bytes(b"")
    argv = ["--checkpoint", str(checkpoints["detr"]), *extra]
    assert load_tool("bench_exported").main(argv) != 0
    assert message in capsys.readouterr().err
