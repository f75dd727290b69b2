"""tools/bench_official_train.py without the official repositories: what it refuses before importing
anything, and the two adaptations it makes in its own process (no timings)."""

from __future__ import annotations

import sys

import pytest
import torch
import torchvision

from detr_lab.errors import InputError, InputNotFoundError

from factories import load_tool


@pytest.fixture(scope="module")
def tool():
    return load_tool("bench_official_train")


def test_refuses_a_missing_or_wrong_official_folder(tool, tmp_path, capsys):
    assert tool.main(["--family", "detr", "--official-dir", str(tmp_path / "none")]) == 1
    assert "no such folder" in capsys.readouterr().err
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "detr.py").write_text("")
    assert tool.main(["--family", "deformable", "--official-dir", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "no models/deformable_detr.py and main.py" in err and "fundamentalvision/Deformable-DETR" in err
    (tmp_path / "main.py").write_text("")
    assert tool.main(["--family", "detr", "--official-dir", str(tmp_path), "--runs", "0"]) == 1
    assert "--runs must be >= 1, got 0" in capsys.readouterr().err
    with pytest.raises(SystemExit) as stop:
        tool.main(["--family", "yolo", "--official-dir", str(tmp_path)])
    assert stop.value.code == 2


def test_version_shim_is_undone_and_resnets_are_built_without_weights(tool):
    real = torchvision.__version__
    with pytest.raises(RuntimeError), tool.torchvision_version("0.99"):
        assert torchvision.__version__ == "0.99"
        raise RuntimeError
    assert torchvision.__version__ == real
    calls = []
    build = tool._without_download(lambda *args, **kwargs: calls.append(kwargs))
    build(replace_stride_with_dilation=[False, False, True], pretrained=True, norm_layer=None)
    expected = {"weights": None, "replace_stride_with_dilation": [False, False, True], "norm_layer": None}
    assert calls == [expected]


def test_the_yaml_families_check_their_folder_and_have_their_own_defaults(tool, tmp_path, capsys):
    assert tool.main(["--family", "rtdetrv2", "--official-dir", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "no src/zoo/rtdetr/rtdetrv2_decoder.py there" in err and "lyuwenyu/RT-DETR" in err
    with pytest.raises(SystemExit) as stop:
        tool.main(["--family", "detr", "--official-dir", str(tmp_path), "--official-config", "a.yml"])
    assert stop.value.code == 2
    dfine = tool.parse_args(["--family", "dfine", "--official-dir", str(tmp_path)])
    assert (dfine.train_size, dfine.inference_size, dfine.config, dfine.official_config) == (
        "640x640", "640x640", "configs/dfine_n.yaml", "configs/dfine/dfine_hgnetv2_n_coco.yml")
    dino = tool.parse_args(["--family", "dino", "--official-dir", str(tmp_path), "--train-size", "256x320"])
    assert (dino.train_size, dino.inference_size, dino.config, dino.official_config) == (
        "256x320", "800x1066", "configs/dino_4scale.yaml", None)


@pytest.fixture
def fake_official_src(tmp_path, monkeypatch):
    """A folder whose `src.core.YAMLConfig` records what it was given, importable for one test."""
    core = tmp_path / "src" / "core"
    core.mkdir(parents=True)
    (tmp_path / "src" / "__init__.py").write_text("")
    (core / "__init__.py").write_text(
        "class YAMLConfig:\n"
        "    def __init__(self, path, **updates):\n"
        "        self.model, self.criterion = ('model', path, updates), 'criterion'\n"
    )
    monkeypatch.setattr(sys, "path", list(sys.path))
    yield tmp_path
    for name in [name for name in sys.modules if name == "src" or name.startswith("src.")]:
        del sys.modules[name]


def test_the_yaml_official_is_built_by_its_own_config_class_without_downloads(tool, fake_official_src):
    folder = fake_official_src
    with pytest.raises(InputNotFoundError, match="--official-config configs/none.yml: no such file"):
        tool.build_yaml_official("dfine", folder, "configs/none.yml")
    (folder / "configs").mkdir()
    (folder / "configs" / "n.yml").write_text("")
    model, criterion = tool.build_yaml_official("dfine", folder, "configs/n.yml")
    assert model == ("model", str(folder / "configs" / "n.yml"), {"HGNetv2": {"pretrained": False}})
    assert criterion == "criterion"
    with pytest.raises(InputError, match="one family per run"):
        tool.build_yaml_official("rtdetrv2", folder, "configs/n.yml")


def test_cuda_transfers_stay_on_the_cpu_inside_the_block_only(tool):
    real_cuda, real_to = torch.Tensor.cuda, torch.Tensor.to
    tensor = torch.ones(3)
    with tool.tensors_stay_on_cpu():
        assert tensor.cuda() is tensor
        assert tensor.to("cuda").device.type == "cpu"
        assert tensor.to(torch.float64).dtype == torch.float64
        assert tensor.to("cpu", torch.int64).dtype == torch.int64
    assert torch.Tensor.cuda is real_cuda and torch.Tensor.to is real_to
