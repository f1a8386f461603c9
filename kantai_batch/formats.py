"""Format readers: one corpus file's bytes as training examples, and what was skipped and why.

``text`` cuts plain text into paragraphs; ``lines`` takes every non-empty line; ``jsonl``, ``csv`` and
``parquet`` take one field of each record (``corpus.text_field``). A record without the field, or with
something other than a string in it, is counted under its reason and skipped; a file in which no
record has the field is a one-line error naming the file and the fields it does have, since that is a
wrong ``text_field`` rather than a few bad rows. Every reader streams: memory does not grow with the
file. (``twcs`` has its own module: its examples need state across rows.)
"""

from __future__ import annotations

import csv
import json
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

from kantai_batch.decoding import Decoding, clean_line, detect_encoding, open_text, paragraphs, read_lines, write_text
from kantai_batch.errors import InputDataError, first_line
from kantai_batch.sources import decompressed, expand, fetched

# The file names a folder or an s3:// prefix contributes for each format (below any compression
# extension); a file named explicitly, or matched by a glob, is read whatever its name.
SUFFIXES: dict[str, tuple[str, ...]] = {
    "text": (".txt", ".text", ".md"),
    "lines": (".txt", ".text", ".md"),
    "jsonl": (".jsonl", ".ndjson", ".json"),
    "csv": (".csv",),
    "parquet": (".parquet",),
    "twcs": (".csv",),
}
_PARQUET_BATCH_ROWS = 1024
# The csv module's default field limit (128 KiB) would reject long documents as malformed rows.
CSV_FIELD_LIMIT = 1 << 28
_FIELDS_SHOWN = 12


def _integer(digits: str) -> int | float:
    # Python refuses to parse integers past 4,300 digits (a guard against quadratic conversion); such
    # a number in another field must not drop the record, and as the text field it is not a string
    # either way.
    try:
        return int(digits)
    except ValueError:
        return float("inf") if digits[0] != "-" else float("-inf")


def examples(
    fmt: str, raw: BinaryIO, decoding: Decoding, *, field: str, name: str, skipped: Counter[str]
) -> Iterator[str]:
    """The examples of one file in format ``fmt`` (not parquet: see ``parquet_examples``)."""
    if fmt == "text":
        for paragraph in paragraphs(read_lines(raw, decoding)):
            yield "\n".join(paragraph)
    elif fmt == "lines":
        yield from (line for line in read_lines(raw, decoding) if line)
    elif fmt == "jsonl":
        yield from _jsonl(raw, decoding, field, name, skipped)
    elif fmt == "csv":
        yield from _csv(raw, decoding, field, name, skipped)
    else:
        raise AssertionError(f"no reader for format {fmt}")


def document(text: str) -> str:
    """A record's text as one example: cleaned lines, no blank line inside (blank lines separate examples)."""
    return "\n".join(line for line in map(clean_line, text.splitlines()) if line)


def _field_text(value: Any, skipped: Counter[str]) -> str | None:
    if value is None:
        skipped["null_field"] += 1
        return None
    if not isinstance(value, str):
        skipped["not_a_string"] += 1
        return None
    text = document(value)
    if not text:
        skipped["empty_text"] += 1
        return None
    return text


