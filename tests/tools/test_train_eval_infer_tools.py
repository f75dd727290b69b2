"""End to end on a tiny synthetic set: train -> checkpoint -> resume -> eval (= pycocotools) -> infer.

One short training run (3 steps, a checkpoint every step) is shared by the tests of this file.
"""

import contextlib
import io
import json
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import Callback
from PIL import Image
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from detr_lab.checkpoints import load_checkpoint
from detr_lab.config import load_config
from detr_lab.engine.evaluate import evaluate_checkpoint
from detr_lab.engine.trainer import train

from factories import TINY_RUN_YAML, load_tool

pytestmark = pytest.mark.slow  # Lightning end to end: train, resume, eval, infer

REPO = Path(__file__).resolve().parents[2]
SYNTHETIC_IDS = [1, 2, 3, 5, 8, 13]



@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    config_path = root / "tiny.yaml"
    config_path.write_text(TINY_RUN_YAML.format(root=root))
    torch.manual_seed(0)
    trainer = train(load_config(config_path), progress_bar=False)
    return {"root": root, "config": config_path, "trainer": trainer,
            "last": root / "run" / "checkpoints" / "last.ckpt"}


def test_training_writes_config_logs_and_checkpoints(trained):
    run = trained["root"] / "run"
    assert trained["trainer"].global_step == 3  # 2 steps per epoch: stopped mid-epoch 1 by max_steps
    assert load_config(run / "config.yaml").model.hidden_dim == 32
    assert list((run / "csv").glob("version_*/metrics.csv")) and list((run / "tensorboard").glob("version_*"))
    best = list((run / "checkpoints").glob("best-epoch000-*.ckpt"))
    assert len(best) == 1  # validation ran once, at the end of epoch 0
    assert not list((run / "checkpoints").glob("*.tmp-*"))
    checkpoint = torch.load(trained["last"], weights_only=True)
    assert (checkpoint["epoch"], checkpoint["global_step"]) == (1, 3)
    meta = checkpoint["detr_lab"]
    assert meta["category_ids"] == SYNTHETIC_IDS and meta["class_names"][0] == "circle"
    assert meta["config"]["model"]["num_queries"] == 5
    logged = trained["trainer"].logged_metrics
    for name in ("val/AP", "val/AP50", "val/AP75", "val/APs", "val/APm", "val/APl", "val/AR100",
                 "val/loss", "val/loss_ce", "val/loss_bbox_0", "train/loss_giou_epoch"):
        assert name in logged, name
    loaded = load_checkpoint(trained["last"])  # the Lightning checkpoint reads back as a model
    assert loaded.category_ids == SYNTHETIC_IDS


class FirstBatch(Callback):
    """Records the trainer state at the first training batch, and the model weights at train start."""

    def __init__(self):
        self.seen = None
        self.start_weights = None

    def on_train_start(self, trainer, pl_module):
        self.start_weights = {k: v.clone() for k, v in pl_module.model.state_dict().items()}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.seen is None:
            scheduler = trainer.lr_scheduler_configs[0].scheduler
            lr = trainer.optimizers[0].param_groups[0]["lr"]
            self.seen = (trainer.current_epoch, trainer.global_step, scheduler.last_epoch, lr)


