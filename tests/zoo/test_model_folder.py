"""Hub-style model folders: `save_pretrained` / `load_pretrained_folder` / `Predictor.from_pretrained`,
the model card, the huggingface_hub file names, `push_to_hub` and Hub repository ids (huggingface_hub
replaced by local stand-ins: no network)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from detr_lab.checkpoints import CheckpointError, LoadedCheckpoint, save_checkpoint
from detr_lab.models.build import build_model
from detr_lab.predict import Predictor
from detr_lab.predict import predictor as predictor_module
from detr_lab.zoo import CONFIG_NAME, WEIGHTS_NAME, load_pretrained, load_pretrained_folder, save_pretrained
from detr_lab.zoo import folder as folder_module

from factories import tiny_config

NAMES = ["cat", "dog", "bird"]
IDS = [3, 7, 11]


@pytest.fixture(scope="module")
def loaded() -> LoadedCheckpoint:
    torch.manual_seed(0)
    cfg = tiny_config("data.augment.eval_size=64", "data.augment.eval_max_size=96", num_classes=3,
                      dropout=0.0, classification="sigmoid")
    return LoadedCheckpoint(build_model(cfg.model).eval(), cfg, IDS, NAMES)


def image() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 255, (48, 80, 3), dtype=np.uint8)


def test_folder_round_trip_with_the_hub_file_names(tmp_path, loaded):
    report = tmp_path / "report"
    report.mkdir()
    (report / "per_class.csv").write_text("class,AP\ncat,0.5\n")
    folder = save_pretrained(tmp_path / "tiny-dino", loaded, evaluation={"AP": 0.421, "AP50": 0.6},
                             report=report, source={"checkpoint": "last.ckpt"}, license_id="apache-2.0")
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "config.json", "evaluation",
                                                        "model.safetensors"]
    assert (CONFIG_NAME, WEIGHTS_NAME) == ("config.json", "model.safetensors")

    description = json.loads((folder / "config.json").read_text())
    assert description["library_name"] == "detr_lab" and description["num_classes"] == 3
    assert description["id2label"] == {"0": "cat", "1": "dog", "2": "bird"}
    assert description["category_ids"] == IDS and description["evaluation"]["AP"] == 0.421
    assert description["config"]["model"]["classification"] == "sigmoid"

    # the weights read with safetensors alone, every name of the state dict present
    stored = load_file(folder / "model.safetensors")
    expected = loaded.model.state_dict()
    assert stored.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(stored[key], value), key

    card = (folder / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: detr_lab\nlicense: apache-2.0\npipeline_tag: object-detection")
    assert "| AP | 0.421 |" in card and "[per_class.csv](evaluation/per_class.csv)" in card
    assert "- checkpoint: last.ckpt" in card and "0: cat (id 3)" in card
    assert (folder / "evaluation" / "per_class.csv").read_text() == "class,AP\ncat,0.5\n"

    again = load_pretrained_folder(folder)
    assert again.category_ids == IDS and again.class_names == NAMES
    batch, mask = torch.randn(1, 3, 64, 96), torch.zeros(1, 64, 96, dtype=torch.bool)
    with torch.no_grad():
        ours, theirs = again.model(batch, mask), loaded.model(batch, mask)
    torch.testing.assert_close(ours["pred_boxes"], theirs["pred_boxes"])


def test_tensors_sharing_memory_are_stored_apart():
    """safetensors refuses tensors that share memory (tied weights, views of one buffer)."""
    tied = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    tied[1].weight = tied[0].weight
    state = folder_module._unshared_state(tied)
    assert list(state) == ["0.weight", "0.bias", "1.weight", "1.bias"]
    assert state["0.weight"].untyped_storage().data_ptr() != state["1.weight"].untyped_storage().data_ptr()
    assert torch.equal(state["0.weight"], state["1.weight"])
    assert folder_module.save_safetensors(state)  # would raise on shared memory


def test_predictor_save_and_load(tmp_path, loaded, monkeypatch):
    """An optimized Predictor saves the weights as loaded (read again), not its rewritten modules."""
    checkpoint = save_checkpoint(tmp_path / "model.pt", loaded.model, loaded.config, IDS, NAMES)

    def rewrite(model):  # stands in for optimize_for_inference, which folds weights in place
        with torch.no_grad():
            model.class_embed.weight.mul_(0.0)
        return model

    monkeypatch.setattr(predictor_module, "optimize_for_inference", rewrite)
    predictor = Predictor.from_checkpoint(checkpoint)
    assert predictor.optimize and not predictor.model.class_embed.weight.any()
    folder = predictor.save_pretrained(tmp_path / "folder", evaluation={"AP": 0.1})
    stored = load_file(folder / "model.safetensors")
    assert stored.keys() == loaded.model.state_dict().keys()
    assert torch.equal(stored["class_embed.weight"], loaded.model.class_embed.weight)
    assert f"- checkpoint: {checkpoint}" in (folder / "README.md").read_text()

    from_folder = Predictor.from_pretrained(folder, optimize=False)
    plain = Predictor.from_checkpoint(checkpoint, optimize=False)
    assert from_folder.origin == {"folder": str(folder)} and from_folder.class_names == NAMES
    ours, theirs = from_folder.predict(image())[0], plain.predict(image())[0]
    torch.testing.assert_close(ours["boxes"], theirs["boxes"])
    assert ours["category_ids"].tolist() == theirs["category_ids"].tolist()

    saved_again = from_folder.save_pretrained(tmp_path / "copy")  # an unoptimized predictor saves as is
    assert torch.equal(load_file(saved_again / "model.safetensors")["class_embed.weight"],
                       loaded.model.class_embed.weight)
    bare = Predictor(loaded.model, loaded.config, IDS, NAMES, torch.device("cpu"))  # optimized, no reload
    with pytest.raises(ValueError, match="optimize=False to save it"):
        bare.save_pretrained(tmp_path / "bare")


def test_broken_folders_are_clear_errors(tmp_path, loaded):
    folder = save_pretrained(tmp_path / "m", loaded)
    assert "No evaluation report" in (folder / "README.md").read_text()
    description = json.loads((folder / "config.json").read_text())

    (folder / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"m/config.json: not valid JSON"):
        load_pretrained_folder(folder)
    (folder / "config.json").write_text(json.dumps({**description, "library_name": "transformers"}))
    with pytest.raises(ValueError, match="not a detr_lab model folder"):
        load_pretrained_folder(folder)
    (folder / "config.json").write_text(json.dumps({**description, "class_names": ["a"]}))
    with pytest.raises(ValueError, match="1 class names for a model with num_classes=3"):
        load_pretrained_folder(folder)
    (folder / "config.json").write_text(json.dumps(description))
    (folder / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="model.safetensors: not a readable safetensors file"):
        load_pretrained_folder(folder)
    (folder / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors not found"):
        load_pretrained_folder(folder)
    with pytest.raises(FileNotFoundError, match="report not found"):
        save_pretrained(tmp_path / "n", loaded, report=tmp_path / "missing")
    with pytest.raises(ValueError, match="not a model folder"):
        load_pretrained(tmp_path)


class FakeHub:
    """Stands in for huggingface_hub: records uploads, serves a snapshot from a local folder."""

    def __init__(self, snapshot=None):
        self.calls, self.snapshot = [], snapshot

    def HfApi(self, token=None):  # noqa: N802 - the huggingface_hub name
        hub = self

        class Api:
            def create_repo(self, **kwargs):
                hub.calls.append(("create_repo", kwargs, token))

            def upload_folder(self, **kwargs):
                hub.calls.append(("upload_folder", kwargs, token))
                return type("Commit", (), {"commit_url": "https://hub.example/me/tiny/commit/1"})()

        return Api()

    def snapshot_download(self, repo_id, revision=None, cache_dir=None):
        self.calls.append(("snapshot_download", repo_id, revision))
        return str(self.snapshot)


def test_push_to_hub_and_hub_repository_ids(tmp_path, loaded, monkeypatch):
    folder = save_pretrained(tmp_path / "tiny", loaded)
    hub = FakeHub(snapshot=folder)
    monkeypatch.setattr(folder_module, "huggingface_hub", hub)
    url = folder_module.push_to_hub(folder, "me/tiny", private=True, token="t0")
    assert url == "https://hub.example/me/tiny/commit/1"
    assert hub.calls[0] == ("create_repo", {"repo_id": "me/tiny", "private": True, "exist_ok": True,
                                            "repo_type": "model"}, "t0")
    assert hub.calls[1][0] == "upload_folder" and hub.calls[1][1]["folder_path"] == str(folder)
    with pytest.raises(FileNotFoundError):
        folder_module.push_to_hub(tmp_path / "nothing", "me/tiny")
    assert len(hub.calls) == 2  # nothing sent for a folder that is not a model folder

    monkeypatch.chdir(tmp_path)
    predictor = Predictor.from_pretrained("me/tiny-remote", revision="v1", optimize=False)
    assert hub.calls[-1] == ("snapshot_download", "me/tiny-remote", "v1")
    assert predictor.origin["hub"] == "me/tiny-remote" and predictor.class_names == NAMES

    def offline(**kwargs):
        raise OSError("We could not connect to the Hub")

    monkeypatch.setattr(hub, "snapshot_download", offline)
    with pytest.raises(ValueError, match="'runs/typo' is no local folder, and as a Hugging .*connect"):
        Predictor.from_pretrained("runs/typo")

    monkeypatch.setattr(folder_module, "huggingface_hub", None)
    with pytest.raises(ImportError, match="pip install huggingface_hub"):
        folder_module.push_to_hub(folder, "me/tiny")
    shutil.rmtree(folder)
