"""Config values that used to pass validation and fail later: each refused at load naming the key."""

from __future__ import annotations

import pytest

from detr_lab.config import ConfigError, load_config


@pytest.mark.parametrize(("override", "expected"), [
    ("optim.lr=nan", "'optim.lr' is nan; a config's numbers must be finite"),
    ("model.dropout=nan", "'model.dropout' is nan"),
    ("trainer.max_time_minutes=nan", "'trainer.max_time_minutes' is nan"),
    ("optim.lr=inf", "'optim.lr' is inf"),
    ("trainer.max_time_minutes=-inf", "'trainer.max_time_minutes' is -inf"),
    ("optim.lr_multipliers.sampling_offsets=nan", "'optim.lr_multipliers.sampling_offsets' is nan"),
    ("data.augment.std=[0.2,inf,0.2]", "'data.augment.std[1]' is inf"),
    ("model.decoder.query_pos_clamp=inf", "'model.decoder.query_pos_clamp' is inf"),
    ("trainer.seed=-1", "'trainer.seed' is -1; it must be >= 0"),
    ("trainer.seed=4294967296", "'trainer.seed' is 4294967296; it must be <= 4294967295"),
    ("data.synthetic.seed=-3", "'data.synthetic.seed' is -3"),
    ("trainer.max_steps=-2", "'trainer.max_steps' is -2; it must be >= -1"),
    ("optim.lr_drop_epochs=6", "'optim.lr_drop_epochs' is a list, got 6 (on the command line: "
                               "optim.lr_drop_epochs=[6])"),
    ("optim.no_decay_keys=norm", "'optim.no_decay_keys' is a list"),
    ("trainer.ema=true", "'trainer.ema' is a section (keys enabled, decay, warmup_steps), not a value: got "
                         "True; did you mean 'trainer.ema.enabled'?"),
    ("optim.lr_multipliers=3", "'optim.lr_multipliers' is a mapping of names to values, got 3"),
    ("optim.lr=[0.1]", "'optim.lr' takes a single value, not a list: got [0.1]"),
    ("optim.lr=fast", "invalid value for 'optim.lr': 'fast' is not a number"),
    ("trainer.max_epochs=2.5", "invalid value for 'trainer.max_epochs': '2.5' is not an integer"),
    ("trainer.summary=maybe", "invalid value for 'trainer.summary': 'maybe' is not true or false"),
    ("trainer.output_dir=None", "invalid value for 'trainer.output_dir': null is not allowed here"),
    ("model.num_classes=None", "invalid value for 'model.num_classes': null is not allowed here"),
])
def test_a_bad_value_is_refused_at_load_naming_the_key(override, expected):
    with pytest.raises(ConfigError) as caught:
        load_config(overrides=[override])
    message = str(caught.value)
    assert expected in message
    assert "\n" not in message
    for internal in ("AnyNode", "ListConfig", "'?'", "Merge error", "OverflowError", "full_key", "Float"):
        assert internal not in message


def test_none_on_the_command_line_is_null():
    cfg = load_config(overrides=["model.backbone.weights_path=None", "model.decoder.level_points=None"])
    assert cfg.model.backbone.weights_path is None and cfg.model.decoder.level_points is None
    quoted = load_config(overrides=["trainer.output_dir='None'"])
    assert quoted.trainer.output_dir == "None"


def test_the_same_checks_apply_to_yaml_files(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("optim:\n  lr: .nan\n")
    with pytest.raises(ConfigError, match=rf"{path}: 'optim.lr' is nan"):
        load_config(path)
    path.write_text("optim:\n  lr_drop_epochs: 6\n")
    with pytest.raises(ConfigError, match=rf"{path}: 'optim.lr_drop_epochs' is a list, got 6"):
        load_config(path)


def test_finite_edge_values_still_load():
    cfg = load_config(overrides=["trainer.seed=0", "trainer.seed=4294967295", "trainer.max_steps=-1",
                                 "optim.lr_drop_epochs=[6]", "trainer.ema.enabled=true", "model.dropout=0"])
    assert cfg.trainer.seed == 2**32 - 1 and cfg.optim.lr_drop_epochs == [6] and cfg.trainer.ema.enabled