def test_resume_continues_epoch_step_schedule_and_weights(trained, tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    shutil.copy(trained["last"], run / "checkpoints" / "last.ckpt")
    cfg = load_config(trained["config"], [f"trainer.output_dir={run}", "trainer.max_steps=-1"])
    probe = FirstBatch()
    trainer = train(cfg, resume="auto", callbacks=[probe], progress_bar=False)
    epoch, step, scheduler_epoch, lr = probe.seen
    assert (epoch, step) == (1, 3)
    assert scheduler_epoch == 1 and lr == pytest.approx(1e-5)  # dropped at epoch 1, state restored
    assert trainer.global_step == 4 and trainer.current_epoch == 2
    saved = torch.load(trained["last"], weights_only=True)["state_dict"]
    for name, value in probe.start_weights.items():
        assert torch.equal(value, saved[f"model.{name}"]), name


def coco_summary(gt_file: Path, results_file: Path) -> tuple[list[float], str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO(str(gt_file))
        coco_eval = COCOeval(coco, coco.loadRes(str(results_file)), "bbox")
        coco_eval.evaluate()
        coco_eval.accumulate()
    with contextlib.redirect_stdout(out):
        coco_eval.summarize()
    return [float(v) for v in coco_eval.stats], out.getvalue()


def test_eval_matches_pycocotools_on_written_json(trained, tmp_path, capsys):
    gt_file = trained["root"] / "data" / "annotations" / "instances_val2017.json"
    result = evaluate_checkpoint(trained["config"], trained["last"], output=tmp_path / "lib.json",
                                 device="cpu", progress=False)
    stats, _ = coco_summary(gt_file, result.results_path)
    assert [result.stats[name] for name in result.stats] == stats
    assert result.num_images == 2
    detections = json.loads(result.results_path.read_text())
    assert len(detections) == 2 * 5  # every query of both images, softmax post-processing
    assert {d["category_id"] for d in detections} <= set(SYNTHETIC_IDS)

    output = tmp_path / "cli.json"
    code = load_tool("eval").main(["--config", str(trained["config"]), "--checkpoint", str(trained["last"]),
                                   "--output", str(output), "--device", "cpu", "--no-progress", "--verbose",
                                   "--no-report"])
    assert code == 0
    printed = capsys.readouterr().out
    stats, summary = coco_summary(gt_file, output)
    first, rest = printed.split("\n", 1)
    assert first.startswith(f"val: AP {stats[0]:.3f}  AP50 {stats[1]:.3f}  AP75 {stats[2]:.3f}")
    assert first.endswith("(2 images)")
    assert rest.startswith(summary) and len(summary.splitlines()) == 12  # --verbose: the COCOeval table


def test_eval_model_override_reaches_the_model(trained, tmp_path):
    act = ["model.encoder.attention=act"]
    result = evaluate_checkpoint(trained["config"], trained["last"], overrides=act,
                                 output=tmp_path / "act.json", device="cpu", progress=False)
    assert result.config.model.encoder.attention == "act"
    assert result.config.model.hidden_dim == 32  # the model section is the checkpoint's


def test_infer_writes_json_and_annotated_images(trained, tmp_path):
    images = trained["root"] / "data" / "val2017"
    out = tmp_path / "out"
    code = load_tool("infer").main([str(images), "--checkpoint", str(trained["last"]), "--output-dir",
                                    str(out), "--score-threshold", "0", "--batch-size", "2"])
    assert code == 0
    result = json.loads((out / "detections.json").read_text())
    assert len(result["images"]) == 2
    for entry in result["images"]:
        with Image.open(entry["file"]) as original, Image.open(out / entry["annotated"]) as annotated:
            assert annotated.size == original.size == (entry["width"], entry["height"])
        assert len(entry["detections"]) == 5
        for detection in entry["detections"]:
            x1, y1, x2, y2 = detection["box"]
            assert x1 <= x2 and y1 <= y2
            assert detection["category_id"] in SYNTHETIC_IDS
            assert detection["class_name"] == ["circle", "square", "triangle", "star", "ring", "cross"][
                SYNTHETIC_IDS.index(detection["category_id"])]
            assert 0.0 <= detection["score"] <= 1.0


def single_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert "Traceback" not in err[0]
    return err[0]


def test_infer_bad_inputs_fail_in_one_line(trained, tmp_path, capsys):
    infer = load_tool("infer")
    image = next((trained["root"] / "data" / "val2017").iterdir())
    ckpt = str(trained["last"])

    assert infer.main([str(image), "--checkpoint", str(tmp_path / "missing.ckpt")]) == 1
    assert "checkpoint not found" in single_error_line(capsys)

    bad = tmp_path / "broken.jpg"
    bad.write_text("not an image")
    assert infer.main([str(bad), "--checkpoint", ckpt, "--output-dir", str(tmp_path / "o")]) == 1
    assert "broken.jpg" in single_error_line(capsys)

    assert infer.main([str(tmp_path / "nope.jpg"), "--checkpoint", ckpt]) == 1
    assert "image not found" in single_error_line(capsys)

    other = tmp_path / "other.yaml"
    other.write_text(TINY_RUN_YAML.format(root=trained["root"]).replace("hidden_dim: 32", "hidden_dim: 64"))
    code = infer.main([str(image), "--checkpoint", ckpt, "--config", str(other),
                       "--output-dir", str(tmp_path / "o")])
    assert code == 1
    line = single_error_line(capsys)
    assert "do not fit" in line and "other.yaml" in line

    with pytest.raises(Exception, match="checkpoint not found"):
        infer.main([str(image), "--checkpoint", str(tmp_path / "missing.ckpt"), "--debug"])


def test_train_cli_bad_config_exits_2_in_one_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim:\n  learning_rate: 0.1\n")
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "train.py"), "--config", str(bad)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr
    assert "optim.learning_rate" in lines[0] and "bad.yaml" in lines[0]


class BatchImages(Callback):
    """Records the image ids of every training batch, by global step."""

    def __init__(self):
        self.by_step = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        _, _, targets = batch
        self.by_step[trainer.global_step] = [int(t["image_id"]) for t in targets]


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_mid_epoch_continues_the_interrupted_epoch_order(tmp_path, workers):
    """A run stopped mid-epoch and resumed sees the same batches as one that never stopped."""
    config_path = tmp_path / "tiny.yaml"
    config_path.write_text(TINY_RUN_YAML.format(root=tmp_path))
    common = ["data.synthetic.num_train=10", "trainer.max_epochs=3", "trainer.check_val_every_n_epoch=10",
              f"data.num_workers={workers}"]  # fmt: skip
    whole = BatchImages()
    whole_cfg = [*common, "trainer.max_steps=9", f"trainer.output_dir={tmp_path / 'whole'}"]
    train(load_config(config_path, whole_cfg), callbacks=[whole], progress_bar=False)
    assert sorted(whole.by_step) == list(range(9))  # 5 batches per epoch: epoch 1 is cut at step 7

    first, rest = BatchImages(), BatchImages()
    run = tmp_path / "cut"
    cut = load_config(config_path, [*common, "trainer.max_steps=7", f"trainer.output_dir={run}"])
    train(cut, callbacks=[first], progress_bar=False)
    resumed = load_config(config_path, [*common, "trainer.max_steps=9", f"trainer.output_dir={run}"])
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*dataloader is not resumable.*")
        train(resumed, resume="auto", callbacks=[rest], progress_bar=False)
    assert sorted(rest.by_step) == [7, 8]
    assert {**first.by_step, **rest.by_step} == whole.by_step


def write_truncated_jpeg(path: Path) -> Path:
    """A JPEG whose header is intact (PIL's verify() accepts it) but whose pixel data is cut short."""
    noise = Image.fromarray(torch.randint(0, 255, (64, 80, 3), dtype=torch.uint8).numpy())
    buffer = io.BytesIO()
    noise.save(buffer, format="JPEG", quality=95)
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    return path


def test_infer_one_bad_item_does_not_discard_the_others(trained, tmp_path, capsys):
    folder = tmp_path / "inputs"
    folder.mkdir()
    good = sorted((trained["root"] / "data" / "val2017").iterdir())[:2]
    for path in good:
        shutil.copy(path, folder / path.name)
    Image.new("RGB", (20000, 20), (120, 60, 30)).save(folder / "wide.jpg")  # a resize side used to round to 0
    Image.new("RGB", (2, 700), (20, 60, 130)).save(folder / "tall.png")
    write_truncated_jpeg(folder / "truncated.jpg")
    (folder / "dangling.jpg").symlink_to(tmp_path / "gone.jpg")
    (folder / "loop.jpg").symlink_to(folder / "loop.jpg")
    (folder / "notes.txt").write_text("not an image, ignored")
    out = tmp_path / "out"

    arguments = [str(folder), "--checkpoint", str(trained["last"]), f"--output-dir={out}", "--batch-size=4"]
    code = load_tool("infer").main(arguments)
    assert code == 1
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and "3 of 7 images failed" in err[0] and "Traceback" not in captured.err
    result = json.loads((out / "detections.json").read_text())
    assert result["complete"] is True
    assert sorted(Path(entry["file"]).name for entry in result["images"]) == sorted(
        [p.name for p in good] + ["wide.jpg", "tall.png"])
    for entry in result["images"]:
        assert (out / entry["annotated"]).is_file()
    reasons = {Path(item["file"]).name: item["error"] for item in result["failed"]}
    assert set(reasons) == {"truncated.jpg", "dangling.jpg", "loop.jpg"}
    assert "truncated.jpg" in reasons["truncated.jpg"] and "cannot decode" in reasons["truncated.jpg"]
    assert "dangling.jpg: dangling symbolic link" in reasons["dangling.jpg"]
    assert "loop.jpg: symbolic link loop" in reasons["loop.jpg"]
    failed_lines = [line for line in captured.out.splitlines() if line.startswith("failed: ")]
    assert len(failed_lines) == 3 and all(any(name in line for line in failed_lines) for name in reasons)


def test_eval_results_do_not_depend_on_batch_size(trained, tmp_path):
    # Six validation images of different sizes: padded batches changed every padded image's outputs.
    overrides = [f"data.root={tmp_path / 'data6'}", "data.synthetic.num_val=6"]
    results = {}
    for batch_size in (1, 2, 4):
        result = evaluate_checkpoint(trained["config"], trained["last"], overrides=overrides, progress=False,
                                     batch_size=batch_size, output=tmp_path / f"results_{batch_size}.json")
        detections = json.loads(result.results_path.read_text())
        rows = sorted((d["image_id"], d["score"], *d["bbox"]) for d in detections)
        results[batch_size] = (result.stats["AP"], rows)
    ap_1, detections_1 = results[1]
    for batch_size in (2, 4):
        ap, detections = results[batch_size]
        assert ap == ap_1
        assert len(detections) == len(detections_1) == 6 * 5
        torch.testing.assert_close(torch.tensor(detections), torch.tensor(detections_1), atol=1e-4, rtol=1e-4)


def test_train_rejects_bad_devices_before_writing_anything(tmp_path, capsys):
    config_path = tmp_path / "tiny.yaml"
    config_path.write_text(TINY_RUN_YAML.format(root=tmp_path))
    code = load_tool("train").main(["--config", str(config_path), "--set", "trainer.devices=two"])
    assert code == 2
    assert "'trainer.devices' is 'two'" in single_error_line(capsys)
    assert not (tmp_path / "run").exists()


def test_eval_default_results_path_is_per_checkpoint_and_model_mismatch_warns(trained, tmp_path):
    other = tmp_path / "copy.ckpt"
    shutil.copy(trained["last"], other)
    first = evaluate_checkpoint(trained["config"], trained["last"], progress=False).results_path
    second = evaluate_checkpoint(trained["config"], other, progress=False).results_path
    assert first != second and first.is_file() and second.is_file()
    assert first.parent == second.parent == trained["root"] / "run"

    yaml = tmp_path / "other.yaml"
    yaml.write_text(TINY_RUN_YAML.format(root=trained["root"]).replace("num_queries: 5", "num_queries: 7"))
    with pytest.warns(UserWarning, match=r"model.num_queries: 7 in the YAML, 5 in the checkpoint"):
        evaluate_checkpoint(yaml, trained["last"], progress=False, output=tmp_path / "r.json")
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        evaluate_checkpoint(trained["config"], trained["last"], progress=False, output=tmp_path / "r.json")


@pytest.mark.parametrize("drops, expected_lr", [("[5]", 5e-4), ("[1]", 5e-5)], ids=["no_drop_yet", "dropped"])
def test_resume_applies_a_changed_lr_and_lr_drop(trained, tmp_path, drops, expected_lr):
    # The checkpoint ran at lr 1e-4 and had dropped to 1e-5 at epoch 1; the restored optimizer state
    # used to win over the new values while config.yaml claimed them.
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    shutil.copy(trained["last"], run / "checkpoints" / "last.ckpt")
    cfg = load_config(trained["config"], [f"trainer.output_dir={run}", "trainer.max_steps=4", "optim.lr=5e-4",
                                          f"optim.lr_drop_epochs={drops}"])
    probe = FirstBatch()
    train(cfg, resume="auto", callbacks=[probe], progress_bar=False)
    epoch, step, _, lr = probe.seen
    assert (epoch, step) == (1, 3)
    assert lr == pytest.approx(expected_lr)
    saved = load_config(run / "config.yaml").optim
    assert saved.lr == pytest.approx(5e-4) and saved.lr_drop_epochs == [int(drops[1])]


def test_resume_with_other_classes_names_both(trained, tmp_path, capsys):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    checkpoint = torch.load(trained["last"], weights_only=True)
    checkpoint["detr_lab"]["category_ids"] = [1, 2]
    torch.save(checkpoint, run / "checkpoints" / "last.ckpt")
    code = load_tool("train").main(["--config", str(trained["config"]), "--resume", "auto",
                                    "--set", f"trainer.output_dir={run}"])
    assert code == 1
    line = single_error_line(capsys)
    assert f"checkpoint has 2 classes ([1, 2]), this run 6 ({SYNTHETIC_IDS})" in line
    assert "use --init-from to fine-tune" in line


def test_infer_detections_do_not_depend_on_batch_size(trained, tmp_path):
    folder = tmp_path / "inputs"
    folder.mkdir()
    for index, path in enumerate(sorted((trained["root"] / "data" / "train2017").iterdir())):
        shutil.copy(path, folder / path.name)
        with Image.open(path) as image:  # a second size of the same picture, so batches would pad
            image.resize((image.width // 2 + index, image.height // 2)).save(folder / f"half_{path.name}")
    detections = {}
    for batch_size in (1, 4):
        out = tmp_path / f"out{batch_size}"
        arguments = [str(folder), "--checkpoint", str(trained["last"]), f"--output-dir={out}",
                     f"--batch-size={batch_size}", "--score-threshold=0"]
        assert load_tool("infer").main(arguments) == 0
        images = json.loads((out / "detections.json").read_text())["images"]
        detections[batch_size] = {Path(e["file"]).name: [(d["score"], *d["box"]) for d in e["detections"]]
                                  for e in images}
    assert len(detections[1]) == 8 and detections[1].keys() == detections[4].keys()
    for name, rows in detections[1].items():  # json rounding: scores to 1e-4, boxes to 0.01 pixel
        one, four = torch.tensor(rows), torch.tensor(detections[4][name])
        torch.testing.assert_close(four[:, 0], one[:, 0], atol=2e-4, rtol=0)
        torch.testing.assert_close(four[:, 1:], one[:, 1:], atol=0.011, rtol=0)
