"""Encoding detection: legacy Western text is Windows-1252, never a DOS code page; every BOM is honoured."""

from __future__ import annotations

import codecs
import json
import logging
import random
from pathlib import Path

import pytest

from helpers import invoke, kantian_text
from kantai_batch.decoding import LOW_CONFIDENCE, detect_encoding, read_lines

# The case: only 0x97 (an em dash in Windows-1252) is non-ASCII; cp775 reads it as 'Ś'.
TWO_WAYS = "Human reason is in two ways\u2014either by concepts or by intuitions\u2014bound to experience."


def _detected(path: Path):
    return detect_encoding(lambda: path.open("rb"), "auto", str(path))


def _decoded(path: Path, encoding) -> str:
    return "\n".join(read_lines(path, encoding))


def _plain(paragraphs: int, seed: int = 0) -> str:
    """English prose with no character outside ASCII."""
    return kantian_text(paragraphs, seed).replace("\u2014", "-").replace("\u201c", '"').replace("\u201d", '"')


def _expected(text: str) -> str:
    return "\n".join(line.strip() for line in text.replace("\r\n", "\n").split("\n")).strip("\n")


@pytest.mark.parametrize("newline", ["\n", "\r\n"])
@pytest.mark.parametrize(
    "text",
    [
        pytest.param(TWO_WAYS + "\n", id="one-line-em-dash"),
        pytest.param(f"{_plain(3)}\n{TWO_WAYS}\n", id="short-em-dash"),
        pytest.param(f"{_plain(400)}\n{TWO_WAYS}\n\n{_plain(400, 1)}", id="long-em-dash"),
        pytest.param("\n\n".join([TWO_WAYS] * 300) + "\n", id="only-em-dashes"),
        pytest.param(
            "\n\n".join(f"\u201cWhat is {w}?\u201d he asked; \u2018{w}\u2019 is a concept." for w in ["time"] * 50),
            id="only-curly-quotes",
        ),
        pytest.param(
            f"{_plain(30)}\nCaf\u00e9 na\u00efve \u00fcber se\u00f1or \u00e0 la fa\u00e7on\u2014{TWO_WAYS}\n",
            id="latin-1-accents-and-dashes",
        ),
        pytest.param(
            f"{_plain(30)}\n\u201cQuoted\u201d \u2013 en dash \u2026 and \u00e9t\u00e9\n", id="mixed-typography"
        ),
    ],
)
def test_western_typography_decodes_as_windows_1252(tmp_path: Path, text: str, newline: str):
    path = tmp_path / "text.txt"
    path.write_bytes(text.replace("\n", newline).encode("cp1252"))
    decoding = _detected(path)
    assert (decoding.encoding, decoding.detected) == ("cp1252", True)
    assert decoding.confidence >= LOW_CONFIDENCE and not decoding.low_confidence
    decoded = _decoded(path, decoding)
    assert decoded == _expected(text)
    assert "\u015a" not in decoded and decoding.undecodable_chars == 0


def test_high_bytes_after_the_old_detection_sample_are_seen(tmp_path: Path):
    # More than 4 MiB of ASCII before the first high byte: a head-only sample would call it ASCII/UTF-8.
    head = _plain(6000).encode("ascii") * 5
    assert len(head) > 4 << 20
    path = tmp_path / "late.txt"
    path.write_bytes(head + f"\n{TWO_WAYS}\nCaf\u00e9 \u201cfin\u201d\n".encode("cp1252"))
    decoding = _detected(path)
    assert decoding.encoding == "cp1252"
    lines = list(read_lines(path, decoding))
    assert lines[-2:] == [TWO_WAYS, "Caf\u00e9 \u201cfin\u201d"]
    assert decoding.undecodable_chars == 0


def test_utf8_with_one_bad_byte_at_the_very_end_is_not_utf8(tmp_path: Path):
    path = tmp_path / "almost.txt"
    path.write_bytes(("Gr\u00fc\u00dfe aus K\u00f6nigsberg.\n" * 1000).encode("cp1252") + b"end\x97\n")
    assert _detected(path).encoding == "cp1252"


