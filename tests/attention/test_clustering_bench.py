"""tools/bench_act.py on a tiny map: FLOP counts against closed forms, JSON output, token files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from factories import load_tool


@pytest.fixture(scope="module")
def bench():
    return load_tool("bench_act")


def _common(tmp_path: Path) -> list[str]:
    # 48 x 80 image, stride 16 -> 3 x 5 = 15 tokens; d 16, 2 heads (head_dim 8).
    return ["--image-size", "48", "80", "--embed-dim", "16", "--heads", "2", "--runs", "1", "--warmup", "0",
            "--json", str(tmp_path / "out.json")]  # fmt: skip


def test_flop_counts_match_closed_forms(bench, tmp_path):
    bench.main(_common(tmp_path) + ["--hashes", "4", "--bucket-width", "1e-6", "1e6"])
    result = json.loads((tmp_path / "out.json").read_text())
    tokens, dim, heads, head_dim = 15, 16, 2, 8
    assert result["setting"]["feature_map"] == [3, 5] and result["setting"]["tokens"] == tokens
    assert "synthetic" in result["setting"]["source"]
    projections = 4 * 2 * tokens * dim * dim
    plain_attention = 2 * 2 * heads * tokens * tokens * head_dim
    assert result["plain"]["gflops"] * 1e9 == pytest.approx(projections + plain_attention)
    hashing = 2 * heads * tokens * head_dim * 4
    tiny, huge = result["act"]
    assert tiny["mean_clusters"] == tokens and huge["mean_clusters"] == 1
    assert tiny["relative_error"] < 1e-5 < huge["relative_error"]
    for row, clusters in ((tiny, tokens), (huge, 1)):
        attention = 2 * 2 * heads * clusters * tokens * head_dim
        assert row["act_gflops_counted"] * 1e9 == pytest.approx(projections + hashing + attention)
        extra = heads * (3 * tokens * 4 + tokens * head_dim + clusters * head_dim)
        assert row["act_gflops_extra"] * 1e9 == pytest.approx(extra)
    assert result["machine"]["torch"] == torch.__version__


def test_tokens_file_is_used_and_checked(bench, tmp_path):
    tokens = torch.randn(2, 15, 16)
    padding = torch.zeros(2, 15, dtype=torch.bool)
    padding[1, 10:] = True
    path = tmp_path / "tokens.pt"
    torch.save({"query": tokens, "value": tokens.flip(1), "padding_mask": padding}, path)
    bench.main(_common(tmp_path) + ["--hashes", "2", "--tokens", str(path)])
    result = json.loads((tmp_path / "out.json").read_text())
    assert str(path) in result["setting"]["source"] and result["setting"]["batch"] == 2
    torch.save(torch.randn(1, 15, 8), path)
    with pytest.raises(ValueError, match="query"):
        bench.main(_common(tmp_path) + ["--tokens", str(path)])
    with pytest.raises(SystemExit, match="alternatives"):
        bench.main(_common(tmp_path) + ["--tokens", str(path), "--checkpoint", "model.ckpt"])
