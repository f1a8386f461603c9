"""Raw text to clean lines: which encoding a file is in, decoding it, cutting it into paragraphs.

Shared by ``prepare`` (the corpus) and ``evaluate --corpus`` (any raw text to score), so both read a
file the same way. A text's own characters are kept: dashes and curly quotes are content.

Detection is never a guess from the file's head alone. In order: a byte-order mark (UTF-8, UTF-16,
UTF-32) is a declaration; a file that is strict UTF-8 from its first byte to its last is UTF-8;
otherwise the set of high bytes (0x80-0xFF) of the whole file decides whether Windows-1252 can read
it, and charset-normalizer, given a sample spread over the file (its head, the context of every high
byte value's first occurrence, pieces from all over the file), says whether another code page reads
it more plausibly. When Windows-1252 reads the sample as plausibly as the best candidate it wins: it
is the web platform's default for legacy Latin text, and DOS code pages such as cp775 decode the
same bytes "as well" while turning every em dash into 'Ś'.
"""

from __future__ import annotations

import codecs
import contextlib
import io
import logging
import random
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from kantai_batch.errors import InputDataError, first_line

log = logging.getLogger(__name__)

_CHUNK_BYTES = 1 << 20
# The sample given to charset-normalizer: the head, a window around the first occurrence of each high
# byte value, and a few pieces of the file holding high bytes, drawn evenly over the whole file.
_HEAD_BYTES = 128 << 10
_WINDOW_BYTES = 2 << 10
_PIECES = 8
_PIECE_BYTES = 64 << 10

# Bytes that Windows-1252 leaves undefined: a file holding one is not Windows-1252.
_CP1252_UNDEFINED = frozenset((0x81, 0x8D, 0x8F, 0x90, 0x9D))
# How much more chaos (charset-normalizer's mess ratio) than the best candidate still counts as
# "decodes equally plausibly"; the measured gap for a wrong Western guess is 1.0 or more.
_PLAUSIBILITY_MARGIN = 0.02
# charset-normalizer's own limit: a decoding messier than this is no text in that encoding.
_MAX_CHAOS = 0.2
# Below this confidence (1 - mess ratio) the choice is logged as a warning and flagged in stats.json.
# charset-normalizer discards candidates above a mess ratio of 0.2; clean prose in the right code page
# scores 0 to 0.02, so anything above 0.05 has visibly odd characters in it.
LOW_CONFIDENCE = 0.95
_BOMS = (
    # UTF-32's little-endian mark begins with UTF-16's: test it first.
    (codecs.BOM_UTF32_LE, "utf_32"),
    (codecs.BOM_UTF32_BE, "utf_32"),
    (codecs.BOM_UTF8, "utf_8_sig"),
    (codecs.BOM_UTF16_LE, "utf_16"),
    (codecs.BOM_UTF16_BE, "utf_16"),
)
# The magic numbers of what a download often is instead of the text itself (Kaggle serves twcs.csv as a
# zip), read before the scan: detection would fail only after reading all of it, and then advise forcing
# an encoding, which turns the compressed bytes into rows of garbage.
_PACKED = (
    (b"PK\x03\x04", "a zip archive", "unzip it and pass the file inside"),
    (b"PK\x05\x06", "an empty zip archive", "unzip it and pass the file inside"),
    (b"\x1f\x8b", "gzip-compressed", "add .gz to its name, and it is read as it streams"),
    *(
        (b"BZh" + bytes([level]), "bzip2-compressed", "add .bz2 to its name, and it is read as it streams")
        for level in b"123456789"
    ),
    (b"\xfd7zX", "xz-compressed", "add .xz to its name, and it is read as it streams"),
    (b"\x28\xb5\x2f\xfd", "zstd-compressed", "add .zst to its name, and it is read as it streams"),
)
_EXAMPLES = 5
# A file with stray invalid bytes is still UTF-8 when it holds this many multi-byte characters' worth
# of valid sequences per invalid one; decoding it so replaces (and reports) just the stray bytes.
_UTF8_EVIDENCE = 20

