"""tools/bench_official_onnx.py and `detr_lab.benchmark.onnx_compare`: anchors, post-processing, the
commands it runs, and one run on two small ONNX graphs standing in for the two exports (no timings)."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch

from detr_lab.benchmark.onnx_compare import (
    compare_detections,
    format_comparison,
    official_postprocess,
    ratios,
    rtdetr_anchors,
    time_sessions,
)

from factories import FIXTURES, anchors_within_float32_ulps, load_tool


@pytest.fixture(scope="module")
def tool():
    return load_tool("bench_official_onnx")


def test_anchors_are_the_official_buffers_of_the_fixture():
    fixture = torch.load(FIXTURES / "rtdetrv2_r18vd.pt", weights_only=True)
    assert fixture["eval_spatial_size"] == [320, 320]
    anchors, valid = rtdetr_anchors(320, 320)
    official = fixture["state_dict_overrides"]["decoder.anchors"]
    assert anchors_within_float32_ulps(anchors, official, ulps=2)
    assert torch.equal(valid, fixture["state_dict_overrides"]["decoder.valid_mask"])
    anchors, valid = rtdetr_anchors(640, 480)
    assert anchors.shape == (1, 80 * 60 + 40 * 30 + 20 * 15, 4) and valid.shape[:2] == anchors.shape[:2]
    assert torch.isinf(anchors[~valid[..., 0]]).all() and torch.isfinite(anchors[valid[..., 0]]).all()


def test_official_postprocess_ranks_every_query_class_pair():
    logits = np.array([[0.0, 3.0], [2.0, -1.0], [1.0, 4.0]], np.float32)  # 3 queries, 2 classes
    boxes = np.array([[0.5, 0.5, 0.2, 0.4], [0.25, 0.5, 0.5, 0.5], [0.5, 0.25, 1.0, 0.5]], np.float32)
    labels, corners, scores = official_postprocess(logits, boxes, width=200, height=100, top=3)
    np.testing.assert_array_equal(labels, [1, 1, 0])  # (query 2, class 1), (0, 1), (1, 0)
    np.testing.assert_allclose(scores, 1 / (1 + np.exp(-np.array([4.0, 3.0, 2.0]))))
    np.testing.assert_allclose(corners, [[0, 0, 200, 50], [80, 30, 120, 70], [0, 25, 100, 75]], atol=1e-4)


def test_compare_detections():
    ours = (np.array([1, 2]), np.array([[0, 0, 1, 1], [1, 1, 2, 2]], float), np.array([0.9, 0.8]))
    same = compare_detections(ours, ours)
    assert same == {"max_score_difference": 0.0, "same_label_share": 1.0, "max_box_difference_px": 0.0}
    swapped = (np.array([1, 3]), ours[1] + 0.5, ours[2] - 1e-3)
    result = compare_detections(ours, swapped)
    assert result["same_label_share"] == 0.5 and result["max_box_difference_px"] == 0.5
    assert result["max_score_difference"] == pytest.approx(1e-3)
    with pytest.raises(ValueError, match="different shapes"):
        compare_detections(ours, (ours[0][:1], ours[1][:1], ours[2][:1]))


def test_ratios_and_markdown_table():
    times = {
        "detr_lab": {"wall_s": {"median": 0.9, "values": [0.9, 1.0, 0.8]}, "cpu_s": {"median": 0.45}},
        "official": {"wall_s": {"median": 1.0, "values": [1.0, 1.0, 1.0]}, "cpu_s": {"median": 0.5}},
    }
    r = ratios(times, "detr_lab", "official")
    assert r == {"wall": 0.9, "cpu": 0.9, "paired_wall": 0.9}
    table = format_comparison([{"threads": 2, "times": times, "ratios": {"detr_lab": r}}],
                              ["detr_lab", "official"], baseline="official")
    lines = table.splitlines()
    assert lines[0].startswith("| threads | detr_lab ms (CPU ms) | official ms (CPU ms)")
    assert lines[2] == "| 2 | 900 (450) | 1000 (500) | **0.900** (0.900) |"


def test_commands_run_the_official_script_in_its_folder(tool, tmp_path):
    args = tool.parse_args(["--official-dir", str(tmp_path), "--official-python", "py"])
    planned = tool.commands(args, tmp_path / "work")
    official = planned["official_export"]
    assert official["cwd"] == str(tmp_path)
    argv = official["argv"]
    assert argv[:2] == ["py", "-c"] and "dynamo=False" in argv[2] and argv[3] == "tools/export_onnx.py"
    assert argv[argv.index("-s") + 1] == "640" and "--check" in argv
    assert argv[argv.index("-u") + 1:] == ["PResNet.pretrained=False"]  # 640: the config's own size
    assert argv[argv.index("-c", 3) + 1] == "configs/rtdetrv2/rtdetrv2_r18vd_120e_coco.yml"
    export = planned["detr_lab_export"]["argv"]
    assert export[1] == "tools/export.py" and export[export.index("--height") + 1] == "640"
    assert "--deformable-core" not in export and "--dynamic" not in export  # export.py's defaults

    args = tool.parse_args(["--official-dir", str(tmp_path), "--official-python", "py", "--size", "320",
                            "--official-exporter", "as-is"])
    argv = tool.commands(args, tmp_path)["official_export"]["argv"]
    assert argv[:2] == ["py", "tools/export_onnx.py"]
    assert argv[argv.index("-u") + 1:] == ["PResNet.pretrained=False", "eval_spatial_size=[320, 320]"]


def test_the_dfine_family_runs_d_fine_s_own_export_script(tool, tmp_path):
    args = tool.parse_args(["--official-dir", str(tmp_path), "--official-python", "py", "--family", "dfine"])
    argv = tool.commands(args, tmp_path / "work")["official_export"]["argv"]
    assert argv[3] == "tools/deployment/export_onnx.py" and "--check" in argv
    assert argv[argv.index("-c", 3) + 1] == "configs/dfine/dfine_hgnetv2_n_coco.yml"
    assert "-u" not in argv and "-s" not in argv  # the script takes neither; it traces at 640
    state = tool.official_state(args)
    assert state["decoder.anchors"].shape == (1, 40 * 40 + 20 * 20, 4)  # strides 16 and 32 at 640
    with pytest.raises(SystemExit):
        tool.parse_args(["--official-dir", str(tmp_path), "--family", "dfine", "--size", "320"])


def test_bad_arguments_and_missing_official_code(tool, tmp_path, capsys):
    with pytest.raises(SystemExit):
        tool.parse_args(["--official-dir", str(tmp_path), "--size", "100"])
    assert tool.main(["--official-dir", str(tmp_path), "--work-dir", str(tmp_path / "w")]) == 1
    assert "export_onnx.py not found" in capsys.readouterr().err
    (tmp_path / "tools").mkdir()
    (tmp_path / "tools" / "export_onnx.py").write_text("")
    work = str(tmp_path / "w")
    assert tool.main(["--official-dir", str(tmp_path), "--work-dir", work, "--skip-export"]) == 1
    assert "no earlier export" in capsys.readouterr().err


class OfficialStandIn(torch.nn.Module):
    """A detr_lab model behind the official export's interface: (images, orig_target_sizes [N, 2] as
    (w, h)) -> (labels, boxes, scores) of the top `top` sigmoid scores, as the official post-processor."""

    def __init__(self, model, top):
        super().__init__()
        self.model, self.top = model, top

    def forward(self, images, orig_target_sizes):
        mask = torch.zeros(images.shape[0], images.shape[2], images.shape[3], dtype=torch.bool)
        outputs = self.model(images, mask)
        logits, boxes = outputs["pred_logits"], outputs["pred_boxes"]
        scores, index = logits.sigmoid().flatten(1).topk(self.top, dim=1)
        labels = index % logits.shape[-1]
        cx, cy, w, h = boxes.unbind(-1)
        corners = torch.stack((cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2), dim=-1)
        corners = corners * orig_target_sizes.repeat(1, 2)[:, None].float()
        chosen = corners.gather(1, (index // logits.shape[-1])[..., None].expand(-1, -1, 4))
        return labels, chosen, scores


@pytest.mark.slow  # two exports and a few onnxruntime runs
def test_one_run_on_two_stand_in_graphs(tool, tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    sys.path.insert(0, str(FIXTURES.parent / "export"))
    from test_rewrites import RTDETR, randomize_norms

    from detr_lab.config import load_config
    from detr_lab.export.metadata import ExportMetadata
    from detr_lab.export.onnx_export import export_onnx, prepare_for_export
    from detr_lab.models.build import build_model

    cfg = load_config(overrides=RTDETR)
    torch.manual_seed(0)
    model = build_model(cfg.model)
    randomize_norms(model)
    model.eval()
    work = tmp_path / "work"
    export_onnx(model, work / "detr_lab.onnx", metadata=ExportMetadata(list(range(5)), list("abcde"), cfg),
                height=64, width=64, batch=1)
    images = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        # traced on the export path, as export_onnx traces a model
        stand_in = OfficialStandIn(prepare_for_export(model).model, top=20).eval()
        torch.onnx.export(stand_in, (images, torch.tensor([[64, 64]])),
                          str(work / "official.onnx"), input_names=["images", "orig_target_sizes"],
                          output_names=["labels", "boxes", "scores"], opset_version=16, dynamo=False)
    official = tmp_path / "official"
    (official / "tools").mkdir(parents=True)
    (official / "tools" / "export_onnx.py").write_text("")
    code = tool.main(["--official-dir", str(official), "--work-dir", str(work), "--skip-export",
                      "--size", "64", "--threads", "1", "2", "--runs", "2", "--warmup", "0", "--profile"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    out = captured.out
    assert "| 1 |" in out and "| 2 |" in out and "detr_lab graph:" in out and "commands:" in out
    report = json.loads((work / "report.json").read_text())
    assert report["agreement"]["max_score_difference"] <= 1e-5
    assert report["agreement"]["same_label_share"] == 1.0
    assert [row["threads"] for row in report["results"]] == [1, 2]
    for row in report["results"]:
        for name in ("detr_lab", "official"):
            assert len(row["times"][name]["wall_s"]["values"]) == 2
        assert row["ratios"]["detr_lab"]["wall"] > 0
    assert report["machine"]["onnxruntime"] and report["op_types"]["official"]["TopK"] >= 1
    assert report["profile_ms_by_op_type"]["detr_lab"]


class _CountingSession:
    """A stand-in onnxruntime session that records the order of its calls in a shared log."""

    def __init__(self, name: str, log: list[str]) -> None:
        self.name, self.log = name, log

    def run(self, outputs, feed):
        self.log.append(self.name)


def test_block_timing_runs_each_session_in_turns_of_one_untimed_and_block_timed_calls():
    log: list[str] = []
    sessions = {"a": _CountingSession("a", log), "b": _CountingSession("b", log)}
    result = time_sessions(sessions, {"a": {}, "b": {}}, runs=5, warmup=1, block=3)
    assert [len(result[name]["wall_s"]["values"]) for name in "ab"] == [5, 5]
    # warm-up a b; turn 1: a (1 untimed + 3), b (1 + 3); turn 2 reversed: b (1 + 2), a (1 + 2)
    assert "".join(log) == "ab" + "aaaa" + "bbbb" + "bbb" + "aaa"
    with pytest.raises(ValueError, match="block"):
        time_sessions(sessions, {"a": {}, "b": {}}, runs=5, warmup=1, block=0)
