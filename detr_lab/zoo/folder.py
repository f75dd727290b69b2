"""Hub-style model folders: a self-describing folder that `huggingface_hub` can upload and download.

    save_pretrained("my-detector", loaded, evaluation={"AP": 0.42}, source={"checkpoint": "last.ckpt"})
    loaded = load_pretrained_folder("my-detector")          # a LoadedCheckpoint
    push_to_hub("my-detector", "me/my-detector")            # needs huggingface_hub and a token

The folder follows the file names of `huggingface_hub`'s `ModelHubMixin` / `PyTorchModelHubMixin`:

- `config.json`: `{"library_name": "detr_lab", "format_version": 1, "config": <the full detr_lab
  config>, "category_ids": [...], "class_names": [...], "id2label": {"0": name, ...}, "label2id",
  "num_classes", "source": {...}, "evaluation": {...}}` (class index -> dataset id / name);
- `model.safetensors`: the model's state dict (float tensors as stored, metadata `format: pt`);
  tensors that share memory in the model (shared heads) are stored once per name, so the file reads
  with `safetensors.torch.load_file` alone;
- `README.md`: the model card (YAML front matter with `library_name`, `license`, `tags`,
  `pipeline_tag: object-detection`; the classes, the source and the evaluation);
- `evaluation/`: copies of the files of an evaluation report, when one is given.

Every file is written atomically (`detr_lab.files`); files of the folder that detr_lab does not write
(e.g. a `.git` folder) are left alone.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import Tensor

from detr_lab.checkpoints import CheckpointError, LoadedCheckpoint, apply_overrides, build_loaded
from detr_lab.config import config_to_dict
from detr_lab.errors import InputError, InputNotFoundError, MissingExtraError
from detr_lab.files import atomic_write, atomic_write_text

try:  # a dependency of timm, so normally present; only `push_to_hub` and hub repo ids need it
    import huggingface_hub
except ImportError:  # pragma: no cover - depends on the environment
    huggingface_hub = None

CONFIG_NAME = "config.json"  # huggingface_hub.constants.CONFIG_NAME
WEIGHTS_NAME = "model.safetensors"  # huggingface_hub.constants.SAFETENSORS_SINGLE_FILE
CARD_NAME = "README.md"  # huggingface_hub.constants.REPOCARD_NAME
REPORT_DIR = "evaluation"
LIBRARY = "detr_lab"
FOLDER_VERSION = 1


def is_pretrained_folder(path: str | os.PathLike) -> bool:
    """True when `path` is a folder holding a `config.json` (a Hub-style model folder)."""
    return Path(path).is_dir() and (Path(path) / CONFIG_NAME).is_file()


def _unshared_state(model: torch.nn.Module) -> dict[str, Tensor]:
    """The model's state dict on the CPU, contiguous, with tensors that share memory copied apart
    (safetensors refuses shared storage)."""
    state: dict[str, Tensor] = {}
    storages: set[int] = set()
    for name, tensor in model.state_dict().items():
        tensor = tensor.detach().cpu().contiguous()
        pointer = tensor.untyped_storage().data_ptr()
        if pointer in storages and tensor.numel():
            tensor = tensor.clone()
            pointer = tensor.untyped_storage().data_ptr()
        storages.add(pointer)
        state[name] = tensor
    return state


def _card(loaded: LoadedCheckpoint, source: Mapping[str, Any], evaluation: Mapping[str, Any],
          report_files: Sequence[str], title: str, license_id: str | None) -> str:
    cfg = loaded.config
    lines = ["---", f"library_name: {LIBRARY}"]
    if license_id:
        lines.append(f"license: {license_id}")
    lines += ["pipeline_tag: object-detection", "tags:", "- object-detection", f"- {LIBRARY}", "---", "",
              f"# {title}", ""]
    model = cfg.model
    lines.append(
        f"A {LIBRARY} detector: {model.backbone.name} backbone, {model.hidden_dim}-wide transformer, "
        f"{model.num_queries} queries, {model.num_classes} classes. Load it with:"
    )
    lines += ["", "```python", "from detr_lab.predict import Predictor", "",
              'predictor = Predictor.from_pretrained("path/to/this/folder")  # or the Hub repo id',
              'detections = predictor.predict("image.jpg", score_threshold=0.5)', "```", ""]
    if source:
        lines += ["## Source", ""]
        lines += [f"- {key}: {value}" for key, value in source.items() if value not in (None, "", [], {})]
        lines.append("")
    lines += ["## Evaluation", ""]
    if evaluation:
        lines += ["| metric | value |", "|---|---|"]
        lines += [f"| {key} | {value} |" for key, value in evaluation.items()]
    else:
        lines.append("No evaluation report was saved with this model.")
    if report_files:
        lines += ["", "Report files: " + ", ".join(f"[{name}]({REPORT_DIR}/{name})" for name in report_files)]
    names = [f"{i}: {name} (id {cid})" for i, (cid, name) in enumerate(zip(loaded.category_ids,
                                                                          loaded.class_names, strict=True))]
    lines += ["", "## Classes", "", "Class index: name (dataset category id): " + "; ".join(names), ""]
    return "\n".join(lines)


def save_pretrained(
    folder: str | os.PathLike,
    loaded: LoadedCheckpoint,
    *,
    source: Mapping[str, Any] | None = None,
    evaluation: Mapping[str, Any] | None = None,
    report: str | os.PathLike | None = None,
    title: str | None = None,
    license_id: str | None = None,
) -> Path:
    """Write `loaded` (model, config, classes) as a Hub-style folder; returns the folder.

    Args:
        source: where the weights come from (zoo entry, checkpoint path...), kept in `config.json` and
            on the card.
        evaluation: metrics to show on the card and keep in `config.json` (name -> number or text),
            e.g. `{"AP": 0.421, "AP50": 0.63}`.
        report: an evaluation report, a file or a folder of files (not recursive), copied into
            `evaluation/` and linked from the card.
        title: the card's title (default: the folder's name).
        license_id: the card's `license` (e.g. "apache-2.0").
    Raises:
        InputNotFoundError: `report` does not exist. InputError: class ids / names that do not match
        the model. FileWriteError: a file cannot be written (the message names it).
    """
    folder = Path(folder)
    cfg = loaded.config
    if len(loaded.category_ids) != cfg.model.num_classes or len(loaded.class_names) != cfg.model.num_classes:
        raise InputError(
            f"{folder}: {len(loaded.category_ids)} category ids and {len(loaded.class_names)} class names "
            f"for a model with num_classes={cfg.model.num_classes}"
        )
    report_paths: list[Path] = []
    if report is not None:
        report = Path(report)
        if not report.exists():
            raise InputNotFoundError(f"evaluation report not found: {report}")
        report_paths = sorted(p for p in report.iterdir() if p.is_file()) if report.is_dir() else [report]
    source = dict(source or {})
    evaluation = dict(evaluation or {})
    state = _unshared_state(loaded.model)
    with atomic_write(folder / WEIGHTS_NAME, "wb") as file:
        file.write(save_safetensors(state, metadata={"format": "pt"}))
    for path in report_paths:
        with atomic_write(folder / REPORT_DIR / path.name, "wb") as file, open(path, "rb") as original:
            shutil.copyfileobj(original, file)
    description = {
        "library_name": LIBRARY,
        "format_version": FOLDER_VERSION,
        "num_classes": cfg.model.num_classes,
        "category_ids": [int(i) for i in loaded.category_ids],
        "class_names": [str(n) for n in loaded.class_names],
        "id2label": {str(i): str(n) for i, n in enumerate(loaded.class_names)},
        "label2id": {str(n): i for i, n in enumerate(loaded.class_names)},
        "source": source,
        "evaluation": evaluation,
        "config": config_to_dict(cfg),
    }
    atomic_write_text(folder / CONFIG_NAME, json.dumps(description, indent=2) + "\n")
    card = _card(loaded, source, evaluation, [p.name for p in report_paths], title or folder.name, license_id)
    atomic_write_text(folder / CARD_NAME, card)
    return folder


def read_folder_description(folder: str | os.PathLike) -> dict[str, Any]:
    """The parsed `config.json` of a model folder.

    Raises:
        InputNotFoundError: no folder or no `config.json`. InputError: not JSON, not a detr_lab folder,
        or a key missing (the message names the file and the key).
    """
    path = Path(folder) / CONFIG_NAME
    if not Path(folder).is_dir():
        raise InputNotFoundError(f"model folder not found: {folder}")
    if not path.is_file():
        raise InputNotFoundError(f"{path} not found: not a Hub-style model folder")
    try:
        description = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise InputError(f"{path}: not valid JSON ({err})") from err
    if not isinstance(description, dict) or description.get("library_name") != LIBRARY:
        raise InputError(f"{path}: not a {LIBRARY} model folder (library_name is not '{LIBRARY}')")
    version = description.get("format_version")
    if version != FOLDER_VERSION:
        raise InputError(f"{path}: format_version {version!r}; this code reads version {FOLDER_VERSION}")
    for key in ("config", "category_ids", "class_names"):
        if key not in description:
            raise InputError(f"{path}: key '{key}' is missing")
    return description


def load_pretrained_folder(folder: str | os.PathLike, overrides: Sequence[str] = ()) -> LoadedCheckpoint:
    """Read a folder written by `save_pretrained` as a ready (eval-mode) model.

    Args:
        overrides: dotted `key=value` applied to the stored config before building (as
            `load_checkpoint`'s).
    Raises:
        InputNotFoundError / InputError: see `read_folder_description`; a missing `model.safetensors`.
        CheckpointError: unreadable weights, or weights that do not fit the stored config.
        ConfigError: an invalid stored config or override.
    """
    folder = Path(folder)
    description = read_folder_description(folder)
    weights = folder / WEIGHTS_NAME
    if not weights.is_file():
        raise InputNotFoundError(f"{weights} not found")
    try:
        state = load_safetensors(weights.read_bytes())
    except (SafetensorError, ValueError) as err:
        raise CheckpointError(f"{weights}: not a readable safetensors file ({err})") from err
    cfg = apply_overrides(description["config"], overrides, f"{folder / CONFIG_NAME} (stored config)")
    category_ids = [int(i) for i in description["category_ids"]]
    class_names = [str(n) for n in description["class_names"]]
    if len(category_ids) != cfg.model.num_classes or len(class_names) != cfg.model.num_classes:
        raise InputError(
            f"{folder / CONFIG_NAME}: {len(category_ids)} category ids and {len(class_names)} class names "
            f"for a model with num_classes={cfg.model.num_classes}"
        )
    return LoadedCheckpoint(build_loaded(cfg, state, str(weights)), cfg, category_ids, class_names)


def _hub() -> Any:
    if huggingface_hub is None:
        raise MissingExtraError("the Hugging Face Hub needs huggingface_hub: pip install huggingface_hub")
    return huggingface_hub


def download_from_hub(repo_id: str, *, revision: str | None = None, cache: str | os.PathLike | None = None
                      ) -> Path:
    """`huggingface_hub.snapshot_download` of a model repository; returns its local folder.

    Raises:
        MissingExtraError: huggingface_hub is not installed.
        InputError: the download failed (no such repository or local folder, no network, no access);
            the message names the reference and huggingface_hub's reason.
    """
    hub = _hub()
    try:
        return Path(hub.snapshot_download(repo_id=repo_id, revision=revision, cache_dir=cache))
    except Exception as err:  # huggingface_hub's HTTP, offline and validation errors
        reason = " ".join(str(err).split()) or type(err).__name__
        raise InputError(
            f"'{repo_id}' is no local folder, and as a Hugging Face Hub repository: {reason}"
        ) from err


def push_to_hub(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    private: bool = False,
    token: str | None = None,
    commit_message: str = "Upload detr_lab model",
) -> str:
    """Upload a folder written by `save_pretrained` to the Hugging Face Hub (creates the repository if
    needed) with `huggingface_hub.HfApi`; returns the commit's address.

    The token: `token`, else the one `huggingface-cli login` stored (or `HF_TOKEN`).
    Raises:
        InputNotFoundError / InputError: not a model folder (checked before anything is sent).
        MissingExtraError: huggingface_hub is not installed.
    """
    read_folder_description(folder)
    api = _hub().HfApi(token=token)
    api.create_repo(repo_id=repo_id, private=private, exist_ok=True, repo_type="model")
    commit = api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type="model",
                               commit_message=commit_message)
    return str(getattr(commit, "commit_url", commit))
