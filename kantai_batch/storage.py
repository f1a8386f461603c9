"""The run directory, atomic phase commits and fetching inputs by URI.

Each phase writes its folder under a temporary name, writes a ``_COMPLETE`` manifest (file sizes and
checksums) into it last, then renames it into place. Readers trust a folder only when its marker is
there, so a killed phase never leaves something that a later phase mistakes for finished work.

A run dir in S3 (``s3://bucket/prefix``) works through a local mirror: a phase downloads the complete
folders it reads (checked against their manifests), works on local files, and commits its output
locally and then to S3, marker last (see ``s3``). ``KANTAI_CACHE_DIR`` sets where mirrors live.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from kantai_batch import s3
from kantai_batch.errors import InputDataError, JobConfigError, SourceUnavailableError
from kantai_batch.s3 import S3Uri, is_s3

log = logging.getLogger(__name__)

MARKER = "_COMPLETE"
_DOWNLOAD_ATTEMPTS = 3
_DOWNLOAD_TIMEOUT_S = 30


@dataclass(frozen=True)
class RunDir:
    """The folders one run's phases read and write; the same layout for every job.

    ``root`` is where phases read and write files: the run dir itself, or for a remote run dir
    (``remote`` set) its local mirror.
    """

    root: Path
    remote: S3Uri | None = None

    @classmethod
    def from_uri(cls, uri: str) -> RunDir:
        if is_s3(uri):
            remote = S3Uri.parse(uri)
            return cls(cache_dir() / "runs" / remote.bucket / remote.key, remote)
        if "://" in uri:
            raise JobConfigError(f"run dir {uri}: unsupported URI scheme (use a local folder or s3://bucket/prefix)")
        root = Path(uri).expanduser()
        if root.exists() and not root.is_dir():
            raise JobConfigError(f"run dir {uri} is not a folder")
        return cls(root)

    def uri(self, folder: Path) -> str:
        """Where ``folder`` of this run really lives, for messages and lineage."""
        remote = self.remote_of(folder)
        return str(folder) if remote is None else str(remote)

    def remote_of(self, folder: Path) -> S3Uri | None:
        if self.remote is None:
            return None
        relative = folder.relative_to(self.root).as_posix()
        return self.remote if relative == "." else self.remote.child(relative)

    def is_complete(self, folder: Path) -> bool:
        remote = self.remote_of(folder)
        return s3.exists(remote.child(MARKER)) if remote else is_complete(folder)

    def marker(self, folder: Path) -> dict[str, Any] | None:
        """The manifest of a complete folder, or None."""
        remote = self.remote_of(folder)
        if remote:
            return s3.read_json_if_exists(remote.child(MARKER))
        return read_marker(folder) if is_complete(folder) else None

    def require(self, folder: Path, what: str, phase: str) -> Path:
        """A complete local copy of ``folder`` (downloaded from the remote run dir when needed)."""
        remote = self.remote_of(folder)
        if remote is None:
            require_complete(folder, what, phase)
            return folder
        manifest = self.marker(folder)
        if manifest is None:
            raise InputDataError(f"{what} {remote} is missing or incomplete: run `kantai-batch {phase}` first")
        return mirror(remote, folder, manifest)

    def pull_file(self, path: Path) -> None:
        """Refresh a single bookkeeping file (not a committed folder) from the remote run dir."""
        remote = self.remote_of(path)
        if remote is not None and s3.exists(remote):
            s3.download_file(remote, path)

    def push_file(self, path: Path) -> None:
        remote = self.remote_of(path)
        if remote is not None:
            s3.upload_file(path, remote)

    @contextlib.contextmanager
    def committed(self, folder: Path, **marker_extra: Any) -> Iterator[Path]:
        """``committed_dir`` for a phase's output, then committed to the remote run dir too."""
        with committed_dir(folder, **marker_extra) as scratch:
            yield scratch
        remote = self.remote_of(folder)
        if remote:
            s3.upload_folder(folder, remote)

    @property
    def corpus(self) -> Path:
        return self.root / "corpus"

    @property
    def tokenizer(self) -> Path:
        return self.root / "tokenizer"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def model(self) -> Path:
        return self.root / "model"

    @property
    def eval(self) -> Path:
        return self.root / "eval"