# Text with no blank lines would be one huge paragraph; cutting it bounds the split's granularity.
_MAX_PARAGRAPH_LINES = 100

# C0/C1 control characters (form feeds, NULs, ...) except tab; they are page furniture, not text. Those
# that break a line (what str.splitlines splits at) become a space, or "page.\fChapter" read "page.Chapter".
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
_BREAKS = str.maketrans(dict.fromkeys("\x0b\x0c\x1c\x1d\x1e\x85", " "))
_REPLACEMENT = "\ufffd"
_ESCAPED = re.compile("[\udc80-\udcff]")
_SURROGATE = re.compile("[\ud800-\udfff]")

Opener = Callable[[], BinaryIO]


@dataclass
class Decoding:
    """How one file is decoded, and (once it has been read) what could not be."""

    encoding: str
    detected: bool
    confidence: float | None = None
    """1 - charset-normalizer's mess ratio for a statistical choice, 1.0 for a BOM or valid UTF-8, None
    when forced."""
    method: str = "forced"
    """bom, utf-8, cp1252, charset-normalizer or forced."""
    undecodable_chars: int = 0
    undecodable_examples: list[str] = field(default_factory=list)

    @property
    def low_confidence(self) -> bool:
        return self.confidence is not None and self.confidence < LOW_CONFIDENCE

    def count_undecodable(self, line: str, found: int | None = None) -> None:
        """Count the U+FFFD in ``line`` (``found`` of them, where only some are new), with an example."""
        found = line.count(_REPLACEMENT) if found is None else found
        if not found:
            return
        self.undecodable_chars += found
        if len(self.undecodable_examples) < _EXAMPLES:
            at = line.index(_REPLACEMENT)
            self.undecodable_examples.append(line[max(0, at - 30) : at + 30].strip())

    def without_surrogates(self, text: str) -> str:
        """``text`` with each lone UTF-16 surrogate (JSON's ``\\ud83d`` escapes half a character, as a
        tweet cut inside an emoji has) as a counted U+FFFD: no UTF-8 can hold one."""
        text, found = _SURROGATE.subn(_REPLACEMENT, text)
        self.count_undecodable(text, found)
        return text

    def as_dict(self) -> dict[str, Any]:
        return {
            "encoding": self.encoding,
            "encoding_detected": self.detected,
            "encoding_method": self.method,
            "encoding_confidence": None if self.confidence is None else round(self.confidence, 4),
            "encoding_low_confidence": self.low_confidence,
            "undecodable_chars": self.undecodable_chars,
            "undecodable_examples": list(self.undecodable_examples),
        }


def detect_encoding(open_bytes: Opener, configured: str, name: str) -> Decoding:
    """How to decode the bytes ``open_bytes()`` streams (named ``name`` in messages and logs)."""
    if configured != "auto":
        return _forced(open_bytes, configured, name)
    with open_bytes() as handle:
        head = handle.read(4)
        for bom, encoding in _BOMS:
            if head.startswith(bom):
                # A byte-order mark is a declaration: a few bad bytes later do not overrule it.
                return Decoding(encoding, detected=True, confidence=1.0, method="bom")
        for magic, packed, advice in _PACKED:
            if head.startswith(magic):
                raise InputDataError(f"{name} is {packed}, not text: {advice}")
        scan = _Scan()
        scan.feed(head)
        for chunk in iter(lambda: handle.read(_CHUNK_BYTES), b""):
            scan.feed(chunk)
        scan.finish()
    if scan.utf8:
        valid, errors = scan.utf8_extra_bytes, scan.utf8_errors
        choice = Decoding(
            "utf_8", detected=True, confidence=valid / (valid + errors) if errors else 1.0, method="utf-8"
        )
        if scan.utf8_errors:
            log.warning("%s: decoding as UTF-8, though %s bytes are not UTF-8", name, scan.utf8_errors)
        return choice
    choice = _statistical_choice(scan, name)
    level = logging.WARNING if choice.low_confidence else logging.INFO
    log.log(
        level,
        "%s: decoding as %s (%s, confidence %.2f)%s",
        name,
        choice.encoding,
        choice.method,
        choice.confidence,
        "; low confidence: check the text or set corpus.encoding" if choice.low_confidence else "",
    )
    return choice


