"""Raw text to clean lines: which encoding a file is in, decoding it, cutting it into paragraphs.

Shared by ``prepare`` (the corpus) and ``evaluate --corpus`` (any raw text to score), so both read a
file the same way. A text's own characters are kept: dashes and curly quotes are content.
"""

from __future__ import annotations

import codecs
import io
import re
from collections.abc import Iterator
from pathlib import Path

from kantai_batch.errors import InputDataError

# Encoding detection reads a sample, not the whole file: corpora can be gigabytes.
_DETECTION_SAMPLE_BYTES = 4 << 20

# Text with no blank lines would be one huge paragraph; cutting it bounds the split's granularity.
_MAX_PARAGRAPH_LINES = 100

# C0/C1 control characters (form feeds, NULs, ...) except tab; they are page furniture, not text.
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


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
