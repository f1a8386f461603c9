"""Inputs named by URI: a corpus, a probe file or a model as a local file or folder.

A local path is used as it is; an http(s) URL is downloaded with retries; an ``s3://`` object is
downloaded, and an ``s3://`` model folder is mirrored and verified against its manifest. Downloads
and mirrors live under ``cache_dir()`` (``KANTAI_CACHE_DIR``) or in a temporary folder.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from kantai_batch import s3
from kantai_batch.errors import InputDataError, JobConfigError, SourceUnavailableError
from kantai_batch.s3 import S3Uri, is_s3

log = logging.getLogger(__name__)

_DOWNLOAD_ATTEMPTS = 3
_DOWNLOAD_TIMEOUT_S = 30


def cache_dir() -> Path:
    """Where local mirrors of remote run dirs and downloaded models live."""
    configured = os.environ.get("KANTAI_CACHE_DIR")
    if configured:
        return Path(configured).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "kantai-batch"


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
    from kantai_batch import manifest

    remote = S3Uri.parse(text)
    folder = cache_dir() / "models" / remote.bucket / remote.key
    committed = manifest.remote_marker(remote)
    if committed is None:
        raise InputDataError(f"model {remote} is missing or incomplete (no {manifest.MARKER} marker)")
    return manifest.mirror(remote, folder, committed)