def _forced(open_bytes: Opener, configured: str, name: str) -> Decoding:
    """``configured`` as the user set it, tried on the file's head so a codec that cannot read it at all
    (UTF-32 without its byte-order mark, ...) is a one-line error rather than a traceback mid-read."""
    with open_bytes() as handle:
        head = handle.read(_CHUNK_BYTES)
    encoding = configured
    for bom, declared in _BOMS:
        # A BOM of the forced codec's own family: the BOM's codec reads it and drops the mark, which
        # the forced name alone would leave as a character in front of the first example.
        if head.startswith(bom) and _family(declared) == _family(configured):
            encoding = declared
            break
    try:
        codecs.getincrementaldecoder(encoding)("replace").decode(head, final=False)
    except UnicodeError as exc:
        raise undecodable(name, configured, exc) from None
    return Decoding(encoding, detected=False)


def _family(encoding: str) -> str:
    """utf-8 for utf_8_sig, utf-16 for utf-16-le, ...; the codec's own name for the rest."""
    return "-".join(codecs.lookup(encoding).name.split("-")[:2])


def undecodable(name: str, encoding: str, exc: UnicodeError) -> InputDataError:
    return InputDataError(
        f"{name} cannot be decoded as {encoding}: {first_line(exc)}; set corpus.encoding to another one"
    )


