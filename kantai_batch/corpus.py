"""prepare: read a raw corpus, decode it, clean it, split its examples into train and eval.

Writes ``RUN/corpus/{train,eval}.txt`` (UTF-8, LF, examples separated by blank lines) and
``stats.json``. For plain text an example is a paragraph, and the text's own characters are kept:
dashes and curly quotes are content, not noise. For the twcs CSV an example is a tweet or a
conversation on one line, cleaned as the job says (see ``twcs``).
"""

from __future__ import annotations

import codecs
import io
import logging
import random
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from kantai_batch.errors import InputDataError
from kantai_batch.fingerprint import fingerprint_of
from kantai_batch.job import Job
from kantai_batch.storage import RunDir, fetched, file_sha256, write_json_atomic

log = logging.getLogger(__name__)

TRAIN_FILE = "train.txt"
EVAL_FILE = "eval.txt"
STATS_FILE = "stats.json"

# Encoding detection reads a sample, not the whole file: corpora can be gigabytes.
_DETECTION_SAMPLE_BYTES = 4 << 20
# Text with no blank lines would be one huge paragraph; cutting it bounds the split's granularity.
_MAX_PARAGRAPH_LINES = 100
# C0/C1 control characters (form feeds, NULs, ...) except tab; they are page furniture, not text.
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
_REPLACEMENT = "\ufffd"


def prepare(job: Job, run: RunDir) -> Path:
    """Fetch and decode ``job.corpus.source``, write the train/eval split; return the corpus folder."""
    source = job.corpus.source
    with fetched(source, "corpus") as path:
        if path.stat().st_size == 0:
            raise InputDataError(f"corpus {source} is empty")
        encoding, detected = choose_encoding(path, job.corpus.encoding, source)
        with run.committed(run.corpus, inputs_sha256=fingerprint_of(job, "prepare")) as out:
            if job.corpus.format == "twcs":
                from kantai_batch.twcs import TwcsReader

                reader = TwcsReader(path, encoding, job.corpus, source)
                stats = _write_split(reader.examples(), out, job, nothing_kept=reader.counts.describe)
                stats["twcs"] = reader.counts.as_dict()
                log.info("corpus: %s", reader.counts.describe())
            else:
                stats = _write_split(("\n".join(p) for p in paragraphs(read_lines(path, encoding))), out, job)
            stats.update(
                format=job.corpus.format,
                source=source,
                source_bytes=path.stat().st_size,
                source_sha256=file_sha256(path),
                encoding=encoding,
                encoding_detected=detected,
            )
            write_json_atomic(out / STATS_FILE, stats)
    log.info(
        "corpus: %s bytes decoded as %s (%s), %s characters could not be decoded; "
        "%s examples for training, %s for evaluation",
        f"{stats['source_bytes']:,}",
        encoding,
        "detected" if detected else "forced",
        f"{stats['undecodable_chars']:,}",
        f"{stats['train']['examples']:,}",
        f"{stats['eval']['examples']:,}",
    )
    return run.corpus


def choose_encoding(path: Path, configured: str, source: str) -> tuple[str, bool]:
    """The codec to decode ``path`` with, and whether it was detected rather than configured."""
    if configured != "auto":
        return configured, False
    import charset_normalizer

    with path.open("rb") as handle:
        sample = handle.read(_DETECTION_SAMPLE_BYTES)
        if sample.startswith(codecs.BOM_UTF8):
            # A UTF-8 byte-order mark is a declaration: a few bad bytes later do not overrule it.
            return "utf_8_sig", True
        if handle.read(1):
            # Cut at a line end so the sample does not finish inside a multi-byte character.
            sample = sample[: sample.rfind(b"\n") + 1] or sample
    best = charset_normalizer.from_bytes(sample).best()
    if best is None:
        raise InputDataError(
            f"corpus {source}: cannot detect a text encoding (is it a text file?); set corpus.encoding to force one"
        )
    candidates = best.could_be_from_charset
    if best.bom and best.encoding == "utf_8":
        return "utf_8_sig", True
    if best.encoding == "ascii":
        # The sample may be ASCII while later bytes are not; UTF-8 reads both.
        return "utf_8", True
    if "cp1252" in candidates:
        # Several single-byte code pages decode this sample identically; Windows-1252 is by far the
        # most common of them for Western text, so later bytes are most likely meant as cp1252 too.
        return "cp1252", True
    return best.encoding, True


def read_lines(path: Path, encoding: str) -> Iterator[str]:
    """Decoded lines without line ends (any of LF, CRLF, CR), cleaned; undecodable bytes become U+FFFD."""
    with path.open("rb") as raw, io.TextIOWrapper(raw, encoding=encoding, errors="replace", newline=None) as text:
        for line in text:
            # Whitespace at a line's edges is wrapping debris in prose; inner spacing is kept.
            yield _CONTROL.sub("", line).strip()


def paragraphs(lines: Iterator[str]) -> Iterator[list[str]]:
    """Group lines into paragraphs at blank lines (and every _MAX_PARAGRAPH_LINES lines)."""
    current: list[str] = []
    for line in lines:
        if line:
            current.append(line)
            if len(current) < _MAX_PARAGRAPH_LINES:
                continue
        if current:
            yield current
            current = []
    if current:
        yield current


def write_text(path: Path, encoding: str, dest: Path) -> int:
    """Decode and clean ``path`` into ``dest`` as one UTF-8 text (no split); return its paragraphs."""
    count = 0
    with dest.open("w", encoding="utf-8", newline="\n") as out:
        for paragraph in paragraphs(read_lines(path, encoding)):
            out.write(("\n" if count else "") + "\n".join(paragraph) + "\n")
            count += 1
    return count


def _write_split(
    examples: Iterator[str], out: Path, job: Job, *, nothing_kept: Callable[[], str] | None = None
) -> dict[str, Any]:
    rng = random.Random(job.train.seed)
    counts = {name: {"examples": 0, "lines": 0, "chars": 0} for name in ("train", "eval")}
    undecodable = 0
    with (
        (out / TRAIN_FILE).open("w", encoding="utf-8", newline="\n") as train,
        (out / EVAL_FILE).open("w", encoding="utf-8", newline="\n") as held_out,
    ):
        for text in examples:
            name, handle = ("eval", held_out) if rng.random() < job.data.eval_fraction else ("train", train)
            undecodable += text.count(_REPLACEMENT)
            if counts[name]["examples"]:
                handle.write("\n")
            handle.write(text + "\n")
            counts[name]["examples"] += 1
            counts[name]["lines"] += text.count("\n") + 1
            counts[name]["chars"] += len(text)
    source = job.corpus.source
    if counts["train"]["examples"] + counts["eval"]["examples"] == 0:
        if nothing_kept is not None:
            raise InputDataError(f"corpus {source}: no example passed the filters ({nothing_kept()})")
        raise InputDataError(f"corpus {source} has no text (only blank lines or control characters)")
    for name in ("train", "eval"):
        if counts[name]["examples"] == 0:
            raise InputDataError(
                f"corpus {source} is too small to split: its {name} split got no example "
                f"(data.eval_fraction={job.data.eval_fraction}); use a larger corpus"
            )
    return {"undecodable_chars": undecodable, **counts}
