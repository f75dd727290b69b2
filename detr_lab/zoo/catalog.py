"""The model zoo's table: the official checkpoints detr_lab converts, one `ZooEntry` each.

    entry = ZOO["dino-4scale-r50"]
    entry.url, entry.filename, entry.sha256_prefix, entry.config, entry.coco_ap

Where each entry comes from: the model tables of the official READMEs (facebookresearch/detr 29901c5,
fundamentalvision/Deformable-DETR 11169a6, IDEA-Research/DINO faa8520, lyuwenyu/RT-DETR 068dfde
(`rtdetr_pytorch`, `rtdetrv2_pytorch`), Peterande/D-FINE 4a1f73a, ShihuaHuang95/DEIM a9aa4ad). `coco_ap`
is the box AP on COCO val2017 that the README publishes for that file (percent); detr_lab has not
re-measured it.

File hashes. None of the six projects publishes a full hash. What each entry checks:
- DETR: the torch hub convention. The file names end in `-<first 8 hex digits of the file's sha256>`
  (`detr-r50-e632da11.pth`) and the official `hubconf.py` loads them with `check_hash=True`;
  `sha256_prefix` holds those digits and a download whose sha256 does not start with them is refused.
- The others: `sha256_prefix` is None. The sha256 is pinned on the first verified download: the file
  is kept only if it converts as an official checkpoint of the entry's family, and then its sha256 is
  written beside it in the cache (`<file>.sha256`); every later use and every later download must
  match it (`download.py`).

Files published only on Google Drive: where the README links one file, `url` is Drive's direct
download address of that file id and `page` the link the README gives; DINO's README links a Drive
folder only, so its entries have no `url` and are read from a local folder (`DETR_LAB_ZOO_MIRROR`, see
`download.py`) where the file has been put by hand under `filename`.

`config` is the YAML in `configs/` with the official training recipe of that model, and
`config_overrides` the `--set` items that make it describe this file when the YAML covers a family
(e.g. DC5). The converted model's own config comes from the weights (`load_official`);
`convert_options` are the `load_official` overrides for what the weights cannot tell.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from detr_lab.errors import InputError

LICENSE = "apache-2.0"  # every one of the six official repositories (their LICENSE files)

_DETR = "https://dl.fbaipublicfiles.com/detr/"
_RTDETR = "https://github.com/lyuwenyu/storage/releases/download/"
_DFINE = "https://github.com/Peterande/storage/releases/download/dfinev1.0/"
_DINO_FOLDER = "https://drive.google.com/drive/folders/1qD5m1NmK0kjE5hh-G17XUX751WsEG-h_?usp=sharing"


@dataclass(frozen=True)
class ZooEntry:
    """One official checkpoint: where it is published, how its file is checked, how it converts.

    Attributes:
        name: the zoo name (`Predictor.from_pretrained(name)`, `tools/infer.py --model name`).
        family: "detr", "deformable_detr", "dino", "rtdetr", "dfine" (the `load_official` family).
        description: the model as its README names it.
        repository: the official GitHub repository (owner/name).
        filename: the file's name in the cache and in a mirror folder.
        url: direct download address (https or file://), or None where only a `page` exists.
        page: the address the official README links (a file or folder page), for a manual download.
        sha256_prefix: the published leading hex digits of the file's sha256, or None (then pinned on
            the first verified download).
        sha256: a full sha256 to require, or None (none is published for any official file).
        config: the YAML under `configs/` with this model's training recipe.
        config_overrides: `--set` items that make `config` describe this model.
        convert_options: `load_official` keyword overrides (what the weights cannot tell).
        coco_ap: published box AP (percent) on COCO val2017, None where none is published.
        license: the SPDX-like license id of the weights' repository.
    """

    name: str
    family: str
    description: str
    repository: str
    filename: str
    url: str | None
    page: str
    sha256_prefix: str | None = None
    sha256: str | None = None
    config: str = ""
    config_overrides: tuple[str, ...] = ()
    convert_options: Mapping[str, Any] = field(default_factory=dict)
    coco_ap: float | None = None
    license: str = LICENSE

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of the entry (tuples as lists)."""
        data = asdict(self)
        data["config_overrides"] = list(self.config_overrides)
        data["convert_options"] = dict(self.convert_options)
        return data


def _drive_file(file_id: str) -> str:
    """Google Drive's direct download address of a shared file id (large files: no virus-scan page)."""
    return f"https://drive.usercontent.google.com/download?id={file_id}&export=download&confirm=t"