class _Scan:
    """One pass over a file: is it strict UTF-8, which high bytes does it hold, and a spread sample."""

    def __init__(self) -> None:
        # surrogateescape, not replace: a U+FFFD the file really holds is valid UTF-8, not an error.
        self._utf8 = codecs.getincrementaldecoder("utf-8")("surrogateescape")
        # Bytes beyond one per character in what decoded as UTF-8 (valid multi-byte sequences: legacy
        # code pages almost never form them by chance), and the characters UTF-8 had to replace.
        self.utf8_extra_bytes = 0
        self.utf8_errors = 0
        # Per high byte value (0x80 + index): how many chunks hold it.
        self.high = [0] * 128
        self.head = bytearray()
        self.windows: list[bytes] = []
        self.pieces: list[bytes] = []
        self._chunks_with_high = 0
        # Reservoir sampling keeps _PIECES pieces drawn evenly from all chunks holding high bytes,
        # without knowing the file's length (a stream may be compressed); seeded, so repeatable.
        self._rng = random.Random(0)
        self._tail = b""

    def feed(self, chunk: bytes) -> None:
        if len(self.head) < _HEAD_BYTES:
            self.head += chunk[: _HEAD_BYTES - len(self.head)]
        self._decode_utf8(chunk)
        # Carry a little of the previous chunk so a window straddling a chunk boundary has context.
        data = self._tail + chunk
        offset = len(self._tail)
        self._tail = chunk[-_WINDOW_BYTES:]
        high = chunk.translate(None, _ASCII)
        if not high:
            return
        for value in set(high):
            if not self.high[value - 0x80]:
                at = data.find(bytes((value,)), offset)
                self.windows.append(_lines_around(data, at, _WINDOW_BYTES))
            self.high[value - 0x80] += 1
        self._chunks_with_high += 1
        first = data.find(high[:1], offset)
        piece = _lines_around(data, first + _PIECE_BYTES // 2 - _WINDOW_BYTES, _PIECE_BYTES)
        if len(self.pieces) < _PIECES:
            self.pieces.append(piece)
        else:
            slot = self._rng.randrange(self._chunks_with_high)
            if slot < _PIECES:
                self.pieces[slot] = piece

    def _decode_utf8(self, chunk: bytes, final: bool = False) -> None:
        # The whole file, errors or not: the verdict weighs errors against multi-byte characters, and
        # counting stopped after the first thousand errors judged a file by where its errors sit.
        text = self._utf8.decode(chunk, final)
        self.utf8_errors += len(_ESCAPED.findall(text))
        self.utf8_extra_bytes += len(chunk) - len(text)

    def finish(self) -> None:
        self._decode_utf8(b"", final=True)  # a file ending inside a multi-byte character

    @property
    def utf8(self) -> bool:
        """Strict UTF-8, or so nearly (a few stray bytes among many multi-byte characters) that any
        other code page would garble far more than it repairs."""
        return self.utf8_errors == 0 or self.utf8_extra_bytes >= _UTF8_EVIDENCE * self.utf8_errors

    def sample(self) -> bytes:
        head = bytes(self.head)
        if self.windows or self.pieces:
            head = head[: head.rfind(b"\n") + 1] or head
        return b"\n".join([head, *self.windows, *self.pieces])

    def present(self) -> set[int]:
        return {0x80 + index for index, count in enumerate(self.high) if count}


_ASCII = bytes(range(0x80))


def _lines_around(data: bytes, at: int, size: int) -> bytes:
    """About ``size`` bytes of ``data`` around ``at``, cut at line ends so no character is split."""
    start, end = max(0, at - size // 2), min(len(data), at + size // 2)
    if start > 0:
        cut = data.find(b"\n", start, at)
        start = cut + 1 if cut >= 0 else start
    if end < len(data):
        cut = data.rfind(b"\n", max(at, start), end)
        end = cut + 1 if cut >= 0 else end
    return data[start:end]


def _statistical_choice(scan: _Scan, name: str) -> Decoding:
    import charset_normalizer
    from charset_normalizer.md import mess_ratio

    sample = scan.sample()
    best = charset_normalizer.from_bytes(sample).best()
    if not scan.present() & _CP1252_UNDEFINED:
        # Windows-1252 decodes every byte of the file; does it read the sample as plausibly?
        chaos = mess_ratio(sample.decode("cp1252"), maximum_threshold=1.0)
        if chaos <= (_MAX_CHAOS if best is None else best.chaos) + _PLAUSIBILITY_MARGIN:
            return Decoding("cp1252", detected=True, confidence=max(0.0, 1.0 - chaos), method="cp1252")
    if best is None:
        raise InputDataError(
            f"{name}: cannot detect a text encoding (is it a text file?); set corpus.encoding to force one"
        )
    return Decoding(best.encoding, detected=True, confidence=max(0.0, 1.0 - best.chaos), method="charset-normalizer")


def open_text(raw: BinaryIO, encoding: str, newline: str | None = None) -> io.TextIOWrapper:
    """``raw`` decoded (universal newlines by default); undecodable bytes become U+FFFD."""
    return io.TextIOWrapper(raw, encoding=encoding, errors="replace", newline=newline)


def clean_line(line: str) -> str:
    """A line without control characters, and without whitespace at its edges (wrapping debris in prose;
    inner spacing is kept)."""
    return _CONTROL.sub("", line.translate(_BREAKS)).strip()


def read_lines(source: Path | BinaryIO, encoding: str | Decoding) -> Iterator[str]:
    """Decoded lines without line ends (any of LF, CRLF, CR), cleaned; undecodable bytes become U+FFFD.

    Given a ``Decoding``, the undecodable characters are counted (with examples) into it.
    """
    decoding = encoding if isinstance(encoding, Decoding) else None
    codec = decoding.encoding if decoding else encoding
    with _opened(source) as raw, open_text(raw, codec) as text:
        for line in text:
            if decoding is not None:
                decoding.count_undecodable(line)
            yield clean_line(line)


def _opened(source: Path | BinaryIO):
    return source.open("rb") if isinstance(source, Path) else contextlib.nullcontext(source)


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


def write_text(source: Path | BinaryIO, encoding: str | Decoding, dest: Path) -> int:
    """Decode and clean ``source`` into ``dest`` as one UTF-8 text (no split); return its paragraphs."""
    count = 0
    with dest.open("w", encoding="utf-8", newline="\n") as out:
        for paragraph in paragraphs(read_lines(source, encoding)):
            out.write(("\n" if count else "") + "\n".join(paragraph) + "\n")
            count += 1
    return count