def _jsonl(raw: BinaryIO, decoding: Decoding, field: str, name: str, skipped: Counter[str]) -> Iterator[str]:
    records = objects = with_field = 0
    seen: dict[str, None] = {}  # the fields records have, in order of appearance, for the error message
    with open_text(raw, decoding.encoding) as text:
        for line in text:
            decoding.count_undecodable(line)
            if not line.strip():
                continue
            records += 1
            try:
                record = json.loads(line, parse_int=_integer)
            except (ValueError, RecursionError):  # nested past the interpreter's stack: no record of ours
                skipped["invalid_json"] += 1
                continue
            if not isinstance(record, dict):
                skipped["not_an_object"] += 1
                continue
            objects += 1
            if field not in record:
                skipped["missing_field"] += 1
                if len(seen) < _FIELDS_SHOWN + 1:
                    seen.update(dict.fromkeys(record))
                continue
            with_field += 1
            value = record[field]
            example = _field_text(decoding.without_surrogates(value) if isinstance(value, str) else value, skipped)
            if example is not None:
                yield example
    if records and not objects:
        # A JSON document (an array, a pretty-printed object) rather than JSON Lines.
        raise InputDataError(
            f"{name}: none of its {records} lines is a JSON object; jsonl wants one object per line "
            "(a JSON array or a pretty-printed document is not JSON Lines)"
        )
    if records and not with_field:
        raise InputDataError(f"{name}: no record has a {field!r} field (its fields: {_shown(list(seen))})")


def _csv(raw: BinaryIO, decoding: Decoding, field: str, name: str, skipped: Counter[str]) -> Iterator[str]:
    csv.field_size_limit(max(csv.field_size_limit(), CSV_FIELD_LIMIT))
    with open_text(raw, decoding.encoding, newline="") as text:
        reader = csv.reader(text)
        try:
            header = next(reader, [])
        except csv.Error as exc:
            raise InputDataError(f"{name} is not a readable CSV file: {exc}") from None
        names = [column.strip().lstrip("\ufeff") for column in header]
        if field not in names:
            raise InputDataError(f"{name} has no {field!r} column (its columns: {_shown(names)})")
        at = names.index(field)
        while True:
            try:
                row = next(reader)
            except StopIteration:
                return
            except csv.Error:
                skipped["malformed_csv"] += 1
                continue
            if not row:
                continue  # a blank line is no row
            for value in row:
                decoding.count_undecodable(value)
            if len(row) != len(names):
                skipped["wrong_field_count"] += 1
                continue
            example = _field_text(row[at], skipped)
            if example is not None:
                yield example


def parquet_examples(path: Path, *, field: str, name: str, skipped: Counter[str]) -> Iterator[str]:
    """The examples of one parquet file: its ``field`` column, read a batch of rows at a time."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as exc:
        raise InputDataError(f"{name} is not a readable parquet file: {first_line(exc)}") from None
    names = table.schema_arrow.names
    if field not in names:
        raise InputDataError(f"{name} has no {field!r} column (its columns: {_shown(names)})")
    try:
        for batch in table.iter_batches(batch_size=_PARQUET_BATCH_ROWS, columns=[field]):
            for value in batch.column(0).to_pylist():
                example = _field_text(value, skipped)
                if example is not None:
                    yield example
    except (pa.ArrowException, OSError) as exc:
        raise InputDataError(f"{name} is not a readable parquet file: {first_line(exc)}") from None


def _shown(names: list[str]) -> str:
    shown = ", ".join(repr(name)[:40] for name in names[:_FIELDS_SHOWN]) or "none"
    return shown + (", ..." if len(names) > _FIELDS_SHOWN else "")


def decoded_text(source: str, configured: str, dest: Path, what: str) -> Path:
    """Every file ``source`` names (a file, folder, glob, URL, s3:// object or prefix), decoded and cleaned as
    prepare does plain text, into one text; ``configured`` is ``corpus.encoding``."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_suffix(".part")
    written = 0
    with dest.open("w", encoding="utf-8", newline="\n") as out:
        for item in expand((source,), what, SUFFIXES["text"]):
            with fetched(item.name, what) as path:
                opened = lambda: decompressed(path, item.name)  # noqa: B023, E731 - used within this iteration
                decoding = detect_encoding(opened, configured, f"{what} {item.name}")
                with opened() as raw:
                    count = write_text(raw, decoding, part)
                if count:
                    out.write(("\n" if written else "") + part.read_text(encoding="utf-8"))
                    written += count
    part.unlink(missing_ok=True)
    if written == 0:
        raise InputDataError(f"{what} {source} has no text")
    return dest
