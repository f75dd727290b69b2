"""The README's walk-through, as a new user runs it: a YOLO folder -> tools/train.py (with MLflow) ->
tools/eval.py on the test split with a per-class report and a Hub-style model folder -> tools/infer.py
with that folder as the model. Tiny images and two steps of the demo model; offline."""

from __future__ import annotations

import csv
import json

from PIL import Image

from factories import REPO, load_tool

# (stem, width, height, YOLO label lines: class cx cy w h, normalized)
IMAGES = [("a", 64, 48, ["0 0.5 0.5 0.4 0.4"]), ("b", 48, 64, ["1 0.3 0.3 0.3 0.2", "0 0.7 0.7 0.2 0.2"])]


def write_yolo_folder(root):
    for split in ("train", "val", "test"):
        (root / "images" / split).mkdir(parents=True)
        (root / "labels" / split).mkdir(parents=True)
        for stem, width, height, lines in IMAGES:
            Image.new("RGB", (width, height), (90, 140, 60)).save(root / "images" / split / f"{stem}.png")
            (root / "labels" / split / f"{stem}.txt").write_text("\n".join(lines) + "\n")
    (root / "data.yaml").write_text("path: .\ntrain: images/train\nval: images/val\ntest: images/test\n"
                                    "names: [cat, dog]\n")


def test_from_a_yolo_folder_to_a_test_report_an_mlflow_run_and_a_model_folder(tmp_path, capsys):
    data, run, folder = tmp_path / "my_set", tmp_path / "runs" / "my_set", tmp_path / "my-detector"
    write_yolo_folder(data)
    settings = [  # the README's command, then what keeps this test small and quick
        "data.dataset=coco", f"data.root={data}", "model.num_classes=2", f"trainer.output_dir={run}",
        "trainer.loggers=[csv,tensorboard,mlflow]",
        "trainer.max_steps=2", "trainer.max_epochs=1", "trainer.max_time_minutes=0",
        "trainer.accelerator=cpu", "data.num_workers=0", "data.batch_size=2",
        "data.augment.train_scales=[64]", "data.augment.max_size=96", "data.augment.crop_prob=0",
        "data.augment.eval_size=64", "data.augment.eval_max_size=96",
    ]
    arguments = [item for setting in settings for item in ("--set", setting)]
    assert load_tool("train").main(["--config", str(REPO / "configs" / "demo.yaml"), *arguments]) == 0
    best = sorted((run / "checkpoints").glob("best-*.ckpt"))
    assert len(best) == 1
    assert (run / "mlflow.db").is_file()
    capsys.readouterr()

    assert load_tool("eval").main(["--config", str(run / "config.yaml"), "--split", "test", "--checkpoint",
                                   str(best[0]), "--save-pretrained", str(folder), "--no-progress"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("test: AP ") and out[0].endswith("(2 images)")
    assert [line.split()[0] for line in out[2:4]] == ["cat", "dog"]  # the per-class table
    report = next(line for line in out if line.startswith("report: ")).split()[1]
    with open(f"{report}/per_class.csv") as file:
        assert [row["name"] for row in csv.DictReader(file)] == ["cat", "dog"]
    card = json.loads((folder / "config.json").read_text())
    assert card["class_names"] == ["cat", "dog"] and card["evaluation"]["split"] == "test"

    out_dir = tmp_path / "out"
    assert load_tool("infer").main([str(data / "images" / "val"), "--model", str(folder), "--output-dir",
                                    str(out_dir), "--no-images", "--no-progress"]) == 0
    detections = json.loads((out_dir / "detections.json").read_text())
    assert sorted(image["file"].rsplit("/", 1)[-1] for image in detections["images"]) == ["a.png", "b.png"]
