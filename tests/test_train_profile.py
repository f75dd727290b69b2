"""`detr_lab.benchmark.train_profile` and tools/profile_train_step.py on a tiny DETR (no timings
checked, only that every phase is measured and the parts add up to their phases)."""

from __future__ import annotations

import json

import pytest
import torch

from detr_lab.benchmark.train_profile import fixed_batch, lightning_step_times, profile_manual_steps
from detr_lab.config import load_config
from detr_lab.engine.module import DetectionModule
from detr_lab.models.loss_terms import LOSS_TERMS

from factories import load_tool, tiny_overrides

TINY = tiny_overrides(num_classes=4, num_heads=2, num_queries=5, dropout=0.1, decoder__num_layers=2)


@pytest.fixture()
def module(tmp_path):
    cfg = load_config(overrides=[*TINY, f"trainer.output_dir={tmp_path / 'run'}", "optim.clip_grad_norm=0.1"])
    torch.manual_seed(0)
    return DetectionModule(cfg, [1, 2, 3, 4], ["a", "b", "c", "d"])


def test_every_phase_is_timed_and_the_parts_add_up(module):
    batch = fixed_batch(module.cfg, 2, 48, 64, objects=3)
    weights_before = [p.detach().clone() for p in module.model.parameters()]
    phases = profile_manual_steps(module, batch, steps=2, warmup=1)
    for name in ("zero_grad", "forward", "loss", "backward", "clip_grad_norm", "optimizer_step", "total",
                 "forward/backbone", "forward/decoder", "forward/enc_attn_core", "forward/enc_ffn",
                 "loss/matcher", "loss/labels", "loss/boxes", "loss/other", "forward/other"):
        assert name in phases, name
    assert phases["loss/matcher"] > 0 and phases["backward"] > 0 and phases["forward/backbone"] > 0
    steps = sum(phases[name] for name in ("zero_grad", "forward", "loss", "backward", "clip_grad_norm",
                                          "optimizer_step"))
    assert steps <= phases["total"] * 1.05 + 1e-3  # medians of sums and sums of medians differ a little
    # the wrappers are gone: the criterion and matcher are the module's own again
    assert "forward" not in vars(module.criterion.matcher)
    assert all(term is LOSS_TERMS[name] for name, term in module.criterion.loss_terms.items())
    assert any(not torch.equal(a, b) for a, b in zip(weights_before, module.model.parameters(), strict=True))


def test_lightning_steps_are_timed(module):
    batch = fixed_batch(module.cfg, 2, 48, 64, objects=3)
    seconds = lightning_step_times(module, batch, steps=3, warmup=1)
    assert len(seconds) == 3 and all(value > 0 for value in seconds)


def test_tool_prints_the_table_and_writes_json(tmp_path, capsys):
    config = tmp_path / "tiny.yaml"
    config.write_text(f"trainer: {{output_dir: {tmp_path / 'run'}}}\n")
    out = tmp_path / "profile.json"
    tool = load_tool("profile_train_step")
    arguments = ["--config", str(config), "--size", "48x64", "--steps", "2", "--threads", "1",
                 "--json", str(out)]
    assert tool.main([*arguments, *[f"--set={item}" for item in TINY]]) == 0
    text = capsys.readouterr().out
    assert "loss/matcher" in text and "step (Lightning)" in text
    report = json.loads(out.read_text())
    assert report["size"] == [48, 64] and len(report["lightning_step"]) == 2
    assert tool.main(["--config", str(config), "--steps", "0"]) == 1
    assert "--steps must be >= 1, got 0" in capsys.readouterr().err
