"""Inputs named by URI: a corpus, a probe file or a model as a local file or folder.

A local path is used as it is; an http(s) URL is downloaded with retries; an ``s3://`` object is
downloaded, and an ``s3://`` model folder is mirrored and verified against its manifest. Downloads
and mirrors live under ``cache_dir()`` (``KANTAI_CACHE_DIR``) or in a temporary folder.

A corpus source may name many files: ``expand`` turns a file, folder, glob, ``s3://`` prefix, URL or a
list of these into an ordered list of concrete inputs (folders and prefixes sorted, hidden files
skipped), and ``decompressed`` opens one as a byte stream, decompressing ``.gz``, ``.bz2``, ``.xz`` and
``.zst`` on the fly. Every empty match is a one-line error naming what matched nothing.
"""

from __future__ import annotations

import contextlib
import glob
import http.client
import io
import logging
import os
import re
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from kantai_batch import s3
from kantai_batch.errors import InputDataError, JobConfigError, SourceUnavailableError, first_line
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
        raise InputDataError(f"{what} {uri} is not a file")
    yield path


COMPRESSED = (".gz", ".bz2", ".xz", ".zst")
_GLOB_CHARS = frozenset("*?[")


@dataclass(frozen=True)
class Input:
    """One concrete file of a source: a local path, an http(s) URL or an s3:// object."""

    name: str
    """As the user would write it: the path, URL or s3:// URI; messages and stats.json use it."""

    @property
    def suffix(self) -> str:
        """The format's extension, below any compression one: ``.jsonl`` for ``a.jsonl.gz``."""
        base = self.name.rsplit("/", 1)[-1].lower()
        for ending in COMPRESSED:
            if base.endswith(ending):
                base = base[: -len(ending)]
                break
        return os.path.splitext(base)[1]

    @property
    def compression(self) -> str | None:
        base = self.name.lower()
        return next((ending for ending in COMPRESSED if base.endswith(ending)), None)


def expand(sources: Sequence[str], what: str, suffixes: Sequence[str] = ()) -> list[Input]:
    """The concrete inputs ``sources`` names, in order; a folder or prefix keeps only ``suffixes``.

    An explicitly named file, URL or glob match is taken whatever its name; a folder's or prefix's
    files are filtered (a folder of books may hold a README). Hidden files are skipped everywhere.
    """
    inputs: list[Input] = []
    seen: set[str] = set()
    for uri in sources:
        for item in _expand_one(uri, what, tuple(suffixes)):
            # A file named twice (a folder and a glob inside it) is read once, where it first came.
            # Real paths: a symlink to a file already read is that file again.
            key = item.name if is_url(item.name) or is_s3(item.name) else os.path.realpath(item.name)
            if key in seen:
                log.info("%s %s is named more than once in the source; read once", what, item.name)
                continue
            seen.add(key)
            inputs.append(item)
    return inputs


def _expand_one(uri: str, what: str, suffixes: tuple[str, ...]) -> list[Input]:
    if is_url(uri):
        return [Input(uri)]
    if is_s3(uri):
        return _expand_s3(uri, what, suffixes)
    if "://" in uri:
        raise JobConfigError(f"{what} {uri}: unsupported URI scheme (use a local path, an http(s) or s3:// URI)")
    path = Path(uri).expanduser()
    # A name that exists is itself even when it holds glob characters ("notes [draft].txt").
    if _GLOB_CHARS & set(uri) and not path.exists():
        pattern = str(path)
        matches = sorted(p for p in glob.glob(pattern, recursive=True) if Path(p).is_file())
        if not matches:
            raise SourceUnavailableError(f"{what} {uri}: the pattern matches no file")
        return [Input(match) for match in matches]
    if path.is_dir():
        files = sorted(_visible_files(path), key=lambda p: p.relative_to(path).as_posix())
        if not files:
            raise InputDataError(f"{what} {uri} is a folder with no (visible) file in it")
        return _fitting([Input(str(p)) for p in files], f"{what} {uri}", "folder", suffixes)
    if not path.exists():
        raise SourceUnavailableError(f"{what} {uri} does not exist")
    if not path.is_file():
        raise InputDataError(f"{what} {uri} is not a file")
    return [Input(uri)]


