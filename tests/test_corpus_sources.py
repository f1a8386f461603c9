"""prepare from many files: folders, globs, lists, s3:// prefixes, compressed files, and every format."""

from __future__ import annotations

import bz2
import gzip
import hashlib
import json
import lzma
import sys
from collections import Counter
from pathlib import Path

import boto3
import pytest

from helpers import invoke, kantian_text

TWO_WAYS = "Human reason is in two ways\u2014either by concepts or by intuitions\u2014bound to experience."


def _prepare(run_dir: Path, corpus: str | Path | None, *sets: str, job: Path | None = None, expect: int = 0):
    args = ["prepare", "--run-dir", str(run_dir)]
    if corpus is not None:
        args += ["--corpus", str(corpus)]
    if job is not None:
        args += ["--job", str(job)]
    for value in sets:
        args += ["--set", value]
    return invoke(*args, expect=expect)


def _stats(run_dir: Path) -> dict:
    return json.loads((run_dir / "corpus" / "stats.json").read_text())


def _examples(run_dir: Path) -> dict[str, list[str]]:
    split = {}
    for name in ("train", "eval"):
        text = (run_dir / "corpus" / f"{name}.txt").read_text(encoding="utf-8")
        split[name] = [example.strip() for example in text.split("\n\n") if example.strip()]
    return split


def _all_examples(run_dir: Path) -> Counter[str]:
    split = _examples(run_dir)
    return Counter(split["train"] + split["eval"])


def _paragraphs(text: str) -> list[str]:
    return [p.strip() for p in text.replace("\r\n", "\n").split("\n\n") if p.strip()]


def _one_line_error(result, *names: str) -> str:
    message = result.stderr.strip()
    assert len(message.splitlines()) == 1, message
    for name in names:
        assert name in message, message
    return message


# One folder, one file per encoding; the text is made to need each one (accents, dashes, curly quotes).
_ENCODED = {
    "a-utf8.txt": ("utf-8", "utf_8"),
    "b-utf8-bom.txt": ("utf-8-sig", "utf_8_sig"),
    "c-utf16.txt": ("utf-16", "utf_16"),
    "d-latin1.txt": ("latin-1", "cp1252"),
    "e-cp1252.txt": ("cp1252", "cp1252"),
}


def _text_for(name: str, seed: int) -> str:
    accents = "Caf\u00e9 na\u00efve \u00fcber se\u00f1or \u00e0 la fa\u00e7on."
    extra = accents if name == "d-latin1.txt" else f"{accents} {TWO_WAYS} \u201cquoted\u201d"
    paragraphs = _paragraphs(kantian_text(30, seed=seed).replace("\u2014", "-").replace("\u201c", '"'))
    paragraphs = [p.replace("\u201d", '"') for p in paragraphs]
    return "\n\n".join(f"{extra} ({name} {i})\n{p}" for i, p in enumerate(paragraphs)) + "\n"


