"""prepare: read a raw corpus, decode it, clean it, split its examples into train and eval.

Writes ``RUN/corpus/{train,eval}.txt`` (UTF-8, LF, examples separated by blank lines) and
``stats.json``. The source may be many files (see ``sources.expand``); each is fetched in turn,
decoded with its own encoding and read by the job's format (see ``formats``; ``twcs`` for the
customer-support CSV), so memory stays flat however large the corpus grows. For plain text an
example is a paragraph, and the text's own characters are kept: dashes and curly quotes are content,
not noise.

An example goes to eval when a keyed hash of its text (the key: ``eval.seed``) falls below
``data.eval_fraction``: the split depends on the seed and the examples only, not on the order the
files come in or on which other files are there, and a repeated paragraph never sits on both sides.

``stats.json`` lists every file (bytes, sha256, encoding and how sure its detection was,
undecodable characters with examples, examples, records skipped by reason) and the totals. For one
file, ``source_sha256`` is that file's sha256; for several, the sha256 of their hex digests, one per
line in the order read.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

from kantai_batch.decoding import Decoding, detect_encoding, undecodable
from kantai_batch.errors import InputDataError, KantaiError
from kantai_batch.fingerprint import fingerprint_of
from kantai_batch.formats import SUFFIXES, examples, parquet_examples
from kantai_batch.job import Job
from kantai_batch.manifest import file_sha256, write_json_atomic
from kantai_batch.rundir import CORPUS_STATS, EVAL_TEXT, TRAIN_TEXT, RunDir
from kantai_batch.sources import Input, decompressed, expand, fetched, is_s3, is_url

log = logging.getLogger(__name__)

_EXAMPLES_KEPT = 5
# The corpus marker's list of the source files read, to notice a source edited in place.
SOURCE_FILES = "source_files"


def prepare(job: Job, run: RunDir) -> Path:
    """Fetch and decode ``job.corpus.source``, write the train/eval split; return the corpus folder."""
    corpus = job.corpus
    inputs = expand(corpus.sources, "corpus", SUFFIXES[corpus.format])
    files: list[dict[str, Any]] = []
    identity = {SOURCE_FILES: source_identity(inputs)}
    with run.committed(run.corpus, inputs_sha256=fingerprint_of(job, "prepare"), **identity) as out:
        with _Split(out, job) as split:
            extra: dict[str, Any] = {}
            if corpus.format == "twcs":
                from kantai_batch.twcs import TwcsReader

                reader = TwcsReader(lambda: _twcs_files(inputs, job, files), corpus)
                split.write(reader.examples())
                extra["twcs"] = reader.counts.as_dict()
                log.info("corpus: %s", reader.counts.describe())
                nothing_kept: Callable[[], str] | None = reader.counts.describe
            else:
                for item in inputs:
                    files.append(_read(item, job, split, only=len(inputs) == 1))
                extra["skipped"] = dict(sorted(sum((Counter(f["skipped"]) for f in files), Counter()).items()))
                nothing_kept = _describe_skipped(extra["skipped"]) if extra["skipped"] else None
        stats = split.checked(corpus.source_label, nothing_kept)
        stats.update(format=corpus.format, **_totals(job, files), **extra, files=files)
        write_json_atomic(out / CORPUS_STATS, stats)
    log.info(
        "corpus: %s file(s), %s bytes decoded as %s, %s characters could not be decoded; "
        "%s examples for training, %s for evaluation",
        len(files),
        f"{stats['source_bytes']:,}",
        stats["encoding"],
        f"{stats['undecodable_chars']:,}",
        f"{stats['train']['examples']:,}",
        f"{stats['eval']['examples']:,}",
    )
    return run.corpus


def source_identity(inputs: list[Input]) -> list[list[Any]]:
    """What says a source file is the one read before, without reading it: each input's name, and for
    a local file its size and modification time (remote ones are named only: a changed object under
    the same key, or a changed URL, is not noticed; ``run --register`` re-reads the source always)."""
    identity: list[list[Any]] = []
    for item in inputs:
        if is_url(item.name) or is_s3(item.name):
            identity.append([item.name, None, None])
        else:
            stat = Path(item.name).expanduser().stat()
            identity.append([item.name, stat.st_size, stat.st_mtime_ns])
    return identity


def source_change(job: Job, run: RunDir, marker: dict[str, Any]) -> str | None:
    """How the corpus's source files differ from those the prepared corpus was read from, or None.

    A source that cannot be listed now (a file deleted after prepare, a store out of reach) keeps the
    prepared corpus, as does a corpus prepared before its marker named its files."""
    recorded = marker.get(SOURCE_FILES)
    if recorded is None:
        return None
    try:
        now = source_identity(expand(job.corpus.sources, "corpus", SUFFIXES[job.corpus.format]))
    except (KantaiError, OSError) as exc:
        log.info("prepare: the source cannot be listed now (%s); the prepared corpus stands", exc)
        return None
    before = {entry[0]: entry for entry in recorded}
    after = {entry[0]: entry for entry in now}
    for name, entry in after.items():
        if name not in before:
            return f"corpus file {name} is new"
        if entry != before[name]:
            return f"corpus file {name} changed (size or modification time)"
    gone = sorted(set(before) - set(after))
    return f"corpus file {gone[0]} is gone" if gone else None


def _read(item: Input, job: Job, split: _Split, *, only: bool) -> dict[str, Any]:
    """Write one file's examples to the split; return its entry in stats.json."""
    corpus = job.corpus
    label = f"corpus {item.name}"
    skipped: Counter[str] = Counter()
    with fetched(item.name, "corpus") as path:
        size = path.stat().st_size
        entry: dict[str, Any] = {"name": item.name, "bytes": size, "sha256": file_sha256(path)}
        if size == 0:
            if only:
                raise InputDataError(f"{label} is empty")
            log.warning("%s is empty; nothing read from it", label)
            return {**entry, **Decoding("", detected=False).as_dict(), "examples": 0, "skipped": {}}
        if corpus.format == "parquet":
            if item.compression:
                raise InputDataError(f"{label}: parquet compresses inside; give the .parquet file uncompressed")
            decoding = Decoding("utf_8", detected=True, confidence=1.0, method="parquet")
            count = split.write(parquet_examples(path, field=corpus.text_field, name=label, skipped=skipped))
        else:
            decoding = detect_encoding(lambda: decompressed(path, item.name), corpus.encoding, label)
            with decompressed(path, item.name) as raw:
                read = examples(corpus.format, raw, decoding, field=corpus.text_field, name=label, skipped=skipped)
                count = split.write(_decoded(read, label, decoding.encoding))
    if skipped:
        log.info("%s: skipped %s", label, _describe_skipped(dict(skipped))())
    return {**entry, **decoding.as_dict(), "examples": count, "skipped": dict(sorted(skipped.items()))}


