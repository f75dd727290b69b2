"""The model zoo: its table, cached downloads from local `file://` addresses and mirror folders, hash
checks that keep no bad or half file, pinning on the first verified download. Offline: every file is
a tiny official DETR checkpoint written to a temporary folder."""

from __future__ import annotations

import hashlib
import io
import os
import time
import urllib.request
from pathlib import Path

import pytest
import torch

from detr_lab.checkpoints import CheckpointError
from detr_lab.predict import Predictor
from detr_lab.zoo import (
    ZOO,
    DownloadError,
    HashMismatchError,
    ZooEntry,
    fetch_file,
    load_pretrained,
    load_zoo_checkpoint,
    zoo_table,
)
from detr_lab.zoo import download as download_module

from factories import official_detr_spec, quick_official_state

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def official_file(tmp_path_factory) -> Path:
    """A tiny official DETR checkpoint (ResNet-18, width 32, 5 classes) as the official files hold it."""
    path = tmp_path_factory.mktemp("published") / "tiny-detr.pth"
    torch.save({"model": quick_official_state(official_detr_spec(classes=5))}, path)
    return path


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def entry_for(path: Path, **changes) -> ZooEntry:
    fields = dict(name="tiny-detr", family="detr", description="tiny", repository="local/tiny",
                  filename="tiny-detr.pth", url=path.as_uri(), page=path.as_uri())
    fields.update(changes)
    return ZooEntry(**fields)


def cache_files(cache: Path) -> list[str]:
    folder = cache / "zoo"
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


# ------------------------------------------------------------------------------------- the table
def test_every_entry_has_a_config_an_ap_and_a_source():
    families = {entry.family for entry in ZOO.values()}
    assert families == {"detr", "deformable_detr", "dino", "rtdetr", "dfine"}
    for entry in ZOO.values():
        assert (REPO / entry.config).is_file(), entry.name
        assert entry.coco_ap is not None and 30 < entry.coco_ap < 60, entry.name
        assert entry.url or entry.page, entry.name
        assert entry.sha256 is None  # no official repository publishes a full hash
    # the published numbers of a few (the official READMEs)
    assert ZOO["detr-r50"].coco_ap == 42.0 and ZOO["dino-4scale-r50"].coco_ap == 49.0
    assert ZOO["rtdetrv2-r18vd"].coco_ap == 48.1 and ZOO["deim-dfine-n"].coco_ap == 43.0
    # DETR: the torch hub hash prefix of the file name
    assert ZOO["detr-r50"].sha256_prefix == "e632da11"
    assert ZOO["detr-r101-dc5"].sha256_prefix == "a2e86def"
    assert ZOO["deim-dfine-s"].convert_options == {"recipe": "deim"}
    rows = {row["name"]: row for row in zoo_table()}
    assert rows["dfine-n"]["hash"] == "pinned on first verified download"
    assert rows["detr-r50"]["hash"] == "sha256 prefix e632da11"


def test_the_readme_table_lists_every_entry_with_its_ap():
    text = (REPO / "README.md").read_text()
    section = text[text.index("## Model zoo"):text.index("### Hub-style model folders")]
    for entry in ZOO.values():
        assert f"| `{entry.name}` | {entry.description} | {entry.coco_ap} |" in section, entry.name


def test_an_entry_without_an_address_says_where_to_get_it(tmp_path, monkeypatch):
    monkeypatch.delenv(download_module.MIRROR_ENV, raising=False)
    with pytest.raises(DownloadError, match=r"checkpoint0011_4scale\.pth has no direct address.*drive\."):
        fetch_file(ZOO["dino-4scale-r50"], cache=tmp_path)


