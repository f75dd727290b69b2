from __future__ import annotations

from pathlib import Path

import pytest
import torch

from detr_lab.models.postprocess import PostProcess

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"


def test_softmax_best_real_class_and_pixel_boxes():
    logits = torch.tensor([[[1.0, 3.0, 0.0, 5.0], [2.0, 0.0, 1.0, -1.0]]])  # query 0: "no object" highest
    boxes = torch.tensor([[[0.5, 0.5, 0.2, 0.4], [0.25, 0.75, 0.5, 0.5]]])
    (result,) = PostProcess()({"pred_logits": logits, "pred_boxes": boxes}, torch.tensor([[100, 200]]))
    assert result["labels"].tolist() == [1, 0]
    prob = logits.softmax(-1)[0]
    torch.testing.assert_close(result["scores"], torch.stack([prob[0, 1], prob[1, 0]]))
    expected = torch.tensor([[80.0, 30.0, 120.0, 70.0], [0.0, 50.0, 100.0, 100.0]])  # xyxy, w 200, h 100
    torch.testing.assert_close(result["boxes"], expected)


def test_sigmoid_top_k_over_queries_and_classes():
    logits = torch.tensor([[[0.0, 4.0], [3.0, -2.0], [1.0, 2.0]]])
    boxes = torch.tensor([[[0.5, 0.5, 0.2, 0.2], [0.2, 0.2, 0.2, 0.2], [0.8, 0.8, 0.2, 0.2]]])
    (result,) = PostProcess("sigmoid", num_top=3)(
        {"pred_logits": logits, "pred_boxes": boxes}, torch.tensor([[10, 10]])
    )
    assert result["labels"].tolist() == [
        1,
        0,
        1,
    ]  # (query 0, class 1), (query 1, class 0), (query 2, class 1)
    torch.testing.assert_close(result["scores"], torch.tensor([4.0, 3.0, 2.0]).sigmoid())
    torch.testing.assert_close(result["boxes"][1], torch.tensor([1.0, 1.0, 3.0, 3.0]))


def test_sigmoid_matches_official_deformable_postprocessing():
    fixture = torch.load(FIXTURES / "deformable_detr_r50.pt", weights_only=True)
    results = PostProcess("sigmoid")(fixture["outputs"], fixture["orig_sizes"])
    for ours, theirs in zip(results, fixture["postprocessed"], strict=True):
        assert ours["labels"].tolist() == theirs["labels"].tolist()
        torch.testing.assert_close(ours["scores"], theirs["scores"])
        torch.testing.assert_close(ours["boxes"], theirs["boxes"], atol=1e-3, rtol=0)


def test_orig_sizes_must_match_the_batch():
    outputs = {"pred_logits": torch.zeros(2, 3, 4), "pred_boxes": torch.rand(2, 3, 4)}
    with pytest.raises(ValueError, match=r"orig_sizes must be \[B, 2\].*B = 2"):
        PostProcess()(outputs, torch.tensor([[10, 10]]))
    with pytest.raises(ValueError, match="classification"):
        PostProcess("softmx")
