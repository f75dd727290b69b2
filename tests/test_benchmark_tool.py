"""tools/benchmark.py: config selection, one quick run to JSON, errors."""

from __future__ import annotations

import json

import pytest

from factories import load_tool


@pytest.fixture(scope="module")
def tool():
    return load_tool("benchmark")


def test_all_takes_the_model_configs_but_not_the_demos(tool, tmp_path):
    for name in ("demo.yaml", "demo_detr.yaml", "detr_r50.yaml", "deformable_detr_r50.yaml"):
        (tmp_path / name).write_text("{}\n")
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "model_detr_r50.yaml").write_text("{}\n")
    assert [p.name for p in tool.variant_configs(tmp_path)] == ["deformable_detr_r50.yaml", "detr_r50.yaml"]
    assert "detr_r50.yaml" in [p.name for p in tool.variant_configs()]


def test_one_reference_inference_run_writes_json(tool, tmp_path, capsys):
    config = tmp_path / "tiny.yaml"
    config.write_text(
        "model: {hidden_dim: 32, num_heads: 2, ffn_dim: 64, num_queries: 4, "
        "backbone: {name: resnet18}, encoder: {num_layers: 1}, decoder: {num_layers: 1}}\n"
    )
    out = tmp_path / "bench.json"
    code = tool.main([
        "--config", str(config), "--sizes", "64x64", "--batch-sizes", "1", "--tasks", "inference",
        "--reference", "--runs", "1", "--warmup", "0", "--threads", "1", "--json", str(out),
    ])
    assert code == 0
    report = json.loads(out.read_text())
    (case,) = report["models"][0]["cases"]
    assert list(case["modes"]) == ["reference"] and "ratio" not in case
    assert "tiny" in capsys.readouterr().out


def test_bad_size_and_missing_config_fail_cleanly(tool, tmp_path, capsys):
    with pytest.raises(SystemExit):
        tool.main(["--config", "x.yaml", "--sizes", "800by1066"])
    assert tool.main(["--config", str(tmp_path / "missing.yaml"), "--json", str(tmp_path / "b.json")]) == 2
    assert "config file not found" in capsys.readouterr().err
