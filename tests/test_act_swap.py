"""ACT on trained weights: a plain-attention checkpoint runs with adaptive clustering attention through a
config override, with no retraining (detr_lab checkpoints and converted official DETR ones).

With a tiny bucket width every query is its own cluster and ACT is exact attention, so the outputs
must equal the plain model's: the strongest check that every weight went through. With a huge one
each head has a single cluster, so every token of an image receives the same attention output.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from detr_lab.checkpoints import load_checkpoint, save_checkpoint
from detr_lab.config import load_config
from detr_lab.models.attention.clustering import AdaptiveClusteringAttention
from detr_lab.models.attention.plain import PlainAttention
from detr_lab.models.build import build_criterion, build_model

from factories import architecture_differences, official_reference, tiny_overrides

TINY = tiny_overrides(num_heads=2, num_queries=5, dropout=0.0, encoder__num_layers=2)
ACT = "model.encoder.attention=act"


def encoder_attention(model) -> list[torch.nn.Module]:
    return [layer.self_attn for layer in model.transformer.encoder.layers]


@pytest.fixture(scope="module")
def plain_checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    cfg = load_config(overrides=TINY)
    model = build_model(cfg.model).eval()
    path = tmp_path_factory.mktemp("act") / "plain.pt"
    save_checkpoint(path, model, cfg, [1, 2, 3], ["a", "b", "c"])
    images = torch.randn(2, 3, 128, 160)
    padding_mask = torch.zeros(2, 128, 160, dtype=torch.bool)
    padding_mask[1, 96:] = True  # the second image is 96 x 128: 3 x 4 real tokens of 4 x 5
    padding_mask[1, :, 128:] = True
    with torch.no_grad():
        reference = model(images, padding_mask, return_memory=True)
    return {"path": path, "images": images, "padding_mask": padding_mask, "reference": reference}


def run(model, data):
    with torch.no_grad():
        return model(data["images"], data["padding_mask"], return_memory=True)


def test_tiny_bucket_width_reproduces_the_plain_checkpoint(plain_checkpoint):
    overrides = [ACT, "model.encoder.act.q_hashes=16", "model.encoder.act.bucket_width=1e-6"]
    loaded = load_checkpoint(plain_checkpoint["path"], overrides=overrides)
    modules = encoder_attention(loaded.model)
    assert loaded.config.model.encoder.attention == "act"
    assert all(isinstance(m, AdaptiveClusteringAttention) for m in modules)
    assert [(m.q_hashes, m.bucket_width) for m in modules] == [(16, 1e-6)] * 2
    # Only the encoder self-attention changes: the decoder keeps plain attention.
    assert all(type(layer.cross_attn) is PlainAttention for layer in loaded.model.transformer.decoder.layers)
    outputs = run(loaded.model, plain_checkpoint)
    reference = plain_checkpoint["reference"]
    for key in ("memory", "pred_logits", "pred_boxes"):
        torch.testing.assert_close(outputs[key], reference[key], atol=1e-5, rtol=0)
    # Every real query is its own cluster: 20 tokens in image 0, 12 in image 1, per head.
    for module in modules:
        assert module.last_clusters_per_head.tolist() == [[20, 20], [12, 12]]


def test_huge_bucket_width_gives_one_prototype_per_head(plain_checkpoint):
    loaded = load_checkpoint(plain_checkpoint["path"], overrides=[ACT, "model.encoder.act.bucket_width=1e4"])
    first = encoder_attention(loaded.model)[0]
    captured = {}
    first.register_forward_hook(lambda module, args, output: captured.setdefault("out", output))
    outputs = run(loaded.model, plain_checkpoint)
    assert all(m.last_clusters_per_head.tolist() == [[1, 1], [1, 1]] for m in encoder_attention(loaded.model))
    # One prototype per head: every real token of an image gets the same attention output.
    attended = captured["out"]  # (B, S, d)
    real = ~outputs["memory_padding_mask"]
    for image in range(2):
        rows = attended[image][real[image]]
        torch.testing.assert_close(rows, rows[:1].expand_as(rows), atol=1e-6, rtol=0)
    # ... which is not what plain attention computes, so the detections move.
    difference = (outputs["pred_boxes"] - plain_checkpoint["reference"]["pred_boxes"]).abs().max()
    assert difference > 1e-4


def official_layout(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A detr_lab DETR state dict rewritten in facebookresearch/detr's key layout (packed q/k/v
    projections, norm1..3, `multihead_attn`, `backbone.0.body.`), written out independently here."""
    norms = {"encoder": {"self_attn_norm": "norm1", "ffn_norm": "norm2"},
             "decoder": {"self_attn_norm": "norm1", "cross_attn_norm": "norm2", "ffn_norm": "norm3"}}
    official = {}
    for name, tensor in state.items():
        parts = name.split(".")
        if parts[0] == "backbone":
            official["backbone.0.body." + ".".join(parts[2:])] = tensor
        elif parts[:2] == ["neck", "input_proj"]:
            official["input_proj." + parts[-1]] = tensor
        elif parts[0] == "query_source":
            official[".".join(parts[1:])] = tensor
        elif parts[:2] == ["transformer", "decoder"] and parts[2] == "norm":
            official[name] = tensor
        elif parts[0] == "transformer":
            stack, layer, block, rest = parts[1], parts[3], parts[4], parts[5:]
            prefix = f"transformer.{stack}.layers.{layer}."
            if block in ("self_attn", "cross_attn"):
                attention = prefix + ("self_attn" if block == "self_attn" else "multihead_attn")
                if rest[0] == "out_proj":
                    official[f"{attention}.out_proj.{rest[1]}"] = tensor
                elif rest[0] == "q_proj":  # k_proj, v_proj follow it in the packed tensor
                    packed = [state[name.replace("q_proj", p)] for p in ("q_proj", "k_proj", "v_proj")]
                    official[f"{attention}.in_proj_{rest[1]}"] = torch.cat(packed)
            elif block == "ffn":
                official[prefix + ".".join(rest)] = tensor
            else:
                official[prefix + norms[stack][block] + "." + rest[0]] = tensor
        else:
            official[name] = tensor
    return official