@pytest.fixture
def mixed_folder(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    folder = tmp_path / "books"
    texts = {}
    for seed, (name, (codec, _)) in enumerate(_ENCODED.items()):
        path = folder / ("nested" if name.startswith("c") else "") / name
        path.parent.mkdir(parents=True, exist_ok=True)
        texts[name] = _text_for(name, seed)
        newline = "\r\n" if name.startswith("e") else "\n"
        path.write_bytes(texts[name].replace("\n", newline).encode(codec))
    (folder / ".hidden.txt").write_text("a hidden file must not be read\n\nnor this\n")
    (folder / ".git").mkdir()
    (folder / ".git" / "notes.txt").write_text("nor a file in a hidden folder\n")
    (folder / "README.rst").write_text("not a text-format name\n")
    return folder, texts


@pytest.mark.floors
def test_a_folder_of_mixed_encodings_decodes_every_file_right(tmp_path: Path, mixed_folder):
    folder, texts = mixed_folder
    _prepare(tmp_path / "run", folder)
    expected = Counter(p for text in texts.values() for p in _paragraphs(text))
    assert _all_examples(tmp_path / "run") == expected
    stats = _stats(tmp_path / "run")
    names = [Path(entry["name"]).relative_to(folder).as_posix() for entry in stats["files"]]
    assert names == ["a-utf8.txt", "b-utf8-bom.txt", "d-latin1.txt", "e-cp1252.txt", "nested/c-utf16.txt"]
    for entry in stats["files"]:
        path = Path(entry["name"])
        assert entry["encoding"] == _ENCODED[path.name][1]
        assert entry["bytes"] == path.stat().st_size
        assert entry["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
        assert entry["undecodable_chars"] == 0 and entry["examples"] == len(_paragraphs(texts[path.name]))
    digests = "".join(f"{entry['sha256']}\n" for entry in stats["files"])
    assert stats["source_sha256"] == hashlib.sha256(digests.encode()).hexdigest()
    assert stats["source_bytes"] == sum(entry["bytes"] for entry in stats["files"])
    assert (stats["encoding"], stats["source"], stats["undecodable_chars"]) == ("mixed", str(folder), 0)


def test_split_is_the_same_for_the_same_files_in_any_order(tmp_path: Path, mixed_folder):
    folder, _ = mixed_folder
    files = sorted(str(p) for p in folder.rglob("*.txt") if ".git" not in p.parts and not p.name.startswith("."))
    job = tmp_path / "reversed.yaml"
    job.write_text(json.dumps({"corpus": {"source": files[::-1]}}))
    _prepare(tmp_path / "folder", folder)
    _prepare(tmp_path / "list", None, job=job)
    by_folder, by_list = _examples(tmp_path / "folder"), _examples(tmp_path / "list")
    assert sorted(by_folder["eval"]) == sorted(by_list["eval"]) and by_folder["eval"]
    assert sorted(by_folder["train"]) == sorted(by_list["train"])
    assert _stats(tmp_path / "list")["source"] == files[::-1]


def test_globs_select_files_and_a_glob_matching_nothing_is_an_error(tmp_path: Path, mixed_folder):
    folder, texts = mixed_folder
    _prepare(tmp_path / "run", folder / "*-cp1252.txt")
    assert [Path(e["name"]).name for e in _stats(tmp_path / "run")["files"]] == ["e-cp1252.txt"]
    _prepare(tmp_path / "deep", folder / "**" / "c-*.txt")
    assert _all_examples(tmp_path / "deep") == Counter(_paragraphs(texts["c-utf16.txt"]))
    result = _prepare(tmp_path / "none", folder / "*.epub", expect=4)
    _one_line_error(result, str(folder / "*.epub"), "matches no file")


def test_a_folder_with_nothing_to_read_is_an_error_naming_it(tmp_path: Path):
    folder = tmp_path / "csvs"
    folder.mkdir()
    (folder / "a.csv").write_text("text\nhello\n")
    result = _prepare(tmp_path / "run", folder, expect=3)
    _one_line_error(result, str(folder), "no file in this folder fits the format", ".csv")
    empty = tmp_path / "empty"
    (empty / ".cache").mkdir(parents=True)
    (empty / ".cache" / "x.txt").write_text("hidden\n")
    _one_line_error(_prepare(tmp_path / "run", empty, expect=3), str(empty), "no (visible) file")
    assert not (tmp_path / "run" / "corpus").exists()


@pytest.mark.floors
@pytest.mark.parametrize("ending", [".gz", ".bz2", ".xz", ".zst"])
def test_compressed_files_are_streamed(tmp_path: Path, ending: str):
    text = kantian_text(200).replace("\n", "\r\n").encode("cp1252")
    packed = _compress(ending, text)
    if ending == ".zst":  # as `zstd` writes a file fed in pieces, or files concatenated: frame after frame
        packed = _compress(ending, text[:5000]) + _compress(ending, text[5000:])
    source = tmp_path / f"kant.txt{ending}"
    source.write_bytes(packed)
    _prepare(tmp_path / "run", source)
    assert _all_examples(tmp_path / "run") == Counter(_paragraphs(text.decode("cp1252")))
    entry = _stats(tmp_path / "run")["files"][0]
    assert (entry["encoding"], entry["bytes"]) == ("cp1252", len(packed))


def _compress(ending: str, data: bytes) -> bytes:
    if ending == ".zst":
        return pytest.importorskip("zstandard").ZstdCompressor().compress(data)
    return {".gz": gzip.compress, ".bz2": bz2.compress, ".xz": lzma.compress}[ending](data)


@pytest.mark.parametrize("ending", [".gz", ".bz2", ".xz", ".zst"])
def test_a_truncated_compressed_file_is_a_one_line_error(tmp_path: Path, corpus_file: Path, ending: str):
    _prepare(tmp_path / "run", corpus_file)
    before = (tmp_path / "run" / "corpus" / "train.txt").read_bytes()
    source = tmp_path / f"broken.txt{ending}"
    # Cut in the middle of many paragraphs: a reader that took the cut for the end would keep half.
    packed = _compress(ending, kantian_text(3000).encode())
    source.write_bytes(packed[: len(packed) // 2])
    _one_line_error(_prepare(tmp_path / "run", source, expect=3), str(source), f"not a valid {ending} file")
    assert (tmp_path / "run" / "corpus" / "train.txt").read_bytes() == before, "the previous corpus is kept"


def test_a_json_escape_of_half_a_character_is_counted_as_undecodable(tmp_path: Path):
    rows = [json.dumps({"text": f"Record {i}. {TWO_WAYS}"}) for i in range(60)]
    rows.append('{"text": "a tweet cut inside an emoji \\ud83d, then more words"}')  # as twitter dumps have
    source = tmp_path / "docs.jsonl"
    source.write_text("\n".join(rows) + "\n", encoding="utf-8")
    _prepare(tmp_path / "run", source, "corpus.format=jsonl")
    examples = _all_examples(tmp_path / "run")
    assert examples["a tweet cut inside an emoji \ufffd, then more words"] == 1 and len(examples) == 61
    assert _stats(tmp_path / "run")["undecodable_chars"] == 1


def test_lines_format_makes_one_example_per_line(tmp_path: Path):
    source = tmp_path / "lines.txt"
    lines = [f"line {i}: {TWO_WAYS}" for i in range(100)]
    source.write_bytes(("\r\n\r\n".join(lines[:10]) + "\r\n" + "\r\n".join(lines[10:])).encode("cp1252"))
    _prepare(tmp_path / "run", source, "corpus.format=lines")
    assert _all_examples(tmp_path / "run") == Counter(lines)


def _records(count: int) -> list[dict]:
    return [{"id": i, "text": f"Document {i}.\n\n{TWO_WAYS}\n  Caf\u00e9 {i}.  "} for i in range(count)]


def test_jsonl_takes_the_field_and_counts_what_it_skips(tmp_path: Path):
    rows = [json.dumps(record, ensure_ascii=False) for record in _records(60)]
    rows += ["{not json", "[1, 2]", json.dumps({"body": "no text field"}), json.dumps({"text": 42})]
    rows += [json.dumps({"text": None}), json.dumps({"text": " \n\t "}), ""]
    rows += ['{"text": "deep", "meta": ' + "[" * 100_000 + "]" * 100_000 + "}"]  # past the interpreter's stack
    source = tmp_path / "docs.jsonl.gz"
    source.write_bytes(gzip.compress("\n".join(rows).encode("utf-8")))
    _prepare(tmp_path / "run", source, "corpus.format=jsonl")
    expected = [f"Document {i}.\n{TWO_WAYS}\nCaf\u00e9 {i}." for i in range(60)]
    assert _all_examples(tmp_path / "run") == Counter(expected)
    stats = _stats(tmp_path / "run")
    skipped = {"invalid_json": 2, "not_an_object": 1, "missing_field": 1, "not_a_string": 1}
    assert stats["skipped"] == {**skipped, "null_field": 1, "empty_text": 1}
    assert stats["files"][0]["examples"] == 60 and stats["files"][0]["encoding"] == "utf_8"


def test_jsonl_without_the_field_names_the_file_and_its_fields(tmp_path: Path):
    source = tmp_path / "docs.jsonl"
    source.write_text("\n".join(json.dumps({"id": i, "body": "x"}) for i in range(5)) + "\n")
    result = _prepare(tmp_path / "run", source, "corpus.format=jsonl", expect=3)
    _one_line_error(result, str(source), "no record has a 'text' field", "'id', 'body'")


def test_a_jsonl_record_with_a_huge_integer_elsewhere_keeps_its_text(tmp_path: Path):
    source = tmp_path / "docs.jsonl"
    rows = [f'{{"id": {"9" * 5000}, "text": "Reason judges {i}."}}' for i in range(20)]
    source.write_text("\n".join([*rows, f'{{"text": -{"1" * 5000}}}']) + "\n")
    _prepare(tmp_path / "run", source, "corpus.format=jsonl")
    assert _all_examples(tmp_path / "run") == Counter(f"Reason judges {i}." for i in range(20))
    assert _stats(tmp_path / "run")["skipped"] == {"not_a_string": 1}


def test_a_json_document_given_as_jsonl_is_named_as_not_json_lines(tmp_path: Path):
    source = tmp_path / "docs.jsonl"
    source.write_text(json.dumps([{"text": f"Document {i}."} for i in range(5)], indent=2))
    result = _prepare(tmp_path / "run", source, "corpus.format=jsonl", expect=3)
    _one_line_error(result, str(source), "none of its 17 lines is a JSON object", "one object per line")


def test_csv_takes_the_configured_column(tmp_path: Path):
    import csv
    import io

    buffer = io.StringIO(newline="")
    writer = csv.writer(buffer)
    writer.writerow(["id", "body"])
    for record in _records(50):
        writer.writerow([record["id"], record["text"]])
    buffer.write("99,too,many\n")
    source = tmp_path / "docs.csv"
    source.write_bytes(buffer.getvalue().encode("cp1252"))
    _prepare(tmp_path / "run", source, "corpus.format=csv", "corpus.text_field=body")
    assert _all_examples(tmp_path / "run") == Counter(f"Document {i}.\n{TWO_WAYS}\nCaf\u00e9 {i}." for i in range(50))
    stats = _stats(tmp_path / "run")
    assert stats["skipped"] == {"wrong_field_count": 1} and stats["encoding"] == "cp1252"
    result = _prepare(tmp_path / "other", source, "corpus.format=csv", expect=3)
    _one_line_error(result, str(source), "no 'text' column", "'id', 'body'")


def test_parquet_reads_the_column_in_batches(tmp_path: Path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    texts = [record["text"] for record in _records(3000)] + [None]
    pq.write_table(
        pa.table({"id": list(range(len(texts))), "text": texts}), tmp_path / "docs.parquet", row_group_size=500
    )
    pq.write_table(pa.table({"text": [1, 2]}), tmp_path / "numbers.parquet")
    folder = tmp_path / "data"
    folder.mkdir()
    (tmp_path / "docs.parquet").rename(folder / "docs.parquet")
    _prepare(tmp_path / "run", folder, "corpus.format=parquet")
    assert _all_examples(tmp_path / "run") == Counter(f"Document {i}.\n{TWO_WAYS}\nCaf\u00e9 {i}." for i in range(3000))
    assert _stats(tmp_path / "run")["skipped"] == {"null_field": 1}
    (tmp_path / "numbers.parquet").rename(folder / "numbers.parquet")
    _prepare(tmp_path / "run2", folder, "corpus.format=parquet")
    assert _stats(tmp_path / "run2")["files"][1]["skipped"] == {"not_a_string": 2}
    result = _prepare(tmp_path / "run3", folder, "corpus.format=parquet", "corpus.text_field=body", expect=3)
    _one_line_error(result, str(folder / "docs.parquet"), "no 'body' column", "'id', 'text'")
    not_parquet = tmp_path / "fake.parquet"
    not_parquet.write_text("hello")
    result = _prepare(tmp_path / "run4", not_parquet, "corpus.format=parquet", expect=3)
    _one_line_error(result, str(not_parquet), "not a readable parquet file")


def test_text_field_is_refused_for_formats_without_fields(tmp_path: Path, corpus_file: Path):
    result = _prepare(tmp_path / "run", corpus_file, "corpus.text_field=body", expect=2)
    _one_line_error(result, "text_field only applies to formats jsonl, csv, parquet")


def test_an_s3_prefix_reads_every_object_under_it(tmp_path: Path, bucket: str):
    client = boto3.client("s3")
    texts = {f"books/{name}": kantian_text(40, seed=i) for i, name in enumerate(["b.txt", "a.txt", "sub/c.txt.gz"])}
    for key, text in texts.items():
        body = gzip.compress(text.encode("cp1252")) if key.endswith(".gz") else text.encode("cp1252")
        client.put_object(Bucket=bucket, Key=key, Body=body)
    client.put_object(Bucket=bucket, Key="books/.hidden.txt", Body=b"hidden\n\nhidden too\n")
    client.put_object(Bucket=bucket, Key="other/d.txt", Body=b"not under the prefix\n\nnope\n")
    _prepare(tmp_path / "run", f"s3://{bucket}/books/")
    assert _all_examples(tmp_path / "run") == Counter(p for text in texts.values() for p in _paragraphs(text))
    names = [entry["name"] for entry in _stats(tmp_path / "run")["files"]]
    assert names == [f"s3://{bucket}/books/{name}" for name in ["a.txt", "b.txt", "sub/c.txt.gz"]]
    result = _prepare(tmp_path / "empty", f"s3://{bucket}/nothing/", expect=4)
    _one_line_error(result, f"s3://{bucket}/nothing/", "no object under this prefix")


def test_a_file_whose_name_looks_like_a_glob_is_read_as_itself(tmp_path: Path):
    source = tmp_path / "notes [draft].txt"
    source.write_text(kantian_text(60))
    _prepare(tmp_path / "run", source)
    assert _stats(tmp_path / "run")["files"][0]["name"] == str(source)


def test_a_missing_s3_object_is_exit_4_naming_it(tmp_path: Path, bucket: str):
    result = _prepare(tmp_path / "run", f"s3://{bucket}/corpora/missing.txt", expect=4)
    _one_line_error(result, f"s3://{bucket}/corpora/missing.txt", "does not exist")


@pytest.mark.slow
def test_evaluate_reads_a_compressed_corpus_like_the_plain_one(trained_run: Path, tmp_path: Path):
    from helpers import tiny

    plain = tmp_path / "held-out.txt"
    plain.write_bytes(kantian_text(40, seed=7).replace("\n", "\r\n").encode("cp1252"))
    packed = tmp_path / "held-out.txt.xz"
    packed.write_bytes(lzma.compress(plain.read_bytes()))
    scores = []
    for corpus in (plain, packed):
        args = ["--run-dir", str(tmp_path / "run"), "--model", str(trained_run / "model"), "--corpus", str(corpus)]
        result = invoke("evaluate", *args, "--json", *tiny())
        scores.append(json.loads(result.stdout))
    assert scores[0]["eval_loss"] == scores[1]["eval_loss"] and scores[0]["samples"] == scores[1]["samples"] > 0


def test_evaluate_reads_a_folder_or_glob_as_the_help_offers(trained_run: Path, tmp_path: Path):
    """evaluate --corpus took a file only: a folder was "not a file" (exit 3), a glob that matched files
    "does not exist" (exit 4, which a scheduler retries)."""
    from helpers import tiny

    folder = tmp_path / "held-out"
    folder.mkdir()
    (folder / "a.txt").write_text(kantian_text(20, seed=7))
    (folder / "b.txt").write_text(kantian_text(20, seed=8))
    whole = tmp_path / "whole.txt"
    whole.write_text((folder / "a.txt").read_text() + "\n" + (folder / "b.txt").read_text())
    scores = []
    for corpus in (whole, folder, folder / "*.txt"):
        args = ["--run-dir", str(tmp_path / "run"), "--model", str(trained_run / "model"), "--corpus", str(corpus)]
        scores.append(json.loads(invoke("evaluate", *args, "--json", *tiny()).stdout))
    assert scores[0]["eval_loss"] == scores[1]["eval_loss"] == scores[2]["eval_loss"]
    assert scores[0]["samples"] == scores[1]["samples"] == scores[2]["samples"] > 0


def test_zst_without_zstandard_is_a_one_line_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setitem(sys.modules, "zstandard", None)  # what an environment without the package sees
    source = tmp_path / "kant.txt.zst"
    source.write_bytes(b"(\xb5/\xfd" + b"\x00" * 16)
    result = _prepare(tmp_path / "run", source, expect=2)
    _one_line_error(result, str(source), "needs the zstandard package")


def test_a_folder_reads_through_symlinked_folders_and_each_real_file_once(tmp_path: Path):
    store = tmp_path / "store"
    (store / "volume-2").mkdir(parents=True)
    (store / "volume-2" / "b.txt").write_text(kantian_text(40, seed=2))
    books = tmp_path / "books"
    books.mkdir()
    (books / "a.txt").write_text(kantian_text(40, seed=1))
    (books / "a-again.txt").symlink_to(books / "a.txt")
    (books / "volume-2").symlink_to(store / "volume-2")
    (books / "volume-2" / "loop").symlink_to(books)  # a link back up must not walk forever
    _prepare(tmp_path / "run", books)
    names = [Path(entry["name"]).relative_to(books).as_posix() for entry in _stats(tmp_path / "run")["files"]]
    assert names == ["a-again.txt", "volume-2/b.txt"]
    expected = _paragraphs(kantian_text(40, seed=1)) + _paragraphs(kantian_text(40, seed=2))
    assert _all_examples(tmp_path / "run") == Counter(expected)


def test_a_file_named_twice_in_a_list_is_read_once(tmp_path: Path, mixed_folder):
    folder, texts = mixed_folder
    job = tmp_path / "twice.yaml"
    job.write_text(json.dumps({"corpus": {"source": [str(folder / "e-cp1252.txt"), str(folder), f"{folder}/*.txt"]}}))
    _prepare(tmp_path / "run", None, job=job)
    assert _all_examples(tmp_path / "run") == Counter(p for text in texts.values() for p in _paragraphs(text))
    names = [Path(entry["name"]).name for entry in _stats(tmp_path / "run")["files"]]
    assert names == ["e-cp1252.txt", "a-utf8.txt", "b-utf8-bom.txt", "d-latin1.txt", "c-utf16.txt"]


@pytest.mark.floors
def test_a_zst_file_of_repetitive_text_is_read_in_bounded_memory(tmp_path: Path):
    """zstandard hands back all that the compressed bytes it is given hold: a megabyte of them was the whole
    of 100 MB of repeated lines at once."""
    import tracemalloc

    from kantai_batch.sources import decompressed

    zstandard = pytest.importorskip("zstandard")
    source = tmp_path / "repeated.txt.zst"
    line = b"Reason is the faculty of principles, and the understanding that of rules.\n"
    with source.open("wb") as raw, zstandard.ZstdCompressor().stream_writer(raw) as packed:
        for _ in range(100):
            packed.write(line * (1_000_000 // len(line)))
    assert source.stat().st_size < 100_000
    tracemalloc.start()
    try:
        read = 0
        with decompressed(source, source.name) as stream:
            while chunk := stream.read(1 << 16):
                read += len(chunk)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert read > 99_000_000 and peak < 40_000_000, f"{peak / 1e6:.0f} MB held at once"


@pytest.mark.parametrize("reverse", [False, True])
def test_which_path_names_a_linked_folder_does_not_depend_on_the_listing_order(tmp_path: Path, monkeypatch, reverse):
    """A folder and a link to it: the files are read once, under the same name whatever order the file
    system lists them in (tmpfs lists by creation, ext4 by hash), so the corpus is the same everywhere."""
    import os

    from kantai_batch import sources

    (tmp_path / "books" / "vol").mkdir(parents=True)
    (tmp_path / "books" / "vol" / "book.txt").write_text("Reason.\n")
    (tmp_path / "books" / "a-link").symlink_to(tmp_path / "books" / "vol")
    (tmp_path / "books" / "m.txt").write_text("Nature.\n")
    real = os.scandir

    class Listed:  # os.walk's scandir (an iterator and a context), in the order another file system gives
        def __init__(self, path):
            with real(path) as scan:
                self._entries = iter(sorted(scan, key=lambda entry: entry.name, reverse=reverse))

        def __iter__(self):
            return self

        def __next__(self):
            return next(self._entries)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(os, "scandir", Listed)
    found = [path.relative_to(tmp_path / "books").as_posix() for path in sources._visible_files(tmp_path / "books")]
    assert sorted(found) == ["a-link/book.txt", "m.txt"]
