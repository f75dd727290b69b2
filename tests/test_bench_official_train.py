"""tools/bench_official_train.py without the official repositories: what it refuses before importing
anything, and the two adaptations it makes in its own process (no timings)."""

from __future__ import annotations

import pytest
import torchvision

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
        tool.main(["--family", "dino", "--official-dir", str(tmp_path)])
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