def _decoded(read: Iterator[str], label: str, encoding: str) -> Iterator[str]:
    """``read``, with a codec failing past the file's head (whatever its error handler) as a one-line error."""
    try:
        yield from read
    except UnicodeError as exc:
        raise undecodable(label, encoding, exc) from None


def _twcs_files(inputs: list[Input], job: Job, files: list[dict[str, Any]]) -> Iterator[tuple[BinaryIO, str, str]]:
    """Each twcs file in turn, fetched and opened, for the reader that joins their rows."""
    for item in inputs:
        label = f"corpus {item.name}"
        with fetched(item.name, "corpus") as path:
            size = path.stat().st_size
            if size == 0:
                if len(inputs) == 1:
                    raise InputDataError(f"{label} is empty")
                log.warning("%s is empty; nothing read from it", label)
                continue
            opener = lambda path=path, name=item.name: decompressed(path, name)  # noqa: E731
            decoding = detect_encoding(opener, job.corpus.encoding, label)
            files.append({"name": item.name, "bytes": size, "sha256": file_sha256(path), **decoding.as_dict()})
            with decompressed(path, item.name) as raw:
                yield raw, decoding.encoding, label


def _totals(job: Job, files: list[dict[str, Any]]) -> dict[str, Any]:
    """The keys stats.json has always had, for one file or summed over many."""
    source = job.corpus.source if isinstance(job.corpus.source, str) else list(job.corpus.source)
    read = [entry for entry in files if entry["bytes"]]
    if len(files) == 1:
        only = files[0]
        keys = ("encoding", "encoding_detected", "encoding_method", "encoding_confidence", "encoding_low_confidence")
        decoding = {key: only[key] for key in keys}
        digest = only["sha256"]
    else:
        digest = hashlib.sha256("".join(f"{entry['sha256']}\n" for entry in files).encode()).hexdigest()
        confidences = [entry["encoding_confidence"] for entry in read if entry["encoding_confidence"] is not None]
        decoding = {
            "encoding": _common(entry["encoding"] for entry in read),
            "encoding_detected": all(entry["encoding_detected"] for entry in read),
            "encoding_method": _common(entry["encoding_method"] for entry in read),
            "encoding_confidence": min(confidences) if confidences else None,
            "encoding_low_confidence": any(entry["encoding_low_confidence"] for entry in read),
        }
    examples = [example for entry in files for example in entry.get("undecodable_examples", [])]
    return {
        "source": source,
        "source_bytes": sum(entry["bytes"] for entry in files),
        "source_sha256": digest,
        **decoding,
        "undecodable_chars": sum(entry.get("undecodable_chars", 0) for entry in files),
        "undecodable_examples": examples[:_EXAMPLES_KEPT],
    }


