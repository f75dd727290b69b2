"""A run owns its folder and never writes over another run's checkpoints; a resume that could not
continue exactly is refused at start, naming the key and the way out.

One tiny run (TINY_RUN_YAML: 3 steps of 2 images, 2 steps per epoch, so its last.ckpt is taken in
mid-epoch, `optim.lr_backbone: 0`) serves every case; the refused runs stop before training and leave
its files as they were.
"""

import re
import shutil
import warnings
from pathlib import Path

import pytest

from detr_lab.config import ConfigError, load_config
from detr_lab.engine.resume_checks import effective_train_batching
from detr_lab.engine.run_folder import LOCK_FILE, lock_run_folder
from detr_lab.engine.trainer import train
from detr_lab.errors import InputError

from factories import TINY_RUN_YAML, load_tool

pytestmark = pytest.mark.slow  # one Lightning run, then refused starts


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    root = tmp_path_factory.mktemp("owned")
    config_path = root / "tiny.yaml"
    config_path.write_text(TINY_RUN_YAML.format(root=root))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        train(load_config(config_path, ["trainer.summary=false"]), progress_bar=False)
    checkpoints = root / "run" / "checkpoints"
    return {"root": root, "config": config_path, "checkpoints": checkpoints,
            "files": {p.name: p.read_bytes() for p in checkpoints.iterdir()}}


def start(config_path: Path, *overrides: str, **options):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return train(load_config(config_path, ["trainer.summary=false", *overrides]), progress_bar=False,
                     **options)


def unchanged(finished) -> bool:
    return {p.name: p.read_bytes() for p in finished["checkpoints"].iterdir()} == finished["files"]


def test_a_new_run_refuses_a_folder_with_an_earlier_runs_checkpoints(finished, capsys):
    assert "last.ckpt" in finished["files"] and any(n.startswith("best-") for n in finished["files"])
    with pytest.raises(InputError, match=r"holds the checkpoints of an earlier run \(best-.*last\.ckpt\) and "
                       r"a new run would write over them; continue that run with --resume auto, or set "
                       r"trainer.output_dir to a new folder"):
        start(finished["config"])
    assert unchanged(finished)
    # The tool says it in one line, exit status 1.
    code = load_tool("train").main(["--config", str(finished["config"]), "--set", "trainer.summary=false"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1 and "--resume auto" in err[0] and "Traceback" not in err[0]
    assert unchanged(finished)


def test_resuming_another_folders_checkpoint_refuses_a_folder_with_checkpoints(finished, tmp_path):
    other = tmp_path / "other"
    (other / "checkpoints").mkdir(parents=True)
    shutil.copy(finished["checkpoints"] / "last.ckpt", other / "checkpoints" / "best-epoch000-ap0.1000.ckpt")
    with pytest.raises(InputError, match=r"\(best-epoch000-ap0\.1000\.ckpt\) and resuming .*last\.ckpt \(a "
                       r"checkpoint of another folder\) would write over them; move those files away"):
        start(finished["config"], f"trainer.output_dir={other}",
              resume=str(finished["checkpoints"] / "last.ckpt"))
    assert sorted(p.name for p in (other / "checkpoints").iterdir()) == ["best-epoch000-ap0.1000.ckpt"]


def test_a_second_run_on_a_folder_in_use_is_refused(finished, tmp_path):
    folder = tmp_path / "busy"
    with lock_run_folder(folder):
        holder = (folder / LOCK_FILE).read_text()
        assert holder.startswith("pid ")
        expected = (f"trainer.output_dir {folder} is in use by another training run ({holder.strip()}); "
                    "wait for it to end, or set trainer.output_dir to another folder")
        with pytest.raises(InputError, match=re.escape(expected)):
            start(finished["config"], f"trainer.output_dir={folder}")
        with pytest.raises(InputError, match="in use by another training run"):
            with lock_run_folder(folder):
                pass
    assert not (folder / "config.yaml").exists() and not (folder / "checkpoints").exists()
    with lock_run_folder(folder):  # released: the next run may take it
        pass


def resumable_copy(finished, tmp_path) -> Path:
    run = tmp_path / "resumed"
    (run / "checkpoints").mkdir(parents=True)
    shutil.copy(finished["checkpoints"] / "last.ckpt", run / "checkpoints" / "last.ckpt")
    return run


@pytest.mark.parametrize(("change", "named"), [
    ("optim.lr_backbone=1.0e-5", r"'optim.lr_backbone' 0 -> 1e-05"),
    ("optim.lr_multipliers={decoder: 0.5}", r"'optim.lr_multipliers' added \['decoder'\]"),
], ids=["lr_backbone", "lr_multipliers"])
def test_resume_with_other_parameter_groups_is_refused_naming_the_key(finished, tmp_path, change, named):
    run = resumable_copy(finished, tmp_path)
    with pytest.raises(ConfigError, match=rf"cannot resume .*last\.ckpt exactly: {named}, so the optimizer's "
                       r"parameter groups differ .*set the key back to resume, or start a new run from these "
                       r"weights: --init-from .*last\.ckpt with a new trainer.output_dir"):
        start(finished["config"], change, f"trainer.output_dir={run}", resume="auto")


def test_resume_in_mid_epoch_with_another_batch_size_is_refused(finished, tmp_path):
    run = resumable_copy(finished, tmp_path)
    before = (run / "checkpoints" / "last.ckpt").read_bytes()
    with pytest.raises(ConfigError, match=r"with 'data.batch_size: 1': it was taken after 1 batches of 2 "
                       r"images in epoch 1, .*without skipping or repeating images; resume with the saved "
                       r"value .* \(data.batch_size=2\)"):
        start(finished["config"], "data.batch_size=1", f"trainer.output_dir={run}", resume="auto")
    assert (run / "checkpoints" / "last.ckpt").read_bytes() == before


def test_resume_in_mid_epoch_with_another_batching_is_refused(finished, tmp_path):
    run = resumable_copy(finished, tmp_path)
    before = (run / "checkpoints" / "last.ckpt").read_bytes()
    with pytest.raises(ConfigError, match=r"with 'data.train_batching: padded': it was taken after 1 batches "
                       r"of epoch 1 drawn with 'aspect_ratio' batching, .*resume with the saved value .* "
                       r"\(data.train_batching=aspect_ratio\)"):
        start(finished["config"], "data.train_batching=padded", f"trainer.output_dir={run}", resume="auto")
    assert (run / "checkpoints" / "last.ckpt").read_bytes() == before


def test_batching_of_a_saved_config_from_before_the_key():
    assert effective_train_batching({"batch_size": 2}) == "padded"  # the default before the key existed
    assert effective_train_batching({"train_batching": "aspect_ratio"}) == "aspect_ratio"
    square = {"train_batching": "aspect_ratio", "augment": {"policy": "rtdetr"}}
    assert effective_train_batching(square) == "padded"  # nothing is grouped under the rtdetr policy
    assert effective_train_batching(load_config(overrides=["data.augment.policy=rtdetr"]).data) == "padded"
    assert effective_train_batching(load_config().data) == "aspect_ratio"
