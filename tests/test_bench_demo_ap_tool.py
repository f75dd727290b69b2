"""tools/bench_demo_ap.py: one CSV row per (config, mark), one plot, configs checked up front."""

import csv
from types import SimpleNamespace

from factories import load_tool


def _tool():
    return load_tool("bench_demo_ap")


def _record(tool, mark, ap):
    stats = {name: ap for name in tool.FIELDS[7:]}
    return SimpleNamespace(
        mark_minutes=mark, train_minutes=mark + 0.2, wall_minutes=mark + 1, cpu_minutes=mark * 1.5,
        epoch=2, global_step=40, stats=stats,
    )  # fmt: skip


def test_default_compares_the_three_demos():
    tool = _tool()
    args = tool.parse_args([])
    assert args.config == ["configs/demo.yaml", "configs/demo_dino.yaml", "configs/demo_denoising.yaml"]
    assert args.minutes == [5.0, 10.0, 15.0]


def test_one_csv_and_one_plot_for_several_configs(tmp_path):
    tool = _tool()
    runs = {"demo": [_record(tool, 5, 0.1), _record(tool, 10, 0.25)], "demo_dino": [_record(tool, 5, 0.4)]}
    tool.write_csv(runs, tmp_path / "demo_ap.csv")
    tool.write_plot(runs, tmp_path / "demo_ap.png", "test")
    rows = list(csv.DictReader((tmp_path / "demo_ap.csv").open()))
    assert [(r["config"], r["mark_minutes"], r["AP"]) for r in rows] == [
        ("demo", "5", "0.1000"),
        ("demo", "10", "0.2500"),
        ("demo_dino", "5", "0.4000"),
    ]
    assert (tmp_path / "demo_ap.png").stat().st_size > 1000


def test_duplicate_config_names_fail_before_training(tmp_path, capsys):
    tool = _tool()
    code = tool.main(["--config", "configs/demo.yaml", "other/demo.yaml", "--output-dir", str(tmp_path)])
    assert code != 0 and "distinct file names" in capsys.readouterr().err