def test_converted_official_detr_checkpoint_runs_with_act(plain_checkpoint):
    """An official-layout DETR checkpoint goes through the converter; ACT with a tiny bucket width then
    reproduces the plain model the weights came from."""
    plain = load_checkpoint(plain_checkpoint["path"])
    official = {"model": official_layout(plain.model.state_dict())}
    overrides = [ACT, "model.num_heads=2", "model.encoder.act.bucket_width=1e-6"]
    loaded = load_checkpoint(official, overrides=overrides)
    assert loaded.config.model.num_classes == 3  # inferred from the official class head
    assert all(isinstance(m, AdaptiveClusteringAttention) for m in encoder_attention(loaded.model))
    assert loaded.config.model.encoder.act.q_hashes == 32
    outputs = run(loaded.model, plain_checkpoint)
    for key in ("memory", "pred_logits", "pred_boxes"):
        torch.testing.assert_close(outputs[key], plain_checkpoint["reference"][key], atol=1e-5, rtol=0)


def test_act_model_trains_from_scratch():
    torch.manual_seed(0)
    hashing = ["model.encoder.act.q_hashes=8", "model.encoder.act.bucket_width=0.5"]
    frozen = "model.backbone.frozen_stages=4"  # no backbone gradients: faster
    cfg = load_config(overrides=[*TINY, ACT, *hashing, frozen])
    model = build_model(cfg.model).train()
    criterion = build_criterion(cfg.model, cfg.loss)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    images = torch.randn(2, 3, 64, 96)
    padding_mask = torch.zeros(2, 64, 96, dtype=torch.bool)
    targets = [
        {"labels": torch.tensor([0, 2]), "boxes": torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.7, 0.6, 0.3, 0.4]])},
        {"labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 0.4, 0.3]])},
    ]
    query_weight = encoder_attention(model)[0].q_proj.weight
    before = query_weight.detach().clone()
    losses = criterion(model(images, padding_mask), targets)
    total = criterion.total_loss(losses)
    total.backward()
    assert torch.isfinite(total)
    # The encoder's query projection learns through the cluster means.
    assert query_weight.grad is not None and query_weight.grad.abs().sum() > 0
    optimizer.step()
    assert not torch.equal(query_weight.detach(), before)


def test_act_config_is_the_official_detr_r50_dc5_with_an_act_encoder():
    """configs/act.yaml runs ACT on the official DETR-R50-DC5 weights: its model section is the
    architecture inferred from the official checkpoint fixture (keys the weights cannot tell aside),
    only the encoder's attention differs."""
    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "act.yaml")
    official, _ = official_reference("detr_r50", dilation=True)
    assert cfg.model.encoder.attention == "act" and official.model.encoder.attention == "plain"
    assert cfg.model.backbone.dilation  # DC5
    encoder = dataclasses.replace(official.model.encoder, attention="act", act=cfg.model.encoder.act)
    official.model = dataclasses.replace(official.model, encoder=encoder)
    assert architecture_differences(cfg, official) == {}


def test_demo_act_config_differs_from_its_teacher_only_in_encoder_attention():
    configs = Path(__file__).resolve().parents[1] / "configs"
    student = load_config(configs / "demo_act.yaml")
    teacher = load_config(configs / "demo_act_teacher.yaml")
    assert (teacher.model.encoder.attention, student.model.encoder.attention) == ("plain", "act")
    assert student.distill.enabled and student.distill.init_student
    encoder = dataclasses.replace(teacher.model.encoder, attention="act", act=student.model.encoder.act)
    swapped = dataclasses.replace(teacher.model, encoder=encoder)
    assert swapped == student.model