def _drive_page(file_id: str) -> str:
    return f"https://drive.google.com/file/d/{file_id}/view"


def _detr(name: str, description: str, filename: str, ap: float, overrides: tuple[str, ...],
          dc5: bool) -> ZooEntry:
    return ZooEntry(
        name, "detr", description, "facebookresearch/detr", filename, _DETR + filename, _DETR + filename,
        sha256_prefix=filename.rsplit("-", 1)[1].split(".")[0], config="configs/detr_r50.yaml",
        config_overrides=overrides, convert_options={"dilation": True} if dc5 else {}, coco_ap=ap,
    )


def _deformable(name: str, description: str, config: str, file_id: str, ap: float,
                dc5: bool = False) -> ZooEntry:
    return ZooEntry(
        name, "deformable_detr", description, "fundamentalvision/Deformable-DETR", f"{name}.pth",
        _drive_file(file_id), _drive_page(file_id), config=config,
        convert_options={"dilation": True} if dc5 else {}, coco_ap=ap,
    )


def _dino(name: str, description: str, filename: str, config: str, ap: float) -> ZooEntry:
    return ZooEntry(name, "dino", description, "IDEA-Research/DINO", filename, None, _DINO_FOLDER,
                    config=config, coco_ap=ap)


def _rtdetr(name: str, description: str, release: str, filename: str, config: str, ap: float) -> ZooEntry:
    url = f"{_RTDETR}{release}/{filename}"
    return ZooEntry(name, "rtdetr", description, "lyuwenyu/RT-DETR", filename, url, url, config=config,
                    coco_ap=ap)


def _dfine(size: str, ap: float) -> ZooEntry:
    filename = f"dfine_{size}_coco.pth"
    return ZooEntry(
        f"dfine-{size}", "dfine", f"D-FINE-{size.upper()} (COCO)", "Peterande/D-FINE", filename,
        _DFINE + filename, _DFINE + filename, config=f"configs/dfine_{size}.yaml", coco_ap=ap,
    )


def _deim(size: str, file_id: str, ap: float) -> ZooEntry:
    return ZooEntry(
        f"deim-dfine-{size}", "dfine", f"DEIM-D-FINE-{size.upper()} (COCO)", "ShihuaHuang95/DEIM",
        f"deim_dfine_hgnetv2_{size}_coco.pth", _drive_file(file_id), _drive_page(file_id),
        config=f"configs/deim_dfine_{size}.yaml", convert_options={"recipe": "deim"}, coco_ap=ap,
    )