def _expand_s3(uri: str, what: str, suffixes: tuple[str, ...]) -> list[Input]:
    remote = S3Uri.parse(uri)
    if remote.key and not uri.endswith("/") and s3.exists(remote):
        return [Input(uri)]
    keys = sorted(key for key in s3.list_keys(remote) if key and not _hidden(key.split("/")))
    if not keys:
        if uri.endswith("/") or not remote.key:
            raise SourceUnavailableError(f"{what} {uri}: no object under this prefix")
        # As for a single missing key (s3.KeyMissingError): nothing under it as a prefix either.
        raise SourceUnavailableError(f"{uri} does not exist")
    return _fitting([Input(str(remote.child(key))) for key in keys], f"{what} {uri}", "prefix", suffixes)


def _fitting(inputs: list[Input], described: str, kind: str, suffixes: tuple[str, ...]) -> list[Input]:
    if not suffixes:
        return inputs
    kept = [item for item in inputs if item.suffix in suffixes]
    if not kept:
        found = sorted({item.suffix or "(none)" for item in inputs})
        raise InputDataError(
            f"{described}: no file in this {kind} fits the format (it wants {', '.join(suffixes)}; "
            f"found {', '.join(found[:10])})"
        )
    if len(kept) < len(inputs):
        log.info(
            "%s: %d of %d files skipped, their names do not fit the format",
            described,
            len(inputs) - len(kept),
            len(inputs),
        )
    return kept


def _visible_files(folder: Path) -> Iterator[Path]:
    """Every file under ``folder`` not hidden below it, through symlinked folders too (a library of books
    linked in from elsewhere), each real folder once so a link to an ancestor does not loop."""
    walked: set[str] = set()
    for root, folders, names in os.walk(folder, followlinks=True):
        real = os.path.realpath(root)
        if real in walked:
            folders.clear()
            continue
        walked.add(real)
        # In name order, not the file system's: which of two paths to one real folder is walked (and so
        # names its files, and orders the corpus) must not depend on where the tree was copied.
        folders[:] = sorted(name for name in folders if not name.startswith("."))
        for name in names:
            if not name.startswith(".") and os.path.isfile(os.path.join(root, name)):
                yield Path(root, name)


def _hidden(parts: Sequence[str]) -> bool:
    return any(part.startswith(".") for part in parts)


def decompressed(path: Path, name: str) -> BinaryIO:
    """``path`` opened for reading, decompressed by ``name``'s extension; bad data is an InputDataError."""
    compression = Input(name).compression
    if compression is None:
        return path.open("rb")
    opener = _DECOMPRESSORS[compression]
    try:
        raw = opener(path)
    except ImportError:
        raise JobConfigError(f"{name}: reading {compression} files needs the zstandard package") from None
    return io.BufferedReader(_Checked(raw, f"{name}: not a valid {compression} file"), 1 << 20)


def _open_zst(path: Path) -> BinaryIO:
    import zstandard

    return _ZstdFrames(zstandard, path.open("rb"))


# Compressed bytes decompressed at a time: zstandard returns all they hold, and a block of repetitive
# text expands by thousands (1 MiB became gigabytes), so a small piece bounds memory (1 KiB: 32 MiB
# at the format's worst, 128 KiB blocks of one repeated byte); real text costs no time for it.
_ZSTD_INPUT = 1 << 10


