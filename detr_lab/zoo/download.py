"""Fetching zoo files into the cache: one download, a hash check, no half files.

    path = fetch_file(ZOO["detr-r50"])            # <cache>/zoo/detr-r50-e632da11.pth, verified
    cache_dir()                                    # $DETR_LAB_CACHE_DIR, else $XDG_CACHE_HOME/detr_lab

The cache: `$DETR_LAB_CACHE_DIR` (else `$XDG_CACHE_HOME/detr_lab`, else `~/.cache/detr_lab`), files
under `zoo/` by their entry's `filename`. A file is streamed into a temporary file beside its
destination (`detr_lab.files.atomic_write`) and renamed into place only after its sha256 has been
checked, so an interrupted or refused download leaves nothing under the file's name (the temporary
file of a download killed outright is removed by the next fetch of that file, once an hour old).

Where a file comes from, first found: the cache; `$DETR_LAB_ZOO_MIRROR` (or the `mirror` argument), a
local folder holding the file under its `filename` or a base address (`file://`, `https://`) it is
appended to; else the entry's `url`.

The check: a published `sha256` or `sha256_prefix` must match. Without one, the sha256 pinned in
`<file>.sha256` (written by `pin_file` after the first verified conversion) must match; an unpinned
file is accepted once, and the caller (`pretrained.load_zoo_checkpoint`) pins it after it converts, or
deletes it.
"""

from __future__ import annotations

import hashlib
import os
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path

from detr_lab.errors import DetrLabError, InputNotFoundError
from detr_lab.files import atomic_write, atomic_write_text
from detr_lab.zoo.catalog import ZooEntry

CACHE_ENV = "DETR_LAB_CACHE_DIR"
MIRROR_ENV = "DETR_LAB_ZOO_MIRROR"
PIN_SUFFIX = ".sha256"
CHUNK_BYTES = 1 << 20
PROGRESS_SECONDS = 2.0
TIMEOUT_SECONDS = 60.0
STALE_SECONDS = 3600.0  # a temporary file untouched this long belongs to a killed download


class DownloadError(DetrLabError):
    """A zoo file could not be fetched (no address, network or server error, a web page instead of the
    file); the message names the entry, the address and what to do."""


class HashMismatchError(DetrLabError):
    """A fetched or cached zoo file's sha256 differs from the published or pinned one; the file is not
    kept. The message names the file and both hashes."""


def cache_dir() -> Path:
    """The cache root: `$DETR_LAB_CACHE_DIR`, else `$XDG_CACHE_HOME/detr_lab`, else `~/.cache/detr_lab`."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "detr_lab"


def zoo_dir(root: str | os.PathLike | None = None) -> Path:
    """The folder of zoo files: `<root or cache_dir()>/zoo`."""
    return Path(root if root is not None else cache_dir()) / "zoo"


def file_sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for chunk in iter(lambda: file.read(CHUNK_BYTES), b""):
            digest.update(chunk)
    return digest.hexdigest()


def pinned_sha256(path: Path) -> str | None:
    """The sha256 pinned beside `path` (`<path>.sha256`), or None."""
    pin = path.with_name(path.name + PIN_SUFFIX)
    return pin.read_text().split()[0] if pin.is_file() and pin.read_text().strip() else None


def pin_file(path: Path, sha256: str) -> Path:
    """Record `sha256` as the file's pinned hash (`<path>.sha256`, written atomically)."""
    return atomic_write_text(path.with_name(path.name + PIN_SUFFIX), f"{sha256}  {path.name}\n")


def hash_problem(entry: ZooEntry, sha256: str, pinned: str | None) -> str | None:
    """Why `sha256` is not the entry's file (published hash, prefix or pin), or None when it fits."""
    if entry.sha256 and sha256 != entry.sha256.lower():
        return f"sha256 {sha256} is not the published {entry.sha256}"
    if entry.sha256_prefix and not sha256.startswith(entry.sha256_prefix.lower()):
        return f"sha256 {sha256} does not start with the published {entry.sha256_prefix}"
    if pinned and sha256 != pinned:
        return f"sha256 {sha256} is not the one pinned on its first download, {pinned}"
    return None


def source_address(entry: ZooEntry, mirror: str | os.PathLike | None = None) -> str:
    """Where `entry`'s file is fetched from: the mirror (argument, else `$DETR_LAB_ZOO_MIRROR`) joined
    with its filename, else its `url`.

    Raises:
        DownloadError: no mirror and no `url` (a file published on a page only); the message says
            where to get it and where to put it.
    """
    mirror = mirror if mirror is not None else os.environ.get(MIRROR_ENV) or None
    if mirror is not None:
        text = str(mirror)
        if "://" in text:
            return text.rstrip("/") + "/" + urllib.parse.quote(entry.filename)
        return Path(text).expanduser().resolve().joinpath(entry.filename).as_uri()
    if entry.url is None:
        raise DownloadError(
            f"zoo model '{entry.name}': {entry.filename} has no direct address; download it from "
            f"{entry.page} into a folder and set {MIRROR_ENV} to that folder (or put it in {zoo_dir()})"
        )
    return entry.url