_ENTRIES: tuple[ZooEntry, ...] = (
    _detr("detr-r50", "DETR R50, 500 epochs", "detr-r50-e632da11.pth", 42.0, (), False),
    _detr("detr-r50-dc5", "DETR-DC5 R50, 500 epochs", "detr-r50-dc5-f0fb7ef5.pth", 43.3,
          ("model.backbone.dilation=true",), True),
    _detr("detr-r101", "DETR R101, 500 epochs", "detr-r101-2c7b67e5.pth", 43.5,
          ("model.backbone.name=resnet101",), False),
    _detr("detr-r101-dc5", "DETR-DC5 R101, 500 epochs", "detr-r101-dc5-a2e86def.pth", 44.9,
          ("model.backbone.name=resnet101", "model.backbone.dilation=true"), True),
    _deformable("deformable-detr-r50-single-scale", "Deformable DETR R50 (single scale), 50 epochs",
                "configs/deformable_single_scale.yaml", "1WEjQ9_FgfI5sw5OZZ4ix-OKk-IJ_-SDU", 39.4),
    _deformable("deformable-detr-r50-single-scale-dc5", "Deformable DETR R50 (single scale, DC5), 50 epochs",
                "configs/deformable_single_scale_dc5.yaml", "1m_TgMjzH7D44fbA-c_jiBZ-xf-odxGdk", 41.5,
                dc5=True),
    _deformable("deformable-detr-r50", "Deformable DETR R50, 50 epochs", "configs/deformable.yaml",
                "1nDWZWHuRwtwGden77NLM9JoWe-YisJnA", 44.5),
    _deformable("deformable-detr-r50-refine", "Deformable DETR R50 + iterative box refinement, 50 epochs",
                "configs/deformable_refine.yaml", "1JYKyRYzUH7uo9eVfDaVCiaIGZb5YTCuI", 46.2),
    _deformable("deformable-detr-r50-two-stage", "Deformable DETR R50 ++ two-stage, 50 epochs",
                "configs/deformable_refine_two_stage.yaml", "15I03A7hNTpwuLNdfuEmW9_taZMNVssEp", 46.9),
    _dino("dino-4scale-r50", "DINO-4scale R50, 12 epochs", "checkpoint0011_4scale.pth",
          "configs/dino_4scale.yaml", 49.0),
    _dino("dino-5scale-r50", "DINO-5scale R50, 12 epochs", "checkpoint0011_5scale.pth",
          "configs/dino_5scale.yaml", 49.4),
    _rtdetr("rtdetr-r50vd", "RT-DETR R50vd, 72 epochs (from Paddle)", "v0.1",
            "rtdetr_r50vd_6x_coco_from_paddle.pth", "configs/rtdetr_r50vd.yaml", 53.1),
    _rtdetr("rtdetrv2-r18vd", "RT-DETRv2-S (R18vd), 120 epochs", "v0.2",
            "rtdetrv2_r18vd_120e_coco_rerun_48.1.pth", "configs/rtdetrv2_r18vd.yaml", 48.1),
    _rtdetr("rtdetrv2-r34vd", "RT-DETRv2-M* (R34vd), 120 epochs", "v0.1",
            "rtdetrv2_r34vd_120e_coco_ema.pth", "configs/rtdetrv2_r34vd.yaml", 49.9),
    _rtdetr("rtdetrv2-r50vd-m", "RT-DETRv2-M (R50vd-m), 84 epochs", "v0.1",
            "rtdetrv2_r50vd_m_7x_coco_ema.pth", "configs/rtdetrv2_r50vd_m.yaml", 51.9),
    _rtdetr("rtdetrv2-r50vd", "RT-DETRv2-L (R50vd), 72 epochs", "v0.1",
            "rtdetrv2_r50vd_6x_coco_ema.pth", "configs/rtdetrv2_r50vd.yaml", 53.4),
    _rtdetr("rtdetrv2-r101vd", "RT-DETRv2-X (R101vd), 72 epochs (from Paddle)", "v0.1",
            "rtdetrv2_r101vd_6x_coco_from_paddle.pth", "configs/rtdetrv2_r101vd.yaml", 54.3),
    _dfine("n", 42.8),
    _dfine("s", 48.5),
    _dfine("m", 52.3),
    _dfine("l", 54.0),
    _dfine("x", 55.8),
    _deim("n", "1ZPEhiU9nhW4M5jLnYOFwTSLQC1Ugf62e", 43.0),
    _deim("s", "1tB8gVJNrfb6dhFvoHJECKOF5VpkthhfC", 49.0),
    _deim("m", "18Lj2a6UN6k_n_UzqnJyiaiLGpDzQQit8", 52.7),
    _deim("l", "1PIRf02XkrA2xAD3wEiKE2FaamZgSGTAr", 54.7),
    _deim("x", "1dPtbgtGgq1Oa7k_LgH1GXPelg1IVeu0j", 56.5),
)

# name -> entry; `register_entry` adds one (a private mirror, a fine-tuned model).
ZOO: dict[str, ZooEntry] = {entry.name: entry for entry in _ENTRIES}


def register_entry(entry: ZooEntry, *, replace: bool = False) -> ZooEntry:
    """Add `entry` to `ZOO` (e.g. a model of one's own on a local or https address).

    Raises:
        InputError: the name is taken and `replace` is False.
    """
    if entry.name in ZOO and not replace:
        raise InputError(f"zoo entry '{entry.name}' exists; pass replace=True to replace it")
    ZOO[entry.name] = entry
    return entry


def zoo_entry(name: str) -> ZooEntry:
    """The entry called `name`.

    Raises:
        InputError: no such entry; the message lists the names.
    """
    if name not in ZOO:
        raise InputError(f"unknown zoo model '{name}'; known: {', '.join(ZOO)}")
    return ZOO[name]


def zoo_table() -> list[dict[str, Any]]:
    """One row per entry: name, description, published COCO AP, config, file, how its hash is pinned."""
    rows = []
    for entry in ZOO.values():
        if entry.sha256:
            check = f"sha256 {entry.sha256}"
        elif entry.sha256_prefix:
            check = f"sha256 prefix {entry.sha256_prefix}"
        else:
            check = "pinned on first verified download"
        rows.append({"name": entry.name, "model": entry.description, "coco_ap": entry.coco_ap,
                     "config": entry.config, "file": entry.filename, "hash": check})
    return rows
