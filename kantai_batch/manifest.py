"""The ``_COMPLETE`` manifest: how a folder is committed, trusted, copied and removed, here and in S3.

A folder is trusted only when its marker is there. The marker is a manifest (every file's size and
SHA-256, plus what the writer adds, such as the inputs' fingerprint) and is always written last:
locally the folder is built under a scratch name and renamed into place; in S3 every file is
uploaded first and the marker after them. S3 cannot rename, so a re-commit over a committed folder
uploads the new files beside the old ones (``.next-<id>/``), switches the marker to them in one
write, and only then copies them server-side to their usual keys and points the marker back. So a
writer killed at any moment leaves either the old folder or the new one whole, never something a
reader mistakes for finished work, and a copy is verified against the manifest before it is used.

The transport below (``s3``) only moves bytes; this module owns the order and the checksums.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import secrets
import shutil
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from kantai_batch import s3
from kantai_batch.errors import InputDataError, SourceUnavailableError
from kantai_batch.s3 import S3Uri

log = logging.getLogger(__name__)

MARKER = "_COMPLETE"
# Where a re-commit stages its files below the folder, and the marker key that points readers there.
_NEXT = ".next-"
_UNDER = "under"
# Files of one folder move in parallel: checkpoints are a few large files and many small ones.
_TRANSFER_THREADS = 8


def is_complete(folder: Path) -> bool:
    return (folder / MARKER).is_file()


def remove(folder: Path) -> None:
    """Remove a local folder, its markers first: a removal cut short (a pod killed) leaves a folder
    that is incomplete, never one marked complete with files missing. A link or a file at that path
    goes itself: what a link points at is not ours to touch."""
    if folder.is_symlink() or (folder.exists() and not folder.is_dir()):
        folder.unlink()
        return
    for marker in folder.rglob(MARKER):
        marker.unlink(missing_ok=True)
    shutil.rmtree(folder, ignore_errors=True)


def read_marker(folder: Path) -> dict[str, Any]:
    # Written atomically, so only a hand can have damaged one: what it vouches for is unknown.
    path = folder / MARKER
    redo = f"delete {folder} to redo what wrote it"
    try:
        found = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputDataError(f"{path} is not a manifest ({exc}): {redo}") from None
    if not isinstance(found, dict):
        raise InputDataError(f"{path} is not a manifest (a JSON {type(found).__name__}): {redo}")
    return found


def require_listed(folder: Path, found: dict[str, Any]) -> None:
    """Raise unless each file the manifest ``found`` lists is in ``folder`` at its recorded size: a file deleted
    or cut short by hand otherwise failed whatever read it (a model "cannot be loaded") without saying what to
    redo. Sizes only: checksums would read every byte of a model or the tokens at each phase."""
    for name, entry in (found.get("files") or {}).items():
        path = folder / name
        recorded = entry.get("size") if isinstance(entry, dict) else None
        if not path.is_file():
            state = "is missing"
        elif recorded is not None and (size := path.stat().st_size) != recorded:
            state = f"holds {size:,} bytes, not the {recorded:,} recorded"
        else:
            continue
        raise InputDataError(
            f"{folder}: {name}, listed by its manifest, {state}: delete {folder} to redo what wrote it"
        )


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
    with only_writer(final), committed_locked(final, **marker_extra) as scratch:
        yield scratch


@contextlib.contextmanager
def committed_locked(final: Path, **marker_extra: Any) -> Iterator[Path]:
    """``committed_dir`` for a caller that holds ``only_writer(final)`` already."""
    final.parent.mkdir(parents=True, exist_ok=True)
    # Scratch and retired folders left by a killed earlier attempt are garbage (no live writer holds
    # the lock): a model's or tokens' copy is gigabytes.
    for stale in (*final.parent.glob(f".{final.name}.partial-*"), *final.parent.glob(f".{final.name}.old-*")):
        remove(stale)
    scratch = final.with_name(f".{final.name}.partial-{os.getpid()}")
    scratch.mkdir()
    try:
        yield scratch
        if not is_complete(scratch):
            write_marker(scratch, **marker_extra)
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise
    # A link is replaced by the folder, as a rename replaces it; what it points at stays.
    if final.exists() and not final.is_symlink() and _exchanged(scratch, final):
        remove(scratch)  # the replaced folder, swapped out in one step
        return
    # Where the kernel or filesystem cannot swap: two renames, between which `final` is missing.
    retired = final.with_name(f".{final.name}.old-{os.getpid()}")
    if final.exists():
        final.rename(retired)
    scratch.rename(final)
    remove(retired)


def _exchanged(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux ``renameat2`` with ``RENAME_EXCHANGE``), so a reader, or a pod
    killed meanwhile, finds the old folder or the new one, never neither; False where it cannot."""
    import ctypes

    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # not glibc 2.28+ on Linux
        return False
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