# -------------------------------------------------------------------------------- downloads
def test_download_once_then_from_the_cache_and_pinned(tmp_path, official_file, monkeypatch):
    entry = entry_for(official_file)
    opened = []
    real_urlopen = urllib.request.urlopen
    monkeypatch.setattr(download_module.urllib.request, "urlopen",
                        lambda url, **kw: opened.append(url) or real_urlopen(url, **kw))
    first = load_zoo_checkpoint(entry, cache=tmp_path, quiet=True)
    assert opened == [official_file.as_uri()]
    assert cache_files(tmp_path) == ["tiny-detr.pth", "tiny-detr.pth.sha256"]
    pin = (tmp_path / "zoo" / "tiny-detr.pth.sha256").read_text().split()[0]
    assert pin == sha256_of(official_file)
    assert first.config.model.num_classes == 5 and first.config.model.backbone.name == "resnet18"
    assert first.category_ids == [0, 1, 2, 3, 4]

    again = load_zoo_checkpoint(entry, cache=tmp_path, quiet=True)
    assert opened == [official_file.as_uri()]  # not downloaded twice
    state = torch.load(official_file, weights_only=True)["model"]
    torch.testing.assert_close(again.model.class_embed.weight, state["class_embed.weight"])


def test_a_published_prefix_that_does_not_match_keeps_nothing(tmp_path, official_file):
    wrong = "0" * 8 if not sha256_of(official_file).startswith("0" * 8) else "f" * 8
    entry = entry_for(official_file, sha256_prefix=wrong)
    with pytest.raises(HashMismatchError, match=f"does not start with the published {wrong}.*not kept"):
        fetch_file(entry, cache=tmp_path, quiet=True)
    assert cache_files(tmp_path) == []
    right = entry_for(official_file, sha256_prefix=sha256_of(official_file)[:8])
    path, _, pinned = fetch_file(right, cache=tmp_path, quiet=True)
    assert path.is_file() and pinned


def test_a_changed_file_no_longer_matches_its_pin(tmp_path, official_file):
    entry = entry_for(official_file)
    load_zoo_checkpoint(entry, cache=tmp_path, quiet=True)
    changed = tmp_path / "changed" / "tiny-detr.pth"
    changed.parent.mkdir()
    changed.write_bytes(official_file.read_bytes() + b"\0")
    cached = tmp_path / "zoo" / "tiny-detr.pth"
    cached.write_bytes(b"corrupted")  # a damaged cache file is fetched again...
    with pytest.raises(HashMismatchError, match="pinned on its first download"):
        fetch_file(entry_for(changed), cache=tmp_path, quiet=True)  # ...and a different file is refused
    assert cache_files(tmp_path) == ["tiny-detr.pth.sha256"]
    path, sha256, pinned = fetch_file(entry, cache=tmp_path, quiet=True)
    assert sha256 == sha256_of(official_file) and pinned and path.read_bytes() == official_file.read_bytes()


def test_a_file_that_does_not_convert_is_not_kept_nor_pinned(tmp_path):
    bogus = tmp_path / "published" / "tiny-detr.pth"
    bogus.parent.mkdir()
    torch.save({"model": {"some.weight": torch.zeros(2)}}, bogus)
    with pytest.raises(CheckpointError, match="zoo model 'tiny-detr'"):
        load_zoo_checkpoint(entry_for(bogus), cache=tmp_path / "cache", quiet=True)
    assert cache_files(tmp_path / "cache") == []


def test_an_interrupted_download_leaves_no_half_file(tmp_path, official_file, monkeypatch):
    class Broken(io.BytesIO):
        headers = {"Content-Length": str(official_file.stat().st_size)}

        def read(self, size=-1):
            if self.tell() > 0:
                raise ConnectionResetError("connection reset by peer")
            return super().read(1000)

    monkeypatch.setattr(download_module.urllib.request, "urlopen", lambda url, **kw: Broken(b"x" * 5000))
    with pytest.raises(DownloadError, match="broke off after 1000 bytes"):
        fetch_file(entry_for(official_file, url="https://example.invalid/tiny-detr.pth"), cache=tmp_path,
                   quiet=True)
    assert cache_files(tmp_path) == []  # neither the file nor its temporary copy

    class Short(io.BytesIO):
        headers = {"Content-Length": "99999"}

    monkeypatch.setattr(download_module.urllib.request, "urlopen", lambda url, **kw: Short(b"x" * 10))
    with pytest.raises(DownloadError, match="10 of 99999 bytes"):
        fetch_file(entry_for(official_file, url="https://example.invalid/tiny-detr.pth"), cache=tmp_path,
                   quiet=True)
    assert cache_files(tmp_path) == []

    def interrupted(url, **kw):
        class Stop(io.BytesIO):
            headers = {}

            def read(self, size=-1):
                raise KeyboardInterrupt

        return Stop()

    monkeypatch.setattr(download_module.urllib.request, "urlopen", interrupted)
    with pytest.raises(KeyboardInterrupt):
        fetch_file(entry_for(official_file, url="https://example.invalid/x.pth"), cache=tmp_path, quiet=True)
    assert cache_files(tmp_path) == []