class _ZstdFrames:
    """Every frame of a .zst file in turn. zstandard's stream reader takes a file cut short inside a
    frame for its end, and would drop the rest of the text without a word; this raises instead."""

    def __init__(self, zstandard, handle: BinaryIO) -> None:
        self._context = zstandard.ZstdDecompressor()
        self._error = zstandard.ZstdError
        self._handle = handle
        self._frame = None
        self._input = b""
        self._output = bytearray()

    def read(self, size: int) -> bytes:
        while len(self._output) < size and self._decompress_more():
            pass
        data = bytes(self._output[:size])
        del self._output[:size]
        return data

    def _decompress_more(self) -> bool:
        if not self._input:
            self._input = self._handle.read(_ZSTD_INPUT)
            if not self._input:
                if self._frame is not None and not self._frame.eof:
                    raise self._error("the file ends inside a frame")
                return False
        if self._frame is None or self._frame.eof:
            self._frame = self._context.decompressobj()
        self._output += self._frame.decompress(self._input)
        self._input = self._frame.unused_data if self._frame.eof else b""
        return True

    def close(self) -> None:
        self._handle.close()


def _open_gz(path: Path) -> BinaryIO:
    import gzip

    return gzip.open(path, "rb")


def _open_bz2(path: Path) -> BinaryIO:
    import bz2

    return bz2.open(path, "rb")


def _open_xz(path: Path) -> BinaryIO:
    import lzma

    return lzma.open(path, "rb")


_DECOMPRESSORS: dict[str, Callable[[Path], BinaryIO]] = {
    ".gz": _open_gz,
    ".bz2": _open_bz2,
    ".xz": _open_xz,
    ".zst": _open_zst,
}


class _Checked(io.RawIOBase):
    """A decompressing stream whose failures (corrupt or truncated data) become one-line InputDataErrors."""

    def __init__(self, inner: BinaryIO, failure: str) -> None:
        self._inner = inner
        self._failure = failure

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        try:
            data = self._inner.read(len(buffer))
        except Exception as exc:  # noqa: BLE001 - gzip, bz2, lzma and zstandard each raise their own
            raise InputDataError(f"{self._failure} ({first_line(exc)})") from None
        buffer[: len(data)] = data
        return len(data)

    def close(self) -> None:
        self._inner.close()
        super().close()


class _CutOff(OSError):
    """A download that ended before the length its server announced."""


def _download(url: str, dest: Path, what: str) -> Path:
    from tqdm.auto import tqdm

    # A URL without a host, with an unclosed IPv6 bracket, a bad port or a space is the user's to fix: urllib raised
    # a traceback for some, and three retries then exit 4 (a retry may help) for the others.
    try:
        parts = urllib.parse.urlsplit(url)
        host, _ = parts.hostname, parts.port  # .port checks the port's digits and range
        request = urllib.request.Request(url, headers={"User-Agent": "kantai-batch"})
    except ValueError as exc:
        raise JobConfigError(f"{what} {url}: not a valid URL ({first_line(exc)})") from None
    if not host:
        raise JobConfigError(f"{what} {url}: not a valid URL (no host)")
    if re.search(r"[\x00-\x20\x7f]", url):
        raise JobConfigError(f"{what} {url}: not a valid URL (a space or control character; percent-encode it)")
    for attempt in range(1, _DOWNLOAD_ATTEMPTS + 1):
        try:
            with urllib.request.urlopen(request, timeout=_DOWNLOAD_TIMEOUT_S) as response, dest.open("wb") as out:
                total = int(response.headers.get("Content-Length") or 0) or None
                written = 0
                with tqdm(total=total, unit="B", unit_scale=True, desc=f"download {what}", leave=False) as bar:
                    for chunk in iter(lambda: response.read(1 << 16), b""):
                        out.write(chunk)
                        written += len(chunk)
                        bar.update(len(chunk))
            # A chunked body ignores Content-Length (a server may send both); a cut one raises IncompleteRead.
            if total is not None and not response.chunked and written != total:
                # A connection dropped mid-body ends the stream quietly: it would be a cut-off corpus.
                raise _CutOff(f"the connection closed after {written:,} of {total:,} bytes")
            return dest
        except urllib.error.HTTPError as exc:
            # 4xx will not change on a retry; 5xx might.
            if exc.code < 500 or attempt == _DOWNLOAD_ATTEMPTS:
                raise SourceUnavailableError(f"{what} {url}: download failed: HTTP {exc.code} {exc.reason}") from None
        except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
            # HTTPException: a chunked body cut off (IncompleteRead), a garbled answer.
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
