"""prepare for ``corpus.format: twcs``: the Kaggle "Customer Support on Twitter" CSV as training examples.

The file (``twcs.csv``: 2.8M rows, ~500 MB; columns tweet_id, author_id, inbound, created_at, text,
response_tweet_id, in_response_to_tweet_id) is streamed row by row with the csv module, so quoted
newlines and quotes inside tweets are read correctly and memory stays flat. What needs state across
rows (duplicates, pairing a customer tweet with the brand's reply) goes to an SQLite file in scratch
space, not to Python dicts that would grow with the corpus.

Cleaning is a ``tokenizers`` normalizer, and the trained tokenizer carries the same one: a prompt given
to ``generate`` or ``chat`` is cleaned exactly as the training tweets were.

A row that cannot be used (wrong number of fields, bytes that are not text, empty text, an ``inbound``
that is neither True nor False, ...) is counted under its reason and skipped; ``stats.json`` reports
every count.
"""

from __future__ import annotations

import codecs
import csv
import hashlib
import io
import logging
import re
import sqlite3
import tempfile
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from kantai_batch.decoding import undecodable
from kantai_batch.errors import InputDataError
from kantai_batch.formats import CSV_FIELD_LIMIT
from kantai_batch.job import CorpusSection

log = logging.getLogger(__name__)

COLUMNS = ("tweet_id", "author_id", "inbound", "created_at", "text", "response_tweet_id", "in_response_to_tweet_id")

# Undecodable bytes come through as a lone surrogate, which no decoded text holds: a row with one is
# not text in the file's encoding. Not ``surrogateescape``, which only escapes bytes over 0x7f and so
# fails on a UTF-16 file's odd trailing byte; nor ``replace``, since a U+FFFD may be the tweet's own.
_UNDECODABLE = re.compile(r"[\udc80-\udcff]")
_MARKED = "kantai-batch-undecodable"
codecs.register_error(_MARKED, lambda exc: ("\udc80", exc.end))
# Tweet ids in the Kaggle file are integers, written as floats ("119237.0") where pandas saw NaNs.
_TWEET_ID = re.compile(r"^\s*(\d+)(?:\.0*)?\s*$")
_SQLITE_BATCH = 10_000


def cleaner(corpus: CorpusSection):
    """The tweet cleaning as a ``tokenizers`` normalizer: links, handles, the recipe's letters-only rule."""
    from tokenizers import Regex, normalizers

    steps = []
    if corpus.strip_urls:
        steps.append(normalizers.Replace(Regex(r"https?://\S+"), " "))
    if corpus.strip_handles:
        steps.append(normalizers.Replace(Regex(r"@\w+"), " "))
    if corpus.letters_only:
        # The recipe: re.sub(r"[^a-z\s']", "", text.lower()).
        steps += [normalizers.Lowercase(), normalizers.Replace(Regex(r"[^a-z\s']"), "")]
    # A tweet is one example on one line: embedded newlines and runs of spaces become one space.
    steps += [normalizers.Replace(Regex(r"\s+"), " "), normalizers.Strip()]
    return normalizers.Sequence(steps)


@dataclass
class TwcsCounts:
    """What happened to every row and every candidate example, by reason."""

    rows_read: int = 0
    rows_dropped: Counter[str] = field(default_factory=Counter)
    examples_kept: int = 0
    examples_dropped: Counter[str] = field(default_factory=Counter)

    def as_dict(self) -> dict[str, Any]:
        return {
            "rows_read": self.rows_read,
            "rows_dropped": dict(sorted(self.rows_dropped.items())),
            "examples_kept": self.examples_kept,
            "examples_dropped": dict(sorted(self.examples_dropped.items())),
        }

    def describe(self) -> str:
        reasons = sorted((self.rows_dropped + self.examples_dropped).items())
        dropped = ", ".join(f"{reason} {count:,}" for reason, count in reasons) or "none"
        return f"{self.rows_read:,} rows read, {self.examples_kept:,} examples kept; dropped: {dropped}"


