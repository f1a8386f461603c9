"""prepare: read a raw corpus, decode it, clean it, split its examples into train and eval.

Writes ``RUN/corpus/{train,eval}.txt`` (UTF-8, LF, examples separated by blank lines) and
``stats.json``. For plain text an example is a paragraph, and the text's own characters are kept:
dashes and curly quotes are content, not noise. For the twcs CSV an example is a tweet or a
conversation on one line, cleaned as the job says (see ``twcs``).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from kantai_batch.decoding import detect_encoding, paragraphs, read_lines
from kantai_batch.errors import InputDataError
from kantai_batch.fingerprint import fingerprint_of
from kantai_batch.job import Job
from kantai_batch.manifest import file_sha256, write_json_atomic
from kantai_batch.rundir import CORPUS_STATS, EVAL_TEXT, TRAIN_TEXT, RunDir
from kantai_batch.sources import fetched

log = logging.getLogger(__name__)


def prepare(job: Job, run: RunDir) -> Path:
    """Fetch and decode ``job.corpus.source``, write the train/eval split; return the corpus folder."""
    source = job.corpus.source
    with fetched(source, "corpus") as path:
        if path.stat().st_size == 0:
            raise InputDataError(f"corpus {source} is empty")
        decoding = detect_encoding(lambda: path.open("rb"), job.corpus.encoding, f"corpus {source}")
        encoding = decoding.encoding
        with run.committed(run.corpus, inputs_sha256=fingerprint_of(job, "prepare")) as out:
            if job.corpus.format == "twcs":
                from kantai_batch.twcs import TwcsReader

                reader = TwcsReader(path, encoding, job.corpus, source)
                stats = _write_split(reader.examples(), out, job, nothing_kept=reader.counts.describe)
                stats["twcs"] = reader.counts.as_dict()
                log.info("corpus: %s", reader.counts.describe())
            else:
                stats = _write_split(("\n".join(p) for p in paragraphs(read_lines(path, decoding))), out, job)
            stats.update(
                format=job.corpus.format,
                source=source,
                source_bytes=path.stat().st_size,
                source_sha256=file_sha256(path),
                **decoding.as_dict(),
            )
            write_json_atomic(out / CORPUS_STATS, stats)
    log.info(
        "corpus: %s bytes decoded as %s (%s), %s characters could not be decoded; "
        "%s examples for training, %s for evaluation",
        f"{stats['source_bytes']:,}",
        encoding,
        decoding.method if decoding.detected else "forced",
        f"{stats['undecodable_chars']:,}",
        f"{stats['train']['examples']:,}",
        f"{stats['eval']['examples']:,}",
    )
    return run.corpus


def _write_split(
    examples: Iterator[str], out: Path, job: Job, *, nothing_kept: Callable[[], str] | None = None
) -> dict[str, Any]:
    rng = random.Random(job.train.seed)
    counts = {name: {"examples": 0, "lines": 0, "chars": 0} for name in ("train", "eval")}
    with (
        (out / TRAIN_TEXT).open("w", encoding="utf-8", newline="\n") as train,
        (out / EVAL_TEXT).open("w", encoding="utf-8", newline="\n") as held_out,
    ):
        for text in examples:
            name, handle = ("eval", held_out) if rng.random() < job.data.eval_fraction else ("train", train)
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
    return dict(counts)