def _report(name: str) -> Callable[[int, int | None], None]:
    """A progress printer (stderr, at most every `PROGRESS_SECONDS`) for `download`."""
    last = [time.monotonic()]

    def report(done: int, total: int | None) -> None:
        now = time.monotonic()
        if now - last[0] < PROGRESS_SECONDS and (total is None or done < total):
            return
        last[0] = now
        size = f" / {total / 1e6:.0f} MB" if total else " MB"
        print(f"{name}: {done / 1e6:.0f}{size}", file=sys.stderr, flush=True)

    return report


def download(
    address: str,
    destination: Path,
    check: Callable[[str], str | None],
    *,
    progress: Callable[[int, int | None], None] | None = None,
) -> str:
    """Stream `address` (https or file://) to `destination`; returns its sha256.

    The bytes go to a temporary file in the destination folder, which is renamed to `destination`
    only when `check(sha256)` returns None; on a refusal, an error or an interrupt it is removed.
    Raises:
        DownloadError: the address cannot be opened or read, or it serves a web page.
        HashMismatchError: `check` returned a reason (the message names the address and gives it).
        FileWriteError: the cache cannot be written.
    """
    try:
        response = urllib.request.urlopen(address, timeout=TIMEOUT_SECONDS)
    except (OSError, ValueError) as err:  # URLError, HTTPError, a bad address
        reason = getattr(err, "reason", None) or err
        raise DownloadError(f"cannot download {address}: {reason}") from err
    with response:
        kind = response.headers.get("Content-Type", "") if response.headers else ""
        if kind.startswith("text/html"):
            raise DownloadError(
                f"{address} served a web page, not the file (a sign-in or quota page); download the file "
                f"by hand and set {MIRROR_ENV} to its folder"
            )
        length = response.headers.get("Content-Length") if response.headers else None
        total = int(length) if length and length.isdigit() else None
        digest, done = hashlib.sha256(), 0
        with atomic_write(destination, "wb") as file:
            while True:
                try:
                    chunk = response.read(CHUNK_BYTES)
                except OSError as err:  # connection reset, timeout
                    raise DownloadError(f"download of {address} broke off after {done} bytes: {err}") from err
                if not chunk:
                    break
                file.write(chunk)
                digest.update(chunk)
                done += len(chunk)
                if progress is not None:
                    progress(done, total)
            if total is not None and done != total:
                raise DownloadError(f"download of {address} broke off: {done} of {total} bytes")
            sha256 = digest.hexdigest()
            problem = check(sha256)
            if problem is not None:
                raise HashMismatchError(f"{address}: {problem}; the file was not kept")
    return sha256


def remove_stale_temporaries(path: Path, now: float | None = None) -> list[Path]:
    """Delete the temporary files of downloads of `path` that were killed (SIGKILL, power loss) and
    left `.<name>.<random>.tmp` untouched for `STALE_SECONDS`; returns them. A running download
    writes its temporary file continuously, so it is never that old."""
    now = time.time() if now is None else now
    removed = []
    if path.parent.is_dir():
        for temporary in path.parent.glob(f".{path.name}.*.tmp"):
            if now - temporary.stat().st_mtime > STALE_SECONDS:
                temporary.unlink(missing_ok=True)
                removed.append(temporary)
    return removed


def fetch_file(
    entry: ZooEntry,
    *,
    cache: str | os.PathLike | None = None,
    mirror: str | os.PathLike | None = None,
    quiet: bool = False,
) -> tuple[Path, str, bool]:
    """The entry's file in the cache, downloaded first if needed, its hash checked.

    Args:
        cache: the cache root (default `cache_dir()`); the file is `<cache>/zoo/<filename>`.
        mirror: a folder or base address to fetch from instead of the entry's `url`.
        quiet: no progress lines on stderr.
    Returns:
        (path, sha256, pinned): `pinned` is False for a file without a published hash or pin yet (the
        caller pins it with `pin_file` once it converts, or deletes it).
    Raises:
        DownloadError / HashMismatchError / FileWriteError: see `download`. A cached file whose hash no
        longer fits is removed and fetched again.
        InputNotFoundError: a mirror folder without the file.
    """
    path = zoo_dir(cache) / entry.filename
    remove_stale_temporaries(path)
    pinned = pinned_sha256(path)
    if path.is_file():
        sha256 = file_sha256(path)
        if hash_problem(entry, sha256, pinned) is None:
            return path, sha256, bool(pinned or entry.sha256 or entry.sha256_prefix)
        path.unlink()  # corrupted or replaced in the cache: fetch it again
    address = source_address(entry, mirror)
    if address.startswith("file:"):
        local = Path(urllib.request.url2pathname(urllib.parse.urlparse(address).path))
        if not local.is_file():
            raise InputNotFoundError(f"zoo model '{entry.name}': {local} not found")
    if not quiet:
        print(f"{entry.name}: downloading {address} to {path}", file=sys.stderr, flush=True)
    sha256 = download(address, path, lambda digest: hash_problem(entry, digest, pinned),
                      progress=None if quiet else _report(entry.name))
    return path, sha256, bool(pinned or entry.sha256 or entry.sha256_prefix)
