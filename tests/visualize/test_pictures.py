"""Pictures: hook recomputations against the modules' own outputs, every picture on a tiny model, curves."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from PIL import Image

from detr_lab.checkpoints import save_checkpoint
from detr_lab.config import load_config
from detr_lab.data.synthetic import draw_synthetic_image
from detr_lab.data.transforms import build_eval_transform
from detr_lab.models.attention.clustering import AdaptiveClusteringAttention
from detr_lab.models.attention.deformable import MultiScaleDeformableAttention
from detr_lab.models.attention.kernels import ms_deform_attn_core
from detr_lab.models.attention.plain import PlainAttention
from detr_lab.models.build import build_model
from detr_lab.visualize.attention import clusters_picture, cross_attention_picture, sampling_points_picture
from detr_lab.visualize.capture import (
    act_cluster_index,
    deformable_sampling,
    plain_attention_weights,
    record_inputs,
)
from detr_lab.visualize.curves import find_metrics_csv, plot_run_curves, read_metrics
from detr_lab.visualize.draw import class_color, draw_detections, save_picture

from factories import load_tool, tiny_overrides

TINY = tiny_overrides("data.augment.eval_size=96", "data.augment.eval_max_size=160")
DEFORMABLE = ["model.num_feature_levels=2", "model.encoder.attention=deformable",
              "model.decoder.cross_attention=deformable", "model.classification=sigmoid"]
ACT = ["model.encoder.attention=act"]


def _model(extra=()):
    cfg = load_config(overrides=[*TINY, *extra])
    torch.manual_seed(0)
    return cfg, build_model(cfg.model).eval()


@pytest.fixture(scope="module")
def scene():
    """A synthetic picture with shapes, and its evaluation-transformed tensor `[3, 96, W]`."""
    picture, _ = draw_synthetic_image(128, np.random.default_rng(1))
    rgb = np.asarray(picture)
    cfg = load_config(overrides=TINY)
    image, _, _ = build_eval_transform(cfg.data.augment)(rgb, np.zeros((0, 4), np.float32),
                                                         np.zeros((0,), np.int64))
    return rgb, image


def _padded_batch():
    g = torch.Generator().manual_seed(2)
    images = torch.randn(2, 3, 64, 80, generator=g)
    padding_mask = torch.zeros(2, 64, 80, dtype=torch.bool)
    padding_mask[1, :, 48:] = True
    padding_mask[1, 40:] = True
    return images, padding_mask


# ------------------------------------------------------------------------------- recomputation
def test_plain_weights_reproduce_the_module_output():
    _, model = _model()
    module = model.transformer.decoder.layers[-1].cross_attn
    assert type(module) is PlainAttention
    outputs = {}
    module.register_forward_hook(lambda m, a, k, out: outputs.setdefault("out", out), with_kwargs=True)
    with record_inputs([module]) as records, torch.no_grad():
        model(*_padded_batch())
    record = records[0]
    weights = plain_attention_weights(module, record)  # (B, nh, Q, S)
    torch.testing.assert_close(weights.sum(-1), torch.ones(weights.shape[:-1]))
    assert (weights[1][..., record["key_padding_mask"][1]] == 0).all()
    values = module.split_heads(module.v_proj(record["value"]))
    rebuilt = module.out_proj(module.merge_heads(weights @ values))
    torch.testing.assert_close(rebuilt, outputs["out"], rtol=1e-5, atol=1e-5)


def test_plain_weights_follow_attn_mask_and_fully_blocked_rows():
    torch.manual_seed(0)
    module = PlainAttention(16, 2).eval()
    query, key = torch.randn(2, 3, 16), torch.randn(2, 5, 16)
    attn_mask = torch.zeros(3, 5, dtype=torch.bool)
    attn_mask[0, :2] = True
    attn_mask[2] = True  # query 2 may attend to nothing
    padding = torch.tensor([[False] * 5, [False, False, False, True, True]])
    with record_inputs([module]) as records, torch.no_grad():
        out = module(query, key, key, key_padding_mask=padding, attn_mask=attn_mask)
    weights = plain_attention_weights(module, records[0])
    assert (weights[:, :, 0, :2] == 0).all() and (weights[1, :, :, 3:] == 0).all()
    assert (weights[:, :, 2] == 0).all()
    torch.testing.assert_close(weights[:, :, :2].sum(-1), torch.ones(2, 2, 2))
    rebuilt = module.out_proj(module.merge_heads(weights @ module.split_heads(module.v_proj(key))))
    torch.testing.assert_close(rebuilt, out, rtol=1e-5, atol=1e-5)


def test_deformable_locations_and_weights_reproduce_the_module_output():
    _, model = _model(DEFORMABLE)
    module = model.transformer.decoder.layers[0].cross_attn
    assert isinstance(module, MultiScaleDeformableAttention)
    outputs = {}
    module.register_forward_hook(lambda m, a, k, out: outputs.setdefault("out", out), with_kwargs=True)
    with record_inputs([module]) as records, torch.no_grad():
        model(*_padded_batch())
    record = records[0]
    locations, weights = deformable_sampling(module, record)
    batch, queries = record["query"].shape[:2]
    assert locations.shape == (batch, queries, 4, 2, 4, 2) and weights.shape == (batch, queries, 4, 2, 4)
    torch.testing.assert_close(weights.sum((-1, -2)), torch.ones(batch, queries, 4))
    value = module.value_proj(record["value"]).masked_fill(record["key_padding_mask"][..., None], 0.0)
    value = value.view(batch, -1, module.num_heads, module.head_dim)
    core = ms_deform_attn_core(value, record["spatial_shapes"], record["level_start_index"], locations,
                               weights, impl="reference")
    torch.testing.assert_close(module.output_proj(core), outputs["out"], rtol=1e-4, atol=1e-5)


def test_act_clusters_are_the_modules_clusters():
    _, model = _model(ACT)
    module = model.transformer.encoder.layers[0].self_attn
    assert isinstance(module, AdaptiveClusteringAttention)
    with record_inputs([module]) as records, torch.no_grad():
        model(*_padded_batch())
    clusters = act_cluster_index(module, records[0])  # (B, nh, S)
    padding = records[0]["key_padding_mask"]
    real = torch.stack([torch.stack([h[~padding[b]].unique().numel() * torch.ones(()) for h in clusters[b]])
                        for b in range(2)]).long()
    assert torch.equal(real, module.last_clusters_per_head)
    assert (clusters[1][:, padding[1]][:, :, None] != clusters[1][:, ~padding[1]][:, None, :]).all()


def test_hooks_are_removed_after_the_block():
    _, model = _model()
    module = model.transformer.decoder.layers[0].cross_attn
    with record_inputs([module]) as records, torch.no_grad():
        pass
    assert records == [{}] and not module._forward_hooks


# ----------------------------------------------------------------------------------- pictures
def _check_png(path: Path, min_height: int) -> np.ndarray:
    with Image.open(path) as image:
        assert image.format == "PNG"
        pixels = np.asarray(image.convert("RGB"))
    assert pixels.shape[0] >= min_height and pixels.std() > 10  # an actual picture, not a blank canvas
    return pixels


def test_each_attention_picture_is_written(tmp_path, scene):
    _, image = scene
    _, detr = _model()
    _check_png(cross_attention_picture(detr, image, tmp_path / "attn.png", layer=0, head=1), image.shape[1])
    _check_png(cross_attention_picture(detr, image, tmp_path / "attn_q.png", query=2), image.shape[1])
    _, deformable = _model(DEFORMABLE)
    _check_png(sampling_points_picture(deformable, image, tmp_path / "points.png", level=1), image.shape[1])
    _check_png(sampling_points_picture(deformable, image, tmp_path / "all.png", level=None), image.shape[1])
    _, act = _model(ACT)
    _check_png(clusters_picture(act, image, tmp_path / "clusters.png"), image.shape[1])

    with pytest.raises(ValueError, match="no PlainAttention in its decoder cross-attention"):
        cross_attention_picture(deformable, image, tmp_path / "x.png")
    with pytest.raises(ValueError, match="no AdaptiveClusteringAttention"):
        clusters_picture(detr, image, tmp_path / "x.png")
    with pytest.raises(ValueError, match="query 6 out of range: the model has 6 queries"):
        cross_attention_picture(detr, image, tmp_path / "x.png", query=6)
    with pytest.raises(ValueError, match="level 2 out of range: the model has 2 feature levels"):
        sampling_points_picture(deformable, image, tmp_path / "x.png", level=2)
    assert not (tmp_path / "x.png").exists()


def test_detections_picture_marks_boxes(tmp_path, scene):
    rgb, _ = scene
    boxes = np.array([[12.0, 10.0, 55.0, 58.0], [70.0, 20.0, 100.0, 40.0]])
    picture = draw_detections(rgb, boxes, [1, 0], ["a", "b", "c"], scores=[0.9, 0.1], title="two boxes")
    assert picture.size == (rgb.shape[1], rgb.shape[0] + 14)  # the image and its title strip
    pixels = _check_png(save_picture(picture, tmp_path / "pred.png"), rgb.shape[0])
    assert tuple(pixels[14 + 40, 55]) == class_color(1)  # the right edge of the first box
    assert tuple(pixels[14 + 30, 100]) == class_color(0)  # the right edge of the second box
    upscaled = draw_detections(rgb, boxes, [1, 0], ["a", "b", "c"], min_side=2 * min(rgb.shape[:2]))
    assert upscaled.size == (2 * rgb.shape[1], 2 * rgb.shape[0])  # no title: no strip
    with pytest.raises(IndexError):
        draw_detections(rgb, boxes, [1, 3], ["a", "b", "c"])


# ------------------------------------------------------------------------------------- curves
def _fake_run(root: Path) -> Path:
    """Two CSVLogger versions; the newer has 2 epochs of 3 steps with losses and val/AP."""
    CSVLogger(save_dir=root, name="csv").log_metrics({"train/loss_step": 9.0}, step=0)
    logger = CSVLogger(save_dir=root, name="csv", version=1)
    for step in range(6):
        logger.log_metrics({"train/loss_step": 5.0 - step * 0.5, "epoch": step // 3}, step=step)
        if step % 3 == 2:
            logger.log_metrics({"val/AP": 0.1 * (step // 3 + 1), "val/AP50": 0.3, "val/loss": 4.0,
                                "epoch": step // 3}, step=step)
    logger.save()
    return root


def test_curves_from_the_newest_csv_log(tmp_path):
    run = _fake_run(tmp_path / "run")
    CSVLogger(save_dir=run, name="csv", version=0).save()
    csv_path = find_metrics_csv(run)
    assert csv_path == run / "csv" / "version_1" / "metrics.csv"
    series = read_metrics(csv_path)
    assert series["val/AP"] == [(0, 2, pytest.approx(0.1)), (1, 5, pytest.approx(0.2))]
    assert [v for _, _, v in series["train/loss_step"]] == [5.0, 4.5, 4.0, 3.5, 3.0, 2.5]
    pixels = _check_png(plot_run_curves(run, tmp_path / "curves.png"), 300)
    assert pixels.shape[1] > pixels.shape[0]

    with pytest.raises(FileNotFoundError, match="no csv/version_"):
        find_metrics_csv(tmp_path / "empty")
    bad = tmp_path / "bad.csv"
    bad.write_text("epoch,step,val/AP\n0,1,oops\n")
    with pytest.raises(ValueError, match=r"bad.csv, line 2: column 'val/AP' value 'oops' is not a number"):
        read_metrics(bad)


# --------------------------------------------------------------------------------------- tool


def test_visualize_tool(tmp_path, scene, capsys):
    rgb, _ = scene
    cfg, model = _model()
    checkpoint = save_checkpoint(tmp_path / "tiny.pt", model, cfg, [1, 2, 3], ["one", "two", "three"])
    Image.fromarray(rgb).save(tmp_path / "scene.png")
    (tmp_path / "val").mkdir()
    Image.fromarray(rgb).save(tmp_path / "val" / "scene.png")
    height, width = rgb.shape[:2]
    (tmp_path / "val.json").write_text(json.dumps({
        "images": [{"id": 7, "file_name": "scene.png", "width": width, "height": height}],
        "annotations": [{"id": 1, "image_id": 7, "category_id": 2, "bbox": [5, 5, 30, 20]}],
        "categories": [{"id": 1, "name": "one"}, {"id": 2, "name": "two"}, {"id": 3, "name": "three"}]}))
    config = tmp_path / "data.yaml"
    config.write_text(f"data: {{root: {tmp_path}, val_images: val, val_annotations: val.json}}\n")
    main = load_tool("visualize").main

    code = main(["attention", "--checkpoint", str(checkpoint), "--image", str(tmp_path / "scene.png"),
                 "--out", str(tmp_path / "a.png")])
    assert code == 0, capsys.readouterr().err
    _check_png(tmp_path / "a.png", 96)
    code = main(["predictions", "--checkpoint", str(checkpoint), "--config", str(config), "--score-threshold",
                 "0", "--out", str(tmp_path / "pred")])
    assert code == 0, capsys.readouterr().err
    _check_png(tmp_path / "pred" / "val_7.png", height)
    capsys.readouterr()
    code = main(["sampling", "--checkpoint", str(checkpoint), "--image", str(tmp_path / "scene.png"),
                 "--out", str(tmp_path / "s.png")])
    assert code == 1
    assert "no MultiScaleDeformableAttention in its decoder cross-attention" in capsys.readouterr().err
    assert main(["curves", "--out", str(tmp_path / "c.png")]) == 1
    assert "'curves' needs --run" in capsys.readouterr().err
