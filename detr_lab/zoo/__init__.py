"""The model zoo and Hub-style model folders.

    from detr_lab.zoo import ZOO, load_pretrained, save_pretrained, push_to_hub
    ZOO["dino-4scale-r50"].coco_ap                       # 49.0, as published
    loaded, origin = load_pretrained("dino-4scale-r50")   # cached download, hash check, conversion
    save_pretrained("my-detector", loaded, evaluation={"AP": 0.49})
    loaded, origin = load_pretrained("my-detector")       # the folder back
    push_to_hub("my-detector", "me/my-detector")          # huggingface_hub, with a token

Modules:
    catalog.py     `ZooEntry` and `ZOO`: the official checkpoints, their addresses, hashes, configs, APs
    download.py    the cache (`$DETR_LAB_CACHE_DIR`), mirrors, downloads that keep no half or bad file
    folder.py      `save_pretrained` / `load_pretrained_folder` / `push_to_hub`: config.json,
                   model.safetensors, README.md (huggingface_hub's ModelHubMixin file names)
    pretrained.py  `load_pretrained`: a folder, a zoo name or a Hub repository id -> a ready model

May import `errors`, `files`, `io`, `config` and `checkpoints`; `predict` and the tools import it.
"""

from __future__ import annotations

from detr_lab.zoo.catalog import ZOO, ZooEntry, register_entry, zoo_entry, zoo_table
from detr_lab.zoo.download import (
    CACHE_ENV,
    MIRROR_ENV,
    DownloadError,
    HashMismatchError,
    cache_dir,
    fetch_file,
    file_sha256,
)
from detr_lab.zoo.folder import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    is_pretrained_folder,
    load_pretrained_folder,
    push_to_hub,
    save_pretrained,
)
from detr_lab.zoo.pretrained import load_model_reference, load_pretrained, load_zoo_checkpoint

__all__ = [
    "CACHE_ENV",
    "CONFIG_NAME",
    "MIRROR_ENV",
    "WEIGHTS_NAME",
    "ZOO",
    "DownloadError",
    "HashMismatchError",
    "ZooEntry",
    "cache_dir",
    "fetch_file",
    "file_sha256",
    "is_pretrained_folder",
    "load_model_reference",
    "load_pretrained",
    "load_pretrained_folder",
    "load_zoo_checkpoint",
    "push_to_hub",
    "register_entry",
    "save_pretrained",
    "zoo_entry",
    "zoo_table",
]
