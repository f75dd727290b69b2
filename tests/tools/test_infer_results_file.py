"""`run_inference` keeps its results when killed, never passes an earlier run's json off as its own, and
never writes over an input image.

A stand-in predictor (one box per image, no model) replaces `Predictor.from_checkpoint`, so these run
in well under a second; what "killed" leaves is the json on disk at the moment of the kill, read from
inside the prediction of a later image.
"""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from detr_lab.config import load_config
from detr_lab.errors import InputError
from detr_lab.predict import infer
from detr_lab.predict.detections_file import DETECTIONS_FILE, DetectionsWriter

from factories import load_tool


class StandIn:
    """One box per image; records the json on disk when image number `look_at` is predicted."""

    def __init__(self, json_path: Path, look_at: int):
        self.config = load_config()
        self.class_names = ["thing"]
        self.json_path, self.look_at, self.seen, self.on_disk = json_path, look_at, 0, None

    def predict(self, images, score_threshold=0.5):
        results = []
        for _ in images:
            self.seen += 1
            if self.seen == self.look_at:
                self.on_disk = json.loads(self.json_path.read_text())
            results.append({"boxes": torch.tensor([[1.0, 1.0, 5.0, 5.0]]), "labels": torch.tensor([0]),
                            "scores": torch.tensor([0.9]), "category_ids": torch.tensor([1]),
                            "class_names": ["thing"]})
        return results


def write_images(folder: Path, count: int, suffix: str = ".png") -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index in range(count):
        path = folder / f"im{index:02d}{suffix}"
        Image.fromarray(np.full((12, 16, 3), index * 7, dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


def run(monkeypatch, inputs, out: Path, look_at: int) -> StandIn:
    stand_in = StandIn(out / DETECTIONS_FILE, look_at)
    monkeypatch.setattr(infer.Predictor, "from_checkpoint", lambda *args, **kwargs: stand_in)
    infer.run_inference(inputs, "model.ckpt", output_dir=out, batch_size=1)
    return stand_in


def test_results_are_on_disk_from_the_start_and_every_16_images(tmp_path, monkeypatch):
    images = write_images(tmp_path / "in", 20)
    out = tmp_path / "out"
    out.mkdir()
    (out / DETECTIONS_FILE).write_text(json.dumps({"complete": True, "images": [{"file": "old.jpg"}]}))
    first = run(monkeypatch, [tmp_path / "in"], out, look_at=1)
    # Killed at the first image: the earlier run's json is gone, this run's says it is not complete.
    assert first.on_disk["complete"] is False and first.on_disk["images"] == []
    assert first.on_disk["images_to_process"] == 20
    late = run(monkeypatch, [tmp_path / "in"], out, look_at=20)  # within seconds: flushed by count
    assert late.on_disk["complete"] is False
    assert [Path(e["file"]).name for e in late.on_disk["images"]] == [p.name for p in images[:16]]
    final = json.loads((out / DETECTIONS_FILE).read_text())
    assert final["complete"] is True and len(final["images"]) == 20


def test_writer_flushes_by_time_too(tmp_path):
    writer = DetectionsWriter(tmp_path / "d.json", {}, interval_s=0.0, every_images=1000)
    writer.start()
    writer.images.append({"file": "a"})
    writer.flush()
    assert json.loads((tmp_path / "d.json").read_text())["images"] == [{"file": "a"}]
    slow = DetectionsWriter(tmp_path / "e.json", {}, interval_s=3600.0, every_images=1000)
    slow.start()
    slow.images.append({"file": "a"})
    slow.flush()
    assert json.loads((tmp_path / "e.json").read_text())["images"] == []


@pytest.mark.parametrize("layout", ["same_folder", "file_given"])
def test_no_annotated_copy_replaces_an_input(tmp_path, monkeypatch, layout):
    folder = tmp_path / "photos"
    images = write_images(folder, 2, suffix=".jpg")
    before = [p.read_bytes() for p in images]
    inputs = [folder] if layout == "same_folder" else [images[1]]
    target = images[0] if layout == "same_folder" else images[1]
    with pytest.raises(InputError, match=rf"--output-dir {folder}: the annotated copy of {target} would "
                       rf"replace the input image {target}; choose an output folder that holds no input"):
        run(monkeypatch, inputs, folder, look_at=0)
    assert [p.read_bytes() for p in images] == before
    assert not (folder / DETECTIONS_FILE).exists()
    # PNG inputs get .jpg copies: the same folder is then fine, and the inputs stay as they were.
    pngs = write_images(tmp_path / "pngs", 2)
    png_bytes = [p.read_bytes() for p in pngs]
    run(monkeypatch, [tmp_path / "pngs"], tmp_path / "pngs", look_at=0)
    assert [p.read_bytes() for p in pngs] == png_bytes
    assert sorted(p.name for p in (tmp_path / "pngs").iterdir()) == [
        DETECTIONS_FILE, "im00.jpg", "im00.png", "im01.jpg", "im01.png"]


def test_no_tool_writes_over_its_inputs(tmp_path, capsys):
    checkpoint, config = tmp_path / "model.ckpt", tmp_path / "data.yaml"
    checkpoint.write_bytes(b"weights")
    config.write_text("data: {}\n")
    link = tmp_path / "link.ckpt"
    link.symlink_to(checkpoint)
    cases = {
        "eval": ["--config", str(config), "--checkpoint", str(checkpoint), "--output", str(link)],
        "export": ["--checkpoint", str(checkpoint), "--output", str(checkpoint)],
        "convert_checkpoint": [str(checkpoint), str(checkpoint)],
    }
    for tool, argv in cases.items():
        assert load_tool(tool).main(argv) == 1, tool
        err = capsys.readouterr().err.strip().splitlines()
        name = "src" if tool == "convert_checkpoint" else "--checkpoint"
        expected = f"is the {name} input ({checkpoint}); writing it would destroy that input: choose another"
        assert len(err) == 1 and expected in err[0], (tool, err)
    assert checkpoint.read_bytes() == b"weights" and config.read_text() == "data: {}\n"
