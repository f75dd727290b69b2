"""A pretrained model by reference: a zoo name, a Hub-style folder or a Hugging Face Hub repository.

    loaded = load_pretrained("dino-4scale-r50")     # zoo: cached download, hash check, conversion
    loaded = load_pretrained("runs/my-detector")    # a folder written by save_pretrained
    loaded = load_pretrained("me/my-detector")      # a Hub repository (huggingface_hub, network)
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from detr_lab.checkpoints import (
    CheckpointError,
    LoadedCheckpoint,
    apply_overrides,
    build_loaded,
    convert_official,
    load_checkpoint,
    official_categories,
)
from detr_lab.errors import InputError
from detr_lab.zoo.catalog import ZOO, ZooEntry, zoo_entry
from detr_lab.zoo.download import fetch_file, pin_file
from detr_lab.zoo.folder import download_from_hub, is_pretrained_folder, load_pretrained_folder


def load_zoo_checkpoint(
    entry: str | ZooEntry,
    overrides: Sequence[str] = (),
    *,
    cache: str | os.PathLike | None = None,
    mirror: str | os.PathLike | None = None,
    quiet: bool = False,
) -> LoadedCheckpoint:
    """The zoo model `entry` (a name or a `ZooEntry`), converted from its official file.

    The file is fetched once into the cache and its hash checked (`download.fetch_file`), then
    converted by `convert_official` with the entry's `convert_options`. A file without a published or
    pinned hash is pinned after it converts, and deleted from the cache if it does not.
    Args:
        overrides: dotted `model.*` / data overrides applied to the converted config.
        cache, mirror, quiet: see `fetch_file`.
    Raises:
        InputError: an unknown name. DownloadError / HashMismatchError / FileWriteError: see
        `fetch_file`. CheckpointError: a file that is not an official checkpoint of the entry's family.
    """
    entry = zoo_entry(entry) if isinstance(entry, str) else entry
    path, sha256, pinned = fetch_file(entry, cache=cache, mirror=mirror, quiet=quiet)
    try:  # the verification: the file converts as an official checkpoint (every key mapped)
        cfg, state = convert_official(path, **entry.convert_options)
        category_ids, class_names = official_categories(path, cfg.model.num_classes)
    except CheckpointError as err:
        if not pinned:
            path.unlink(missing_ok=True)  # unverified: do not keep a file that is not the model
        raise CheckpointError(f"zoo model '{entry.name}': {err}") from err
    if not pinned:
        pin_file(path, sha256)
    cfg = apply_overrides(cfg, overrides, f"zoo model '{entry.name}' with overrides")
    model = build_loaded(cfg, state, str(path))
    return LoadedCheckpoint(model, cfg, category_ids, class_names)


def looks_like_hub_repo(reference: str) -> bool:
    """True for "owner/name" (one slash, no such local path): a Hugging Face Hub repository id."""
    parts = reference.split("/")
    return len(parts) == 2 and all(parts) and not Path(reference).exists() and not reference.startswith(".")


def load_pretrained(
    reference: str | os.PathLike,
    overrides: Sequence[str] = (),
    *,
    cache: str | os.PathLike | None = None,
    mirror: str | os.PathLike | None = None,
    revision: str | None = None,
    quiet: bool = False,
) -> tuple[LoadedCheckpoint, dict]:
    """A ready model from a Hub-style folder, a zoo name or a Hub repository id, in that order.

    Returns:
        (the loaded model, where it came from: {"folder": ...}, {"zoo": name, "url", "sha256_prefix",
        "coco_ap", ...} or {"hub": repo_id, "folder": ...}).
    Raises:
        InputError: a reference that is none of the three (the message lists the zoo names).
        See `load_pretrained_folder`, `load_zoo_checkpoint` and `download_from_hub` for the rest.
    """
    text = os.fspath(reference)
    if is_pretrained_folder(text):
        return load_pretrained_folder(text, overrides), {"folder": str(Path(text))}
    if text in ZOO:
        entry = ZOO[text]
        loaded = load_zoo_checkpoint(entry, overrides, cache=cache, mirror=mirror, quiet=quiet)
        return loaded, {"zoo": entry.name, **entry.to_dict()}
    if looks_like_hub_repo(text):
        folder = download_from_hub(text, revision=revision)
        return load_pretrained_folder(folder, overrides), {"hub": text, "folder": str(folder)}
    if Path(text).exists():
        raise InputError(f"{text}: not a model folder (no config.json); a checkpoint file loads with "
                         "Predictor.from_checkpoint / --checkpoint")
    raise InputError(f"'{text}' is no model folder, zoo name or Hub repository (owner/name); zoo names: "
                     f"{', '.join(ZOO)}")


def load_model_reference(
    reference: str | os.PathLike, overrides: Sequence[str] = (), *, pretrained: bool = False
) -> LoadedCheckpoint:
    """The model a tool's `--checkpoint` / `--model` names: a checkpoint file (`load_checkpoint`), a
    model folder written by `save_pretrained` (recognised by its config.json, also as a checkpoint),
    or with `pretrained` any reference `load_pretrained` takes (zoo name, model folder, Hub repository).

    Args:
        overrides: dotted `model.*` overrides applied to the stored config.
    Raises:
        See `load_checkpoint` and `load_pretrained`.
    """
    if pretrained or is_pretrained_folder(reference):
        return load_pretrained(reference, overrides)[0]
    return load_checkpoint(reference, overrides=overrides)
