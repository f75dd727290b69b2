"""The Python prediction API: Predictor.from_checkpoint / from_onnx, predict on paths, PIL images, arrays."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from detr_lab.data.errors import MissingImageError
from detr_lab.predict import Predictor


@pytest.fixture(scope="module")
def image_files(tmp_path_factory):
    directory = tmp_path_factory.mktemp("predict_images")
    rng = np.random.default_rng(0)
    paths = []
    for index, (height, width) in enumerate([(60, 80), (90, 70)]):
        path = directory / f"image{index}.png"
        Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


def test_predict_takes_paths_pil_images_and_arrays(checkpoints, image_files):
    predictor = Predictor.from_checkpoint(checkpoints["deformable"])
    assert predictor.backend == "pytorch"
    path = image_files[1]
    as_pil = Image.open(path)
    as_array = np.asarray(Image.open(path).convert("RGB"))
    results = predictor.predict([path, as_pil, as_array], score_threshold=0.0)
    assert len(results) == 3
    for result in results[1:]:
        for key in ("boxes", "scores", "labels", "category_ids"):
            torch.testing.assert_close(result[key], results[0][key])
        assert result["class_names"] == results[0]["class_names"]
    single = predictor.predict(str(path), score_threshold=0.0)  # one image, not in a list
    torch.testing.assert_close(single[0]["scores"], results[0]["scores"])


def test_predict_output_contract(checkpoints, image_files):
    from export_helpers import CATEGORY_IDS, CLASS_NAMES

    predictor = Predictor.from_checkpoint(checkpoints["detr"])
    results = predictor.predict(image_files, score_threshold=0.0)  # every query
    for result, path in zip(results, image_files, strict=True):
        width, height = Image.open(path).size
        count = len(result["scores"])
        assert count == 7  # softmax classification: one detection per query
        assert result["boxes"].shape == (count, 4) and len(result["class_names"]) == count
        assert bool((result["scores"][:-1] >= result["scores"][1:]).all())  # best first
        boxes = result["boxes"]
        assert bool((boxes[:, 0] <= boxes[:, 2]).all() and (boxes[:, 1] <= boxes[:, 3]).all())
        assert float(boxes[:, [0, 2]].min()) >= 0 and float(boxes[:, [0, 2]].max()) <= width + 1e-3
        assert float(boxes[:, [1, 3]].min()) >= 0 and float(boxes[:, [1, 3]].max()) <= height + 1e-3
        for label, category_id, name in zip(result["labels"].tolist(), result["category_ids"].tolist(),
                                            result["class_names"], strict=True):
            assert (category_id, name) == (CATEGORY_IDS[label], CLASS_NAMES[label])
    alone = predictor.predict(image_files[:1], score_threshold=0.0)[0]  # not padded to the other image's size
    threshold = float(alone["scores"].median())
    kept = predictor.predict(image_files[:1], score_threshold=threshold)[0]
    assert 0 < len(kept["scores"]) < 7 and bool((kept["scores"] >= threshold).all())



@pytest.mark.parametrize("variant", ["detr", "deformable", "dino"])
def test_detections_do_not_depend_on_the_other_images_of_the_call(checkpoints, variant):
    # A wide image, a tall one (its resized width is smaller, its height larger: a padded batch of
    # the two pads both) and a second wide image of the same size as the first.
    rng = np.random.default_rng(1)
    wide, tall, wide_too = (rng.integers(0, 255, shape, dtype=np.uint8)
                            for shape in [(60, 80, 3), (110, 50, 3), (60, 80, 3)])
    predictor = Predictor.from_checkpoint(checkpoints[variant])
    alone = predictor.predict(wide)[0]
    tall_alone = predictor.predict(tall)[0]
    for call, where in (([wide, tall], 0), ([tall, wide], 1), ([tall, wide_too, wide], 2)):
        mixed = predictor.predict(call)
        for key in ("boxes", "scores", "labels"):
            torch.testing.assert_close(mixed[where][key], alone[key], msg=f"{key}, call {len(call)} images")
        tall_where = next(i for i, image in enumerate(call) if image is tall)
        torch.testing.assert_close(mixed[tall_where]["boxes"], tall_alone["boxes"])
        torch.testing.assert_close(mixed[tall_where]["scores"], tall_alone["scores"])


def test_predict_rejects_bad_inputs(checkpoints, tmp_path):
    predictor = Predictor.from_checkpoint(checkpoints["detr"])
    with pytest.raises(ValueError, match=r"uint8 \[H, W, 3\].*float32 \(4, 4, 3\)"):
        predictor.predict([np.zeros((4, 4, 3), np.float32)])
    with pytest.raises(ValueError, match="paths, PIL images or numpy arrays, got int"):
        predictor.predict([3])
    with pytest.raises(MissingImageError, match="image file not found"):
        predictor.predict([tmp_path / "missing.jpg"])


def test_onnx_backend_through_the_same_api(checkpoints, image_files, tmp_path):
    pytest.importorskip("onnxruntime", reason="the export extra is not installed")
    from detr_lab.export.from_checkpoint import export_checkpoint

    path = export_checkpoint(checkpoints["single_scale"], tmp_path / "m.onnx", height=64, width=64,
                             dynamic=True).path
    onnx_predictor = Predictor.from_onnx(path)
    torch_predictor = Predictor.from_checkpoint(checkpoints["single_scale"])
    assert onnx_predictor.backend == "onnxruntime"
    assert (onnx_predictor.category_ids, onnx_predictor.class_names) == (
        torch_predictor.category_ids, torch_predictor.class_names)
    for got, expected in zip(onnx_predictor.predict(image_files, score_threshold=0.0),
                             torch_predictor.predict(image_files, score_threshold=0.0),
                             strict=True):
        torch.testing.assert_close(got["scores"], expected["scores"], rtol=0, atol=1e-4)
        torch.testing.assert_close(got["boxes"], expected["boxes"], rtol=0, atol=1e-2)
        assert torch.equal(got["category_ids"], expected["category_ids"])
    with pytest.raises(Exception, match="cannot change an exported ONNX model"):
        Predictor.from_onnx(path, overrides=["model.num_queries=3"])


@pytest.mark.slow  # a fresh interpreter
def test_prediction_needs_no_lightning(checkpoints, image_files):
    """A notebook predicting with a checkpoint never imports Lightning."""
    import subprocess
    import sys

    code = (
        "import sys; from detr_lab.predict import Predictor; "
        f"Predictor.from_checkpoint({str(checkpoints['detr'])!r}).predict([{str(image_files[0])!r}]); "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('lightning', 'pytorch_lightning')))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