def cache_dir() -> Path:
    """Where local mirrors of remote run dirs and downloaded models live."""
    configured = os.environ.get("KANTAI_CACHE_DIR")
    if configured:
        return Path(configured).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "kantai-batch"


def is_complete(folder: Path) -> bool:
    return (folder / MARKER).is_file()


def require_complete(folder: Path, what: str, phase: str) -> None:
    if not is_complete(folder):
        raise InputDataError(f"{what} {folder} is missing or incomplete: run `kantai-batch {phase}` first")


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


def is_url(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


@contextlib.contextmanager
def fetched(uri: str, what: str) -> Iterator[Path]:
    """A local file holding ``uri``: the file itself, or a download that is removed afterwards."""
    if is_url(uri):
        with tempfile.TemporaryDirectory(prefix="kantai-fetch-") as tmp:
            try:
                local = _download(uri, Path(tmp) / "download", what)
            except SourceUnavailableError as exc:
                raise SourceUnavailableError(
                    f"{exc}; download it yourself and pass the file with --{what} PATH (make demo {what.upper()}=PATH)"
                ) from None
            yield local
        return
    if is_s3(uri):
        with tempfile.TemporaryDirectory(prefix="kantai-fetch-") as tmp:
            remote = S3Uri.parse(uri)
            yield s3.download_file(remote, Path(tmp) / (Path(remote.key).name or "download"))
        return
    if "://" in uri:
        raise JobConfigError(f"{what} {uri}: unsupported URI scheme (use a local path, an http(s) or s3:// URI)")
    path = Path(uri).expanduser()
    if not path.exists():
        raise SourceUnavailableError(f"{what} {uri} does not exist")
    if not path.is_file():
        raise SourceUnavailableError(f"{what} {uri} is not a file")
    yield path


def _download(url: str, dest: Path, what: str) -> Path:
    from tqdm.auto import tqdm

    request = urllib.request.Request(url, headers={"User-Agent": "kantai-batch"})
    for attempt in range(1, _DOWNLOAD_ATTEMPTS + 1):
        try:
            with urllib.request.urlopen(request, timeout=_DOWNLOAD_TIMEOUT_S) as response, dest.open("wb") as out:
                total = int(response.headers.get("Content-Length") or 0) or None
                with tqdm(total=total, unit="B", unit_scale=True, desc=f"download {what}", leave=False) as bar:
                    for chunk in iter(lambda: response.read(1 << 16), b""):
                        out.write(chunk)
                        bar.update(len(chunk))
            return dest
        except urllib.error.HTTPError as exc:
            # 4xx will not change on a retry; 5xx might.
            if exc.code < 500 or attempt == _DOWNLOAD_ATTEMPTS:
                raise SourceUnavailableError(f"{what} {url}: download failed: HTTP {exc.code} {exc.reason}") from None
        except (urllib.error.URLError, OSError) as exc:
            if attempt == _DOWNLOAD_ATTEMPTS:
                reason = getattr(exc, "reason", exc)
                raise SourceUnavailableError(f"{what} {url}: download failed: {reason}") from None
        log.warning("download of %s failed (attempt %d of %d), retrying", url, attempt, _DOWNLOAD_ATTEMPTS)
        time.sleep(2 ** (attempt - 1))
    raise AssertionError("unreachable")


def local_model(uri: str | Path) -> Path:
    """A local folder holding the model at ``uri``: the folder itself, or a verified copy of an S3 one."""
    text = str(uri)
    if not is_s3(text):
        return Path(text).expanduser()
    remote = S3Uri.parse(text)
    folder = cache_dir() / "models" / remote.bucket / remote.key
    manifest = s3.read_json_if_exists(remote.child(MARKER))
    if manifest is None:
        raise InputDataError(f"model {remote} is missing or incomplete (no {MARKER} marker)")
    return mirror(remote, folder, manifest)


def mirror(remote: S3Uri, folder: Path, manifest: dict[str, Any]) -> Path:
    """A verified local copy of a committed remote folder; an identical one already there is kept."""
    if is_complete(folder) and read_marker(folder).get("files") == manifest.get("files"):
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    with committed_dir(folder) as scratch:
        s3.download_folder(remote, scratch)
    return folder