@contextlib.contextmanager
def only_writer(final: Path) -> Iterator[None]:
    """Hold ``final``'s write lock (``.<name>.lock`` beside it, while writing) or fail at once: a second
    writer (the same phase started twice on one run dir) would delete the first one's scratch folder as
    garbage. The kernel drops the lock with its process, so a killed writer leaves none in force."""
    import fcntl
    import socket

    path = final.with_name(f".{final.name}.lock")
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        lock = path.open("a+", encoding="utf-8")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            holder = lock.read().strip() or "another process"
            lock.close()
            raise SourceUnavailableError(
                f"{final} is being written by {holder}: wait for it to finish (or stop it) and run this again"
            ) from None
        try:
            if os.stat(path).st_ino == os.fstat(lock.fileno()).st_ino:
                break
        except FileNotFoundError:
            pass
        lock.close()  # its holder removed the file as we opened it: lock the one there now
    try:
        lock.truncate(0)
        lock.write(f"process {os.getpid()} on {socket.gethostname()}\n")
        lock.flush()
        yield
    finally:
        path.unlink(missing_ok=True)  # before unlocking: whoever opened this file finds it replaced
        lock.close()


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
    uri = prefix.child(MARKER)
    redo = f"delete {prefix} to redo what wrote it"
    try:
        found = s3.read_json_if_exists(uri)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputDataError(f"{uri} is not a manifest ({exc}): {redo}") from None
    if found is not None and not (isinstance(found, dict) and isinstance(found.get("files"), dict)):
        raise InputDataError(f"{uri} is not a manifest (no files listed): {redo}")
    return found


def upload(folder: Path, prefix: S3Uri, still_ours: Callable[[], None] | None = None) -> None:
    """Commit ``folder`` (which holds its marker) below ``prefix``, replacing what is committed there.

    Over nothing committed: stale keys removed, files, marker last. Over a committed folder, which
    stays whole until the new one is: the files go to ``.next-<id>/``, the marker switches to them
    (one PUT, so a reader sees the old folder or the new one), then they are copied server-side to
    their usual keys, the marker points back and ``.next-<id>/`` goes. A writer killed before the
    switch leaves the old folder; after it, the new one (the next commit clears the leftovers).
    ``still_ours`` (the writer's lease check) runs before every write: a writer whose lease went to
    another machine meanwhile (its store out of reach for a term) stops before writing over that one's commit.
    """
    check = still_ours or (lambda: None)
    files = [p.relative_to(folder).as_posix() for p in sorted(folder.rglob("*")) if p.is_file() and p.name != MARKER]
    marker = json.loads((folder / MARKER).read_text(encoding="utf-8"))
    marker.pop(_UNDER, None)
    wanted = set(files)
    if remote_marker(prefix) is None:
        stale = [key for key in s3.list_keys(prefix) if key not in wanted]
        check()
        s3.delete_keys(prefix, stale)
        _upload_files(folder, files, prefix, check)
    else:
        staging = f"{_NEXT}{secrets.token_hex(6)}"
        _upload_files(folder, files, prefix.child(staging), check)
        check()
        s3.put_json(prefix.child(MARKER), {**marker, _UNDER: staging})
        stale = [key for key in s3.list_keys(prefix) if _stale(key, wanted, keep=staging)]
        check()
        s3.delete_keys(prefix, stale)

        def copied(name: str) -> None:
            check()
            s3.copy(prefix.child(f"{staging}/{name}"), prefix.child(name))

        with ThreadPoolExecutor(max_workers=_TRANSFER_THREADS) as pool:
            for future in [pool.submit(copied, name) for name in files]:
                future.result()
    check()
    s3.put_json(prefix.child(MARKER), marker)
    stale = [key for key in s3.list_keys(prefix) if _stale(key, wanted)]
    check()
    s3.delete_keys(prefix, stale)
    log.info("s3: committed %d files to %s", len(files), prefix)


