"""Config loading: schema validation, `_base_` inheritance, dotted overrides, saving."""

from __future__ import annotations

from pathlib import Path

import pytest

from detr_lab.config import ConfigError, config_from_dict, config_to_dict, load_config, save_config

from factories import architecture_differences, official_reference


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_defaults_are_the_official_detr_r50():
    """With no file, the model is the one detr_lab infers from the official DETR-R50 checkpoint's keys
    and shapes (tests/fixtures/detr_r50.pt; keys the weights cannot tell aside) and the loss weights
    are the official `weight_dict`; the optimizer and scales are the official `main.py` /
    `datasets/coco.py` defaults (facebookresearch/detr)."""
    cfg = load_config()
    official, weight_dict = official_reference("detr_r50")
    assert architecture_differences(cfg, official) == {}
    assert (cfg.loss.class_weight, cfg.loss.bbox_weight, cfg.loss.giou_weight) == (
        weight_dict["loss_ce"],
        weight_dict["loss_bbox"],
        weight_dict["loss_giou"],
    )
    assert cfg.optim.lr == pytest.approx(1e-4)
    assert cfg.optim.lr_backbone == pytest.approx(1e-5)
    assert cfg.data.augment.train_scales == list(range(480, 801, 32))


def test_base_inheritance_and_variant_overrides(tmp_path):
    write(tmp_path / "base" / "model.yaml", "model:\n  num_queries: 50\n  hidden_dim: 64\n  num_heads: 4\n")
    write(tmp_path / "base" / "train.yaml", "optim:\n  lr: 0.0002\ntrainer:\n  max_epochs: 3\n")
    variant = write(
        tmp_path / "variant.yaml",
        "_base_: [base/model.yaml, base/train.yaml]\nmodel:\n  num_queries: 30\n",
    )
    cfg = load_config(variant)
    assert cfg.model.num_queries == 30  # the variant wins over its base
    assert cfg.model.hidden_dim == 64  # inherited from the first base
    assert cfg.optim.lr == pytest.approx(2e-4)  # inherited from the second base
    assert cfg.trainer.max_epochs == 3


def test_nested_base_chain(tmp_path):
    write(tmp_path / "a.yaml", "model:\n  num_queries: 11\n")
    write(tmp_path / "sub" / "b.yaml", "_base_: ../a.yaml\nmodel:\n  dropout: 0.0\n")
    c = write(tmp_path / "c.yaml", "_base_: sub/b.yaml\n")
    cfg = load_config(c)
    assert cfg.model.num_queries == 11
    assert cfg.model.dropout == 0.0


def test_dotted_overrides(tmp_path):
    cfg = load_config(
        overrides=[
            "model.num_queries=7",
            "model.encoder.attention=act",
            "optim.lr_multipliers.sampling_offsets=0.1",
        ]
    )
    assert cfg.model.num_queries == 7
    assert cfg.model.encoder.attention == "act"
    assert cfg.optim.lr_multipliers == {"sampling_offsets": 0.1}


def test_misspelled_key_names_key_and_closest_match(tmp_path):
    path = write(tmp_path / "typo.yaml", "model:\n  num_querys: 5\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    message = str(err.value)
    assert "typo.yaml" in message
    assert "model.num_querys" in message
    assert "num_queries" in message


def test_misspelled_section_and_override_suggest(tmp_path):
    with pytest.raises(ConfigError, match=r"'modle'.*did you mean 'model'"):
        load_config(overrides=["modle.num_queries=5"])
    with pytest.raises(ConfigError, match=r"model.encoder.atention.*did you mean 'attention'"):
        load_config(overrides=["model.encoder.atention=act"])


def test_wrong_type_names_key(tmp_path):
    path = write(tmp_path / "bad_type.yaml", "model:\n  hidden_dim: wide\n")
    with pytest.raises(ConfigError, match=r"bad_type.yaml.*model.hidden_dim"):
        load_config(path)


def test_wrong_choice_names_key_and_options():
    expected = r"encoder.attention.*plain, deformable, deformable_v2, act.*did you mean 'plain'"
    with pytest.raises(ConfigError, match=expected):
        load_config(overrides=["model.encoder.attention=plane"])


def test_out_of_range_value_names_key():
    with pytest.raises(ConfigError, match=r"model.num_queries.*> 0"):
        load_config(overrides=["model.num_queries=0"])
    with pytest.raises(ConfigError, match=r"model.dropout.*<= 1"):
        load_config(overrides=["model.dropout=1.5"])


def test_cross_field_rules():
    with pytest.raises(ConfigError, match="divisible"):
        load_config(overrides=["model.hidden_dim=100", "model.num_heads=8"])
    with pytest.raises(ConfigError, match=r"'model.hidden_dim' \(48\) must be divisible by 32.*levels"):
        load_config(overrides=["model.num_feature_levels=4", "model.hidden_dim=48"])
    assert load_config(overrides=["model.num_feature_levels=4"]).model.encoder.attention == "plain"
    with pytest.raises(ConfigError, match="'model.query_source: proposals' needs 'model.box_refine: true'"):
        load_config(overrides=["model.decoder.cross_attention=deformable", "model.query_source=proposals"])


def test_missing_file_and_missing_base(tmp_path):
    with pytest.raises(ConfigError, match=r"not found.*nope.yaml"):
        load_config(tmp_path / "nope.yaml")
    variant = write(tmp_path / "variant.yaml", "_base_: missing_base.yaml\n")
    with pytest.raises(ConfigError, match=r"missing_base.yaml.*variant.yaml"):
        load_config(variant)


def test_base_cycle_is_reported(tmp_path):
    write(tmp_path / "a.yaml", "_base_: b.yaml\n")
    write(tmp_path / "b.yaml", "_base_: a.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(tmp_path / "a.yaml")


def test_bad_override_syntax():
    with pytest.raises(ConfigError, match="key.path=value"):
        load_config(overrides=["model.num_queries"])


def test_saved_config_round_trips(tmp_path):
    cfg = load_config(overrides=["model.num_queries=13", "data.augment.train_scales=[96,128]"])
    saved = save_config(cfg, tmp_path / "run" / "config.yaml")
    assert saved.is_file()
    reloaded = load_config(saved)
    assert reloaded == cfg
    assert config_from_dict(config_to_dict(cfg)) == cfg


def test_config_from_dict_rejects_unknown_keys():
    with pytest.raises(ConfigError, match="checkpoint.*model.hiden_dim.*hidden_dim"):
        config_from_dict({"model": {"hiden_dim": 3}}, where="checkpoint")


@pytest.mark.parametrize("path", sorted(Path(__file__).parents[1].joinpath("configs").rglob("*.yaml")))
def test_every_shipped_config_loads(path):
    load_config(path)


def test_config_path_that_is_a_folder_says_so(tmp_path):
    with pytest.raises(ConfigError, match="is a folder, not a YAML file"):
        load_config(tmp_path)


def test_yaml_syntax_error_gives_line_and_column(tmp_path):
    bad = write(tmp_path / "bad.yaml", "model:\n  hidden_dim: [1, 2\n  x: 3\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: not valid YAML: .* at line 3, column \d+$"):
        load_config(bad)


@pytest.mark.parametrize("value", ["two", "1.5", "0,,1", "gpu"])
def test_bad_devices_rejected_at_load(value):
    with pytest.raises(ConfigError, match="'trainer.devices'"):
        load_config(None, [f"trainer.devices={value}"])


@pytest.mark.parametrize("value", ["auto", "8", "0,1", "0, 1"])
def test_good_devices_accepted(value):
    assert load_config(None, [f"trainer.devices={value}"]).trainer.devices == value
