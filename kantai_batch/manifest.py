"""The ``_COMPLETE`` manifest: how a folder is committed, trusted, copied and removed, here and in S3.

A folder is trusted only when its marker is there. The marker is a manifest (every file's size and
SHA-256, plus what the writer adds, such as the inputs' fingerprint) and is always written last:
locally the folder is built under a scratch name and renamed into place; in S3 every file is
uploaded first and the marker after them, and a re-commit deletes the old marker before touching
anything. So a writer killed at any moment leaves nothing a reader mistakes for finished work, and a
copy is verified against the manifest before it is used.

The transport below (``s3``) only moves bytes; this module owns the order and the checksums.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from kantai_batch import s3
from kantai_batch.errors import InputDataError
from kantai_batch.s3 import S3Uri

log = logging.getLogger(__name__)

MARKER = "_COMPLETE"
# Files of one folder move in parallel: checkpoints are a few large files and many small ones.
_TRANSFER_THREADS = 8


def is_complete(folder: Path) -> bool:
    return (folder / MARKER).is_file()


def read_marker(folder: Path) -> dict[str, Any]:
    return json.loads((folder / MARKER).read_text(encoding="utf-8"))


def write_marker(folder: Path, **extra: Any) -> None:
    """Record every file in ``folder`` with its size and checksum; written last, atomically."""
    files = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MARKER):
        files[path.relative_to(folder).as_posix()] = {"size": path.stat().st_size, "sha256": file_sha256(path)}
    manifest = {"completed_at": datetime.now(timezone.utc).isoformat(timespec="seconds"), "files": files, **extra}
    write_json_atomic(folder / MARKER, manifest)


@contextlib.contextmanager
def committed_dir(final: Path, **marker_extra: Any) -> Iterator[Path]:
    """Yield a scratch folder that replaces ``final`` (marker included) only if the block succeeds."""
    final.parent.mkdir(parents=True, exist_ok=True)
    # One writer per folder: scratch folders left by a killed earlier attempt are garbage.
    for stale in final.parent.glob(f".{final.name}.partial-*"):
        shutil.rmtree(stale, ignore_errors=True)
    scratch = final.with_name(f".{final.name}.partial-{os.getpid()}")
    scratch.mkdir()
    try:
        yield scratch
        if not is_complete(scratch):
            write_marker(scratch, **marker_extra)
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise
    retired = final.with_name(f".{final.name}.old-{os.getpid()}")
    if final.exists():
        final.rename(retired)
    scratch.rename(final)
    shutil.rmtree(retired, ignore_errors=True)


def write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def remote_marker(prefix: S3Uri) -> dict[str, Any] | None:
    """The manifest of a folder committed below ``prefix``, or None while it is missing or incomplete."""
    return s3.read_json_if_exists(prefix.child(MARKER))


def upload(folder: Path, prefix: S3Uri) -> None:
    """Commit ``folder`` (which holds its marker) below ``prefix``: stale keys removed, files, marker last."""
    files = [p for p in sorted(folder.rglob("*")) if p.is_file() and p.name != MARKER]
    # A marker left from an earlier commit must go first: from here until the new one lands the
    # folder is incomplete, and readers must see it so.
    s3.delete_keys(prefix, [MARKER])
    wanted = {p.relative_to(folder).as_posix() for p in files}
    s3.delete_keys(prefix, [key for key in s3.list_keys(prefix) if key not in wanted and key != MARKER])
    with ThreadPoolExecutor(max_workers=_TRANSFER_THREADS) as pool:
        for future in [pool.submit(s3.upload_file, p, prefix.child(p.relative_to(folder).as_posix())) for p in files]:
            future.result()
    s3.upload_file(folder / MARKER, prefix.child(MARKER))
    log.info("s3: committed %d files to %s", len(files), prefix)


def download(prefix: S3Uri, dest: Path) -> dict[str, Any]:
    """Download a committed folder into ``dest``, verify it against its manifest, return the manifest."""
    manifest = remote_marker(prefix)
    if manifest is None:
        raise InputDataError(f"{prefix} is missing or incomplete (no {MARKER} marker)")
    dest.mkdir(parents=True, exist_ok=True)
    with ThreadPoolExecutor(max_workers=_TRANSFER_THREADS) as pool:
        futures = [pool.submit(s3.download_file, prefix.child(name), dest / name) for name in manifest["files"]]
        for future in futures:
            future.result()
    for name, expected in manifest["files"].items():
        if file_sha256(dest / name) != expected["sha256"]:
            raise InputDataError(f"{prefix.child(name)} does not match its checksum in {prefix.child(MARKER)}")
    (dest / MARKER).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return manifest


def mirror(prefix: S3Uri, folder: Path, manifest: dict[str, Any]) -> Path:
    """A verified local copy of a committed remote folder; an identical one already there is kept."""
    if is_complete(folder) and read_marker(folder).get("files") == manifest.get("files"):
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    log.info("s3: downloading %s into %s", prefix, folder)
    with committed_dir(folder) as scratch:
        download(prefix, scratch)
    return folder


def delete(prefix: S3Uri) -> None:
    """Remove a committed folder, or a folder of them: markers first, so none is trusted while partial."""
    s3.delete_keys(prefix, [MARKER])
    keys = s3.list_keys(prefix)
    markers = {key for key in keys if key.rsplit("/", 1)[-1] == MARKER}
    s3.delete_keys(prefix, sorted(markers))
    s3.delete_keys(prefix, [key for key in keys if key not in markers])