def _upload_files(folder: Path, names: list[str], prefix: S3Uri, check: Callable[[], None]) -> None:
    def uploaded(name: str) -> None:
        check()
        s3.upload_file(folder / name, prefix.child(name))

    with ThreadPoolExecutor(max_workers=_TRANSFER_THREADS) as pool:
        for future in [pool.submit(uploaded, name) for name in names]:
            future.result()


def _stale(key: str, files: set[str], keep: str | None = None) -> bool:
    """Whether ``key`` below a folder being committed with ``files`` is left over (a removed file, an
    earlier staging), sparing the marker and the staging folder ``keep``."""
    if key == MARKER or (keep is not None and key.startswith(f"{keep}/")):
        return False
    return key.startswith(_NEXT) or key not in files


def location(prefix: S3Uri, marker: dict[str, Any], name: str) -> S3Uri:
    """Where file ``name`` of the folder committed below ``prefix`` with ``marker`` lives."""
    under = marker.get(_UNDER)
    return prefix.child(f"{under}/{name}" if under else name)


def download(prefix: S3Uri, dest: Path) -> dict[str, Any]:
    """Download a committed folder into ``dest``, verify it against its manifest, return the manifest."""
    manifest = remote_marker(prefix)
    if manifest is None:
        raise InputDataError(f"{prefix} is missing or incomplete (no {MARKER} marker)")
    dest.mkdir(parents=True, exist_ok=True)
    with ThreadPoolExecutor(max_workers=_TRANSFER_THREADS) as pool:
        futures = [
            pool.submit(s3.download_file, location(prefix, manifest, name), dest / name) for name in manifest["files"]
        ]
        try:
            for future in futures:
                future.result()
        except s3.KeyMissingError:
            if remote_marker(prefix) != manifest:  # the staging it was read from went with a re-commit
                raise SourceUnavailableError(f"{prefix} was committed again while it was downloaded; retry") from None
            raise
    for name, expected in manifest["files"].items():
        if file_sha256(dest / name) != expected["sha256"]:
            if remote_marker(prefix) != manifest:
                # A writer re-committed the folder meanwhile: nothing is damaged, a retry reads the new one.
                raise SourceUnavailableError(f"{prefix} was committed again while it was downloaded; retry")
            raise InputDataError(
                f"{location(prefix, manifest, name)} does not match its checksum in {prefix.child(MARKER)}"
            )
    manifest = {key: value for key, value in manifest.items() if key != _UNDER}
    (dest / MARKER).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return manifest


def mirror(prefix: S3Uri, folder: Path, manifest: dict[str, Any]) -> Path:
    """A verified local copy of a committed remote folder; an identical one already there is kept."""
    if is_complete(folder) and read_marker(folder).get("files") == manifest.get("files"):
        return folder
    remove(folder)
    log.info("s3: downloading %s into %s", prefix, folder)
    with committed_dir(folder) as scratch:
        download(prefix, scratch)
    return folder


def copy(source: S3Uri, dest: S3Uri, marker: dict[str, Any]) -> None:
    """Copy the folder committed below ``source`` with ``marker`` to ``dest`` within the store, marker last."""
    s3.delete_keys(dest, [MARKER])
    with ThreadPoolExecutor(max_workers=_TRANSFER_THREADS) as pool:
        copies = [pool.submit(s3.copy, location(source, marker, name), dest.child(name)) for name in marker["files"]]
        for future in copies:
            future.result()
    s3.put_json(dest.child(MARKER), {key: value for key, value in marker.items() if key != _UNDER})


def delete(prefix: S3Uri) -> None:
    """Remove a committed folder, or a folder of them: markers first, so none is trusted while partial."""
    s3.delete_keys(prefix, [MARKER])
    keys = s3.list_keys(prefix)
    markers = {key for key in keys if key.rsplit("/", 1)[-1] == MARKER}
    s3.delete_keys(prefix, sorted(markers))
    s3.delete_keys(prefix, [key for key in keys if key not in markers])