def _common(values: Iterable[str]) -> str:
    distinct = sorted(set(values))
    return distinct[0] if len(distinct) == 1 else "mixed"


def _describe_skipped(skipped: dict[str, int]) -> Callable[[], str]:
    return lambda: ", ".join(f"{reason} {count:,}" for reason, count in sorted(skipped.items()))


class _Split:
    """The train and eval files being written, and what went into each."""

    def __init__(self, out: Path, job: Job) -> None:
        self._out = out
        self._fraction = job.data.eval_fraction
        self._eval_fraction_text = f"data.eval_fraction={job.data.eval_fraction}"
        self._format = job.corpus.format
        self._key = str(job.eval.seed).encode()
        # A customer tweet with several replies is several examples: split by the tweet, or its other
        # conversations would train on the text held out in one.
        conversation = job.corpus.format == "twcs" and job.corpus.conversation
        self._turn = f" {job.corpus.separator} " if conversation else None
        self.counts = {name: {"examples": 0, "lines": 0, "chars": 0} for name in ("train", "eval")}

    def __enter__(self) -> _Split:
        with contextlib.ExitStack() as files:
            self._handles = {
                name: files.enter_context((self._out / file).open("w", encoding="utf-8", newline="\n"))
                for name, file in (("train", TRAIN_TEXT), ("eval", EVAL_TEXT))
            }
            self._files = files.pop_all()  # closed on exit, or above if the second could not be opened
        return self

    def __exit__(self, *exc: object) -> None:
        self._files.close()

    def write(self, texts: Iterable[str]) -> int:
        """Append each example to its split; return how many were written."""
        written = 0
        for text in texts:
            name = "eval" if self._held_out(text) else "train"
            counts = self.counts[name]
            self._handles[name].write(("\n" if counts["examples"] else "") + text + "\n")
            counts["examples"] += 1
            counts["lines"] += text.count("\n") + 1
            counts["chars"] += len(text)
            written += 1
        return written

    def _held_out(self, text: str) -> bool:
        key = text.partition(self._turn)[0] if self._turn else text
        digest = hashlib.blake2b(key.encode("utf-8"), digest_size=8, key=self._key).digest()
        return int.from_bytes(digest, "big") < self._fraction * 2**64

    def checked(self, source: str, nothing_kept: Callable[[], str] | None) -> dict[str, Any]:
        """The split's counts, once it is known to be usable."""
        counts = self.counts
        if counts["train"]["examples"] + counts["eval"]["examples"] == 0:
            if nothing_kept is not None:
                raise InputDataError(f"corpus {source}: no example passed the filters ({nothing_kept()})")
            raise InputDataError(f"corpus {source} has no text (only blank lines or control characters)")
        if counts["train"]["examples"] + counts["eval"]["examples"] == 1:
            chars = counts["train"]["chars"] + counts["eval"]["chars"]
            hint = (
                "plain text is cut at blank lines and every 100 lines (this one has no line break?); "
                if self._format == "text"
                else ""
            )
            raise InputDataError(
                f"corpus {source} is one example of {chars:,} characters, which cannot be split into train "
                f"and eval: {hint}use a larger corpus"
            )
        for name in ("train", "eval"):
            if counts[name]["examples"] == 0:
                raise InputDataError(
                    f"corpus {source} is too small to split: its {name} split got no example "
                    f"({self._eval_fraction_text}); use a larger corpus"
                )
        return {name: dict(values) for name, values in counts.items()}
