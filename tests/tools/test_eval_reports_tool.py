"""tools/eval.py's evaluation reports: any split or annotation file, the summary line, the report
folder, the COCO backend option, and one-line errors (an untrained tiny checkpoint, generated data)."""

import csv
import json
import shutil

import pytest
import torch

from detr_lab.checkpoints import load_checkpoint, save_checkpoint
from detr_lab.config import load_config
from detr_lab.data.synthetic import ensure_synthetic_dataset
from detr_lab.engine import coco_backends
from detr_lab.models.build import build_model
from detr_lab.zoo import save_pretrained

from factories import load_tool, synthetic_data_yaml, tiny_overrides

TINY = tiny_overrides(num_classes=6, num_heads=2, num_queries=5, dropout=0.0, decoder__num_layers=1)
CLASSES = ["circle", "square", "triangle", "star", "ring", "cross"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval_reports")
    config = root / "synthetic.yaml"
    config.write_text(synthetic_data_yaml(1, 3).format(root=root) + f"trainer: {{output_dir: {root}/run}}\n")
    torch.manual_seed(0)
    cfg = load_config(overrides=TINY)
    checkpoint = save_checkpoint(root / "tiny.pt", build_model(cfg.model), cfg, [1, 2, 3, 5, 8, 13], CLASSES)
    ensure_synthetic_dataset(load_config(config).data)
    # the same val images and annotations, as the test split of a COCO-format set
    coco = root / "coco"
    shutil.copytree(root / "data" / "val2017", coco / "test_images")
    (coco / "annotations").mkdir()
    shutil.copy(root / "data" / "annotations" / "instances_val2017.json", coco / "annotations" / "test.json")
    coco_config = root / "coco.yaml"
    data = synthetic_data_yaml(1, 3).format(root=root).replace("dataset: synthetic", "dataset: coco")
    coco_config.write_text(data.replace(f"root: {root}/data", f"root: {coco}")
                           + "  test_images: test_images\n  test_annotations: annotations/test.json\n"
                           + f"trainer: {{output_dir: {root}/run}}\n")
    return {"root": root, "config": config, "coco_config": coco_config, "checkpoint": checkpoint}


def run_eval(setup, *arguments, config="config"):
    return load_tool("eval").main(["--config", str(setup[config]), "--checkpoint", str(setup["checkpoint"]),
                                   "--device", "cpu", "--no-progress", *arguments])


def test_val_split_summary_table_and_report_folder(setup, capsys, tmp_path):
    report = tmp_path / "report"
    assert run_eval(setup, "--report-dir", str(report), "--confusion-score", "0") == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("val: AP ") and lines[0].endswith("(3 images)")
    assert "Average Precision" not in "\n".join(lines)  # the COCOeval table only with --verbose
    assert lines[1].split() == ["class", "gt", "AP", "AP50", "AR100"]
    assert [line.split()[0] for line in lines[2:8]] == CLASSES
    assert lines[8].startswith(f"report: {report} ")
    with open(report / "per_class.csv") as file:
        rows = list(csv.DictReader(file))
    assert [row["name"] for row in rows] == CLASSES
    gt = json.loads((setup["root"] / "data" / "annotations" / "instances_val2017.json").read_text())
    assert sum(int(row["gt_boxes"]) for row in rows) == len(gt["annotations"])
    with open(report / "confusion_matrix.csv") as file:
        matrix = [[int(v) for v in row[1:]] for row in list(csv.reader(file))[1:]]
    # score 0: each of the 5 detections of each image once, in its predicted column; each ground-truth
    # box once, in its row
    assert sum(sum(row[:6]) for row in matrix) == 3 * 5
    assert sum(sum(row) for row in matrix[:6]) == len(gt["annotations"])
    assert matrix[6][6] == 0
    assert (report / "confusion_matrix.png").is_file()
    drawn = {p.name for p in (report / "pr_curves").iterdir()}
    assert drawn == {f"{row['index']:0>3}-{row['name']}.png" for row in rows if int(row["gt_boxes"])}


def test_test_split_of_a_coco_set(setup, capsys):
    assert run_eval(setup, "--split", "test", "--verbose", "--no-report", config="coco_config") == 0
    printed = capsys.readouterr().out
    assert printed.startswith("test: AP ") and "(3 images)" in printed.splitlines()[0]
    assert "Average Precision  (AP) @[ IoU=0.50:0.95 | area=   all | maxDets=100 ]" in printed  # --verbose
    (results,) = (setup["root"] / "run").glob("coco_results-tiny-*-test.json")
    assert printed.endswith(f"COCO results written to {results}\n")
    gt = json.loads((setup["root"] / "coco" / "annotations" / "test.json").read_text())
    assert {r["image_id"] for r in json.loads(results.read_text())} == {i["id"] for i in gt["images"]}


def test_any_annotation_file(setup, capsys, tmp_path):
    gt = json.loads((setup["root"] / "data" / "annotations" / "instances_val2017.json").read_text())
    first = gt["images"][0]["id"]
    gt["images"] = gt["images"][:1]
    gt["annotations"] = [a for a in gt["annotations"] if a["image_id"] == first]
    (tmp_path / "one.json").write_text(json.dumps(gt))
    backend = "pycocotools" if coco_backends.COCOeval_faster is None else "faster-coco-eval"
    assert run_eval(setup, "--annotations", str(tmp_path / "one.json"), "--images",
                    str(setup["root"] / "data" / "val2017"), "--no-report", "--coco-backend", backend) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("one: AP ") and lines[0].endswith("(1 images)")
    assert len(lines) == 2  # the summary and the results path: no report, no table


def last_line(err: str) -> str:
    return err.strip().splitlines()[-1]


def test_errors_are_one_line_before_the_model_loads(setup, capsys, tmp_path, monkeypatch):
    assert run_eval(setup, "--split", "test") == 1
    assert last_line(capsys.readouterr().err) == (
        "eval.py: error: data.dataset 'synthetic' has no test split; evaluate another annotation file "
        "(tools/eval.py --annotations FILE --images DIR)")
    assert run_eval(setup, "--annotations", str(tmp_path / "missing.json"), "--images", str(tmp_path)) == 1
    missing = f"eval.py: error: annotation file not found: {tmp_path}/missing.json"
    assert last_line(capsys.readouterr().err) == missing
    monkeypatch.setattr(coco_backends, "COCOeval_faster", None)
    assert run_eval(setup, "--coco-backend", "faster-coco-eval") == 1
    assert last_line(capsys.readouterr().err) == (
        "eval.py: error: 'faster-coco-eval' is not installed; the faster-coco-eval backend needs the eval "
        "extra: pip install -e \".[eval]\"")
    both = ["--annotations", "x.json", "--images", "x"]
    for wrong in (both[:2], both[2:], ["--split", "test", *both]):
        with pytest.raises(SystemExit) as exit_info:
            run_eval(setup, *wrong)
        assert exit_info.value.code == 2


def test_a_model_folder_evaluates_as_its_checkpoint(setup, capsys, tmp_path):
    """`--model FOLDER` and `--checkpoint FOLDER` (a save_pretrained folder) give the checkpoint's AP."""
    folder = save_pretrained(tmp_path / "folder", load_checkpoint(setup["checkpoint"]))
    assert run_eval(setup, "--no-report") == 0
    from_file = capsys.readouterr().out.splitlines()[0]
    eval_tool = load_tool("eval")
    common = ["--config", str(setup["config"]), "--device", "cpu", "--no-progress", "--no-report"]
    assert eval_tool.main([*common, "--model", str(folder)]) == 0
    assert capsys.readouterr().out.splitlines()[0] == from_file
    assert eval_tool.main([*common, "--checkpoint", str(folder)]) == 0
    assert capsys.readouterr().out.splitlines()[0] == from_file
    assert eval_tool.main([*common, "--model", str(tmp_path / "no-such-folder")]) == 1
    assert "no model folder, zoo name or Hub repository" in capsys.readouterr().err
    with pytest.raises(SystemExit) as stop:
        eval_tool.main([*common, "--model", str(folder), "--checkpoint", str(setup["checkpoint"])])
    assert stop.value.code == 2


def test_save_pretrained_writes_the_evaluated_model_with_its_report(setup, capsys, tmp_path):
    folder = tmp_path / "my-detector"
    assert run_eval(setup, "--report-dir", str(tmp_path / "report"), "--save-pretrained", str(folder)) == 0
    out = capsys.readouterr().out.splitlines()
    ap = float(out[0].split()[2])
    assert out[-1].startswith(f"model folder written to {folder} ")
    description = json.loads((folder / "config.json").read_text())
    assert description["evaluation"]["AP"] == pytest.approx(ap, abs=6e-4)
    assert description["evaluation"]["split"] == "val" and description["evaluation"]["images"] == 3
    assert description["class_names"] == CLASSES
    assert (folder / "evaluation" / "per_class.csv").is_file() and (folder / "model.safetensors").is_file()
    assert "per_class.csv" in (folder / "README.md").read_text()
    # the folder evaluates to the same AP, and is never written over
    eval_tool = load_tool("eval")
    common = ["--config", str(setup["config"]), "--device", "cpu", "--no-progress", "--no-report"]
    assert eval_tool.main([*common, "--model", str(folder)]) == 0
    assert capsys.readouterr().out.splitlines()[0] == out[0]
    weights = (folder / "model.safetensors").read_bytes()
    assert run_eval(setup, "--save-pretrained", str(folder)) == 1
    assert "exists and is not an empty folder" in capsys.readouterr().err
    assert eval_tool.main([*common, "--model", str(folder), "--save-pretrained", str(folder)]) == 1
    assert "writing it would destroy that input" in capsys.readouterr().err
    assert (folder / "model.safetensors").read_bytes() == weights
    with pytest.raises(SystemExit) as stop:
        eval_tool.main([*common, "--backend", "onnxruntime", "--model", "m.onnx", "--save-pretrained", "x"])
    assert stop.value.code == 2