@pytest.mark.parametrize(
    ("name", "data", "encoding"),
    [
        ("utf8.txt", f"Gr\u00fc\u00dfe {TWO_WAYS} \u65e5\u672c\n".encode(), "utf_8"),
        ("ascii.txt", b"plain ascii text\n", "utf_8"),
        ("utf8-bom.txt", f"\ufeffGr\u00fc\u00dfe {TWO_WAYS}\n".encode(), "utf_8_sig"),
        ("utf16le.txt", f"\ufeffGr\u00fc\u00dfe {TWO_WAYS}\r\n".encode("utf-16-le"), "utf_16"),
        ("utf16be.txt", f"\ufeffGr\u00fc\u00dfe {TWO_WAYS}\n".encode("utf-16-be"), "utf_16"),
        ("utf32.txt", f"Gr\u00fc\u00dfe {TWO_WAYS}\n".encode("utf-32"), "utf_32"),
        (
            "latin1.txt",
            "Caf\u00e9 na\u00efve \u00fcber se\u00f1or \u00e0 la fa\u00e7on.\n".encode("latin-1") * 20,
            "cp1252",
        ),
        ("cp1252.txt", f"{TWO_WAYS}\r\n\u201cquoted\u201d\r\n".encode("cp1252") * 20, "cp1252"),
    ],
)
def test_each_file_of_a_mixed_folder_decodes_right(tmp_path: Path, name: str, data: bytes, encoding: str):
    path = tmp_path / name
    path.write_bytes(data)
    decoding = _detected(path)
    assert decoding.encoding == encoding
    text = _decoded(path, decoding)
    expected = data.decode({"latin1.txt": "latin-1", "cp1252.txt": "cp1252"}.get(name, decoding.encoding))
    assert text == _expected(expected.lstrip("\ufeff"))
    assert decoding.undecodable_chars == 0


def test_cyrillic_code_page_is_not_mistaken_for_windows_1252(tmp_path: Path):
    path = tmp_path / "ru.txt"
    text = "Привет, мир. Это русский текст, который достаточно длинный для проверки.\n" * 50
    path.write_bytes(text.encode("cp1251"))
    decoding = _detected(path)
    assert decoding.encoding != "cp1252"
    assert _decoded(path, decoding) == _expected(text)


def _prepare(run_dir: Path, corpus: Path, *extra: str, expect: int = 0):
    return invoke("prepare", "--run-dir", str(run_dir), "--corpus", str(corpus), *extra, expect=expect)


def test_low_confidence_choice_is_logged_and_recorded(tmp_path: Path, caplog: pytest.LogCaptureFixture):
    rng = random.Random(3)
    words = "Zażółć gęślą jaźń świetnie łódź płynie rzece wiele słów polskie znaki ćma źdźbło".split()
    paragraphs = [" ".join(rng.choice(words) for _ in range(40)) for _ in range(60)]
    corpus = tmp_path / "pl.txt"
    corpus.write_bytes("\n\n".join(paragraphs).encode("cp1250"))
    with caplog.at_level(logging.INFO):
        _prepare(tmp_path / "run", corpus)
    stats = json.loads((tmp_path / "run" / "corpus" / "stats.json").read_text())
    assert stats["encoding"] == "cp1250"
    assert stats["encoding_confidence"] < LOW_CONFIDENCE and stats["encoding_low_confidence"] is True
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("low confidence" in message and str(corpus) in message for message in warnings)


def test_forced_encoding_wins_and_undecodable_examples_are_recorded(tmp_path: Path):
    corpus = tmp_path / "two-ways.txt"
    corpus.write_bytes("\n\n".join(f"{i}. {TWO_WAYS}" for i in range(40)).encode("cp1252"))
    _prepare(tmp_path / "run", corpus, "--set", "corpus.encoding=utf-8")
    stats = json.loads((tmp_path / "run" / "corpus" / "stats.json").read_text())
    assert (stats["encoding"], stats["encoding_detected"], stats["encoding_confidence"]) == ("utf-8", False, None)
    assert stats["undecodable_chars"] == 80
    assert stats["undecodable_examples"][0] == "0. Human reason is in two ways\ufffdeither by concepts or by intu"
    assert 0 < len(stats["undecodable_examples"]) <= 5