def test_a_killed_download_s_temporary_file_is_removed_by_the_next_fetch(tmp_path, official_file):
    folder = tmp_path / "zoo"
    folder.mkdir()
    old, fresh = folder / ".tiny-detr.pth.abc123.tmp", folder / ".tiny-detr.pth.def456.tmp"
    old.write_bytes(b"half")
    fresh.write_bytes(b"running")
    os.utime(old, (time.time() - 7200, time.time() - 7200))
    fetch_file(entry_for(official_file), cache=tmp_path, quiet=True)
    assert cache_files(tmp_path) == [".tiny-detr.pth.def456.tmp", "tiny-detr.pth"]  # a running one stays


def test_a_web_page_instead_of_the_file_is_refused(tmp_path, official_file, monkeypatch):
    class Page(io.BytesIO):
        headers = {"Content-Type": "text/html; charset=utf-8"}

    monkeypatch.setattr(download_module.urllib.request, "urlopen", lambda url, **kw: Page(b"<html>"))
    with pytest.raises(DownloadError, match="served a web page"):
        fetch_file(entry_for(official_file, url="https://example.invalid/x"), cache=tmp_path, quiet=True)
    assert cache_files(tmp_path) == []


def test_a_missing_or_bad_address_is_one_clear_error(tmp_path, official_file):
    with pytest.raises(FileNotFoundError, match="zoo model 'tiny-detr': /nowhere/at/all.pth not found"):
        fetch_file(entry_for(official_file, url="file:///nowhere/at/all.pth"), cache=tmp_path, quiet=True)
    with pytest.raises(DownloadError, match="cannot download nonsense:tiny-detr.pth: unknown url type"):
        fetch_file(entry_for(official_file, url="nonsense:tiny-detr.pth"), cache=tmp_path, quiet=True)
    assert cache_files(tmp_path) == []


def test_mirror_folder_and_cache_variable(tmp_path, official_file, monkeypatch):
    """A file published on a page only (no url) is read from a mirror folder; the cache follows
    DETR_LAB_CACHE_DIR; `load_pretrained` and `Predictor.from_pretrained` take the zoo name."""
    entry = entry_for(official_file, name="tiny-page-only", url=None)
    monkeypatch.setitem(ZOO, entry.name, entry)
    monkeypatch.setenv(download_module.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setenv(download_module.MIRROR_ENV, str(official_file.parent))
    loaded, origin = load_pretrained("tiny-page-only", quiet=True)
    assert origin["zoo"] == "tiny-page-only" and loaded.config.model.num_classes == 5
    assert cache_files(tmp_path / "cache") == ["tiny-detr.pth", "tiny-detr.pth.sha256"]

    monkeypatch.setenv(download_module.MIRROR_ENV, str(tmp_path / "empty"))
    predictor = Predictor.from_pretrained("tiny-page-only", optimize=False)  # from the cache now
    assert predictor.origin["url"] is None and predictor.origin["repository"] == "local/tiny"
    (tmp_path / "cache" / "zoo" / "tiny-detr.pth").unlink()
    with pytest.raises(FileNotFoundError, match="empty/tiny-detr.pth not found"):
        Predictor.from_pretrained("tiny-page-only")


def test_unknown_references_list_the_zoo():
    with pytest.raises(ValueError, match="zoo names: detr-r50, detr-r50-dc5"):
        load_pretrained("no-such-model")