class TwcsReader:
    """Streams the examples of one twcs file; ``counts`` is complete once the iterator is exhausted."""

    def __init__(self, files: Callable[[], Iterator[tuple[BinaryIO, str, str]]], corpus: CorpusSection) -> None:
        """``files()`` yields each file in turn as (byte stream, encoding, name for messages); rows of all
        of them are one stream, so a reply pairs with its customer tweet in any file."""
        self.files = files
        self.corpus = corpus
        self.counts = TwcsCounts()
        self._clean = cleaner(corpus).normalize_str

    def examples(self) -> Iterator[str]:
        with tempfile.TemporaryDirectory(prefix="kantai-twcs-") as scratch:
            db = sqlite3.connect(Path(scratch) / "rows.db")
            try:
                db.execute("CREATE TABLE seen (digest BLOB PRIMARY KEY) WITHOUT ROWID")
                candidates = self._conversations(db) if self.corpus.conversation else self._tweets()
                yield from self._filtered(candidates, db)
            finally:
                db.close()

    def _filtered(self, candidates: Iterator[str], db: sqlite3.Connection) -> Iterator[str]:
        for text in candidates:
            # Words of the text itself: the conversation separator is not a word.
            words = len(text.split()) - (1 if self.corpus.conversation else 0)
            if words <= self.corpus.min_words:
                self.counts.examples_dropped["too_short"] += 1
                continue
            if self.corpus.dedupe:
                digest = hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()
                if db.execute("INSERT OR IGNORE INTO seen VALUES (?)", (digest,)).rowcount == 0:
                    self.counts.examples_dropped["duplicate"] += 1
                    continue
            self.counts.examples_kept += 1
            yield text

    def _tweets(self) -> Iterator[str]:
        for row in self._rows():
            inbound = self._inbound(row) if self.corpus.brand_replies_only else None
            if self.corpus.brand_replies_only:
                if inbound is None:
                    continue
                if inbound:
                    self.counts.rows_dropped["customer_tweet"] += 1
                    continue
            text = self._text(row)
            if text is not None:
                yield text

    def _conversations(self, db: sqlite3.Connection) -> Iterator[str]:
        """Each customer tweet joined with every brand reply to it, in the file's order of the replies."""
        db.execute("CREATE TABLE customer (tweet_id INTEGER PRIMARY KEY, text TEXT NOT NULL)")
        # A reply's own id is UNIQUE so that a row exported twice is one reply, not two conversations; NULL
        # (an id that is not one) is never equal to another, so such a reply is still kept.
        db.execute(
            "CREATE TABLE reply (seq INTEGER PRIMARY KEY, tweet_id INTEGER UNIQUE, to_id INTEGER NOT NULL, "
            "text TEXT NOT NULL)"
        )
        customers: list[tuple[int, str]] = []
        replies: list[tuple[int | None, int, str]] = []

        def flush() -> None:
            before = db.total_changes
            db.executemany("INSERT OR IGNORE INTO customer VALUES (?, ?)", customers)
            # A tweet id seen before keeps its first text; the later rows are dropped, and counted.
            before_replies = db.total_changes
            db.executemany("INSERT OR IGNORE INTO reply (tweet_id, to_id, text) VALUES (?, ?, ?)", replies)
            repeated = len(customers) - (before_replies - before) + len(replies) - (db.total_changes - before_replies)
            if repeated:
                self.counts.rows_dropped["repeated_tweet_id"] += repeated
            customers.clear()
            replies.clear()

        for row in self._rows():
            inbound = self._inbound(row)
            if inbound is None:
                continue
            key = "tweet_id" if inbound else "in_response_to_tweet_id"
            tweet_id = _tweet_id(row[key])
            if tweet_id is None:
                reason = "bad_tweet_id" if inbound or row[key].strip() else "not_a_reply"
                self.counts.rows_dropped[reason] += 1
                continue
            text = self._text(row)
            if text is None:
                continue
            if inbound:
                customers.append((tweet_id, text))
            else:
                replies.append((_tweet_id(row["tweet_id"]), tweet_id, text))
            if len(customers) + len(replies) >= _SQLITE_BATCH:
                flush()
        flush()
        unmatched = db.execute(
            "SELECT count(*) FROM reply WHERE to_id NOT IN (SELECT tweet_id FROM customer)"
        ).fetchone()[0]
        unanswered = db.execute(
            "SELECT count(*) FROM customer WHERE tweet_id NOT IN (SELECT to_id FROM reply)"
        ).fetchone()[0]
        self.counts.examples_dropped.update(reply_to_no_customer_tweet=unmatched, customer_tweet_unanswered=unanswered)
        separator = self.corpus.separator
        pairs = db.execute("SELECT c.text, r.text FROM reply r JOIN customer c ON c.tweet_id = r.to_id ORDER BY r.seq")
        for customer, reply in pairs:
            # A tweet that holds the separator's text would read as two turns: the only one is the join's.
            yield f"{customer.replace(separator, ' ')} {separator} {reply.replace(separator, ' ')}"

    def _rows(self) -> Iterator[dict[str, str]]:
        """The files' well-formed rows as dicts; malformed ones are counted and skipped."""
        for raw, encoding, name in self.files():
            yield from self._rows_of(raw, encoding, name)

    def _rows_of(self, raw: BinaryIO, encoding: str, name: str) -> Iterator[dict[str, str]]:
        # Past the csv module's default field limit (128 KiB) the reader gives up inside the quoted field
        # and starts over at the next line of it: the field's own lines would be read as rows.
        csv.field_size_limit(max(csv.field_size_limit(), CSV_FIELD_LIMIT))
        with io.TextIOWrapper(raw, encoding=encoding, errors=_MARKED, newline="") as text:
            reader = csv.reader(text)
            header = self._header(reader, name)
            while True:
                try:
                    record = next(reader)
                except StopIteration:
                    return
                except UnicodeError as exc:  # a codec that fails whatever its error handler says
                    raise undecodable(name, encoding, exc) from None
                except csv.Error:
                    # e.g. an unterminated quote running past the field size limit.
                    self.counts.rows_read += 1
                    self.counts.rows_dropped["malformed_csv"] += 1
                    continue
                if not record:
                    continue  # a blank line is no row
                self.counts.rows_read += 1
                if len(record) != len(header):
                    self.counts.rows_dropped["wrong_field_count"] += 1
                    continue
                row = dict(zip(header, record, strict=True))
                if _UNDECODABLE.search(row["text"]):
                    self.counts.rows_dropped["undecodable"] += 1
                    continue
                yield row

    def _header(self, reader, name: str) -> list[str]:
        try:
            header = next(reader, [])
        except csv.Error as exc:
            raise InputDataError(f"{name} is not a readable CSV file: {exc}") from None
        names = [name.strip().lstrip("\ufeff") for name in header]
        needed = ["text"]
        if self.corpus.brand_replies_only or self.corpus.conversation:
            needed.append("inbound")
        if self.corpus.conversation:
            needed += ["tweet_id", "in_response_to_tweet_id"]
        missing = [name for name in needed if name not in names]
        if missing:
            shown = "its columns: " + ", ".join(_printable(name) for name in names[:12])
            if len(names) > 12:
                shown += f", ... ({len(names)} in all)"
            if not any(names):
                shown = "its first line, the header, is empty"  # a text file given as twcs, most likely
            delimiter = _other_delimiter(names)
            if delimiter:
                # A spreadsheet's export in a locale whose list separator is not a comma: the columns are
                # all there, read as one, so "no text column" alone would point the user at the wrong thing.
                shown = f"its header is one column, {_printable(names[0])}...: delimited by {delimiter!r}, not commas"
            raise InputDataError(
                f"{name} has no {' or '.join(missing)} column ({shown}); "
                f"corpus.format twcs expects {', '.join(COLUMNS)}"
            )
        if len(set(names)) != len(names):
            raise InputDataError(f"{name} repeats a column name in its header: {', '.join(names)}")
        return names

    def _inbound(self, row: dict[str, str]) -> bool | None:
        value = row["inbound"].strip().lower()
        if value in ("true", "false"):
            return value == "true"
        self.counts.rows_dropped["bad_inbound"] += 1
        return None

    def _text(self, row: dict[str, str]) -> str | None:
        if not row["text"].strip():
            self.counts.rows_dropped["empty_text"] += 1
            return None
        text = self._clean(row["text"])
        if not text:
            self.counts.rows_dropped["nothing_left_after_cleaning"] += 1
            return None
        return text


def _tweet_id(value: str) -> int | None:
    match = _TWEET_ID.match(value)
    tweet_id = int(match.group(1)) if match else None
    # Twitter's ids are 64-bit; a longer one is garbage, and more than SQLite's INTEGER holds.
    return tweet_id if tweet_id is not None and tweet_id < 2**63 else None


def _other_delimiter(names: list[str]) -> str | None:
    """The delimiter a one-column header is split by, where it holds the twcs columns split by one."""
    if len(names) != 1:
        return None
    for delimiter in (";", "\t", "|"):
        if "text" in (part.strip().strip('"') for part in names[0].split(delimiter)):
            return delimiter
    return None


def _printable(name: str) -> str:
    return _UNDECODABLE.sub("?", name)[:40] or "''"