def test_detected_windows_1252_in_stats(tmp_path: Path):
    corpus = tmp_path / "two-ways.txt"
    paragraphs = [text for i in range(30) for text in (_plain(2, i), f"{i}: {TWO_WAYS}")]
    corpus.write_bytes("\r\n\r\n".join(paragraphs).encode("cp1252"))
    _prepare(tmp_path / "run", corpus)
    stats = json.loads((tmp_path / "run" / "corpus" / "stats.json").read_text())
    assert (stats["encoding"], stats["encoding_method"], stats["undecodable_chars"]) == ("cp1252", "cp1252", 0)
    assert stats["encoding_confidence"] >= LOW_CONFIDENCE and stats["undecodable_examples"] == []
    text = "".join((tmp_path / "run" / "corpus" / n).read_text(encoding="utf-8") for n in ("train.txt", "eval.txt"))
    assert "in two ways\u2014either" in text and "\u015a" not in text


def test_utf8_with_a_stray_byte_stays_utf8_and_reports_it(tmp_path: Path):
    path = tmp_path / "stray.txt"
    path.write_bytes(
        ("Gr\u00fc\u00dfe aus K\u00f6nigsberg \u2014 \u00e9t\u00e9.\n" * 200).encode() + b"one stray \x97 byte\n"
    )
    decoding = _detected(path)
    assert (decoding.encoding, decoding.method) == ("utf_8", "utf-8")
    assert 0.99 < decoding.confidence < 1.0
    lines = list(read_lines(path, decoding))
    assert lines[0] == "Gr\u00fc\u00dfe aus K\u00f6nigsberg \u2014 \u00e9t\u00e9."
    assert (decoding.undecodable_chars, decoding.undecodable_examples) == (1, ["one stray \ufffd byte"])


def test_utf8_whose_only_non_ascii_is_a_replacement_character_is_utf8(tmp_path: Path):
    path = tmp_path / "replaced.txt"
    path.write_bytes(("an earlier tool lost this: \ufffd\n" * 50).encode())
    decoding = _detected(path)
    assert (decoding.encoding, decoding.confidence) == ("utf_8", 1.0)


def test_binary_without_bytes_undefined_in_windows_1252_is_still_refused(tmp_path: Path):
    from kantai_batch.errors import InputDataError

    rng = random.Random(0)
    alphabet = [0, *range(0x20, 0x7F), *range(0xA0, 0x100)]  # Windows-1252 defines every one of these
    path = tmp_path / "blob.bin"
    path.write_bytes(bytes(rng.choice(alphabet) for _ in range(50_000)))
    with pytest.raises(InputDataError, match="cannot detect a text encoding"):
        _detected(path)


def test_the_verdict_on_stray_bytes_does_not_depend_on_where_they_sit(tmp_path):
    """2,400 stray Windows-1252 quotes in 1.2 MB, 60,000 UTF-8 accents after or before them: UTF-8 with the
    quotes replaced either way (counting stopped at the first thousand errors, before the accents)."""
    from kantai_batch.decoding import detect_encoding

    padding = " and so on" * 100
    legacy = "\n".join(f"\u201cQuoted {i}\u201d, said the critic{padding}." for i in range(1200)).encode("cp1252")
    modern = "\n".join(f"Caf\u00e9 na\u00efve r\u00e9sum\u00e9 {i} \u00e9t\u00e9" for i in range(10_000)).encode()
    verdicts = set()
    for name, data in (("first", legacy + b"\n" + modern), ("last", modern + b"\n" + legacy)):
        (tmp_path / name).write_bytes(data)
        verdicts.add(detect_encoding(lambda name=name: (tmp_path / name).open("rb"), "auto", name).encoding)
    assert len(verdicts) == 1 and codecs.lookup(verdicts.pop()).name == "utf-8"
