from __future__ import annotations

import functools
import http.server
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from helpers import KANT, ROOT, invoke, kantian_text, tiny
from kantai_batch.decoding import detect_encoding, read_lines
from kantai_batch.job import load_job
from kantai_batch.manifest import MARKER, read_marker


def _prepare(run_dir: Path, corpus: str | Path, *extra: str, expect: int = 0):
    return invoke("prepare", "--run-dir", str(run_dir), "--corpus", str(corpus), *extra, expect=expect)


def _stats(run_dir: Path) -> dict:
    return json.loads((run_dir / "corpus" / "stats.json").read_text())


def test_windows_1252_crlf_is_detected_and_decoded_losslessly(tmp_path: Path, corpus_file: Path):
    _prepare(tmp_path, corpus_file)
    stats = _stats(tmp_path)
    assert (stats["encoding"], stats["encoding_detected"], stats["undecodable_chars"]) == ("cp1252", True, 0)
    train = (tmp_path / "corpus" / "train.txt").read_bytes().decode("utf-8")
    held_out = (tmp_path / "corpus" / "eval.txt").read_bytes().decode("utf-8")
    assert "\r" not in train + held_out
    assert "\u2014" in train and "\u201c" in train, "dashes and curly quotes must survive"
    assert "\ufffd" not in train + held_out


def test_split_is_disjoint_complete_and_follows_eval_fraction(tmp_path: Path, corpus_file: Path):
    _prepare(tmp_path, corpus_file, "--set", "data.eval_fraction=0.25")
    source = corpus_file.read_bytes().decode("cp1252").replace("\r\n", "\n")
    expected = [p for p in source.split("\n\n") if p.strip()]
    train = (tmp_path / "corpus" / "train.txt").read_text(encoding="utf-8").split("\n\n")
    held_out = (tmp_path / "corpus" / "eval.txt").read_text(encoding="utf-8").split("\n\n")
    train, held_out = [p.strip() for p in train], [p.strip() for p in held_out]
    assert sorted(train + held_out) == sorted(p.strip() for p in expected)
    assert 0.15 < len(held_out) / len(expected) < 0.35
    assert _stats(tmp_path)["eval"]["examples"] == len(held_out)


def test_split_is_deterministic_for_a_seed(tmp_path: Path, corpus_file: Path):
    _prepare(tmp_path / "a", corpus_file)
    _prepare(tmp_path / "b", corpus_file, "--set", "train.seed=7")
    _prepare(tmp_path / "c", corpus_file, "--set", "eval.seed=7")
    read = lambda name: (tmp_path / name / "corpus" / "eval.txt").read_bytes()  # noqa: E731
    assert read("a") == read("b") != read("c")


def test_another_training_seed_reuses_the_split_tokenizer_and_tokens():
    from kantai_batch.fingerprint import fingerprint_of
    from kantai_batch.job import Job

    job = Job()
    reseeded = job.model_copy(update={"train": job.train.model_copy(update={"seed": 7})})
    resplit = job.model_copy(update={"eval": job.eval.model_copy(update={"seed": 7})})
    for phase in ("prepare", "train-tokenizer", "tokenize"):
        assert fingerprint_of(reseeded, phase) == fingerprint_of(job, phase), phase
    assert fingerprint_of(reseeded, "pretrain") != fingerprint_of(job, "pretrain")
    for phase in ("prepare", "tokenize", "evaluate"):
        assert fingerprint_of(resplit, phase) != fingerprint_of(job, phase), phase


@pytest.mark.parametrize("value", ["-1", "4294967296"])
def test_a_seed_numpy_cannot_take_is_a_clear_error(tmp_path: Path, corpus_file: Path, value: str):
    for key in ("train.seed", "eval.seed"):
        result = _prepare(tmp_path, corpus_file, "--set", f"{key}={value}", expect=2)
        assert key in result.output and "Traceback" not in result.output
    assert not (tmp_path / "corpus").exists()


def test_forced_wrong_encoding_reports_undecodable_characters(tmp_path: Path, corpus_file: Path):
    _prepare(tmp_path, corpus_file, "--set", "corpus.encoding=utf-8")
    stats = _stats(tmp_path)
    assert stats["encoding_detected"] is False
    assert stats["undecodable_chars"] > 0


@pytest.mark.parametrize("encoding", ["utf-32", "utf-16", "punycode"])
def test_a_forced_encoding_that_cannot_read_the_file_is_a_one_line_error(
    tmp_path: Path, corpus_file: Path, encoding: str
):
    _prepare(tmp_path, corpus_file)
    before = (tmp_path / "corpus" / "train.txt").read_bytes()
    result = _prepare(tmp_path, corpus_file, "--set", f"corpus.encoding={encoding}", expect=3)
    message = result.stderr.strip()
    assert len(message.splitlines()) == 1 and f"{corpus_file} cannot be decoded as {encoding}" in message
    assert (tmp_path / "corpus" / "train.txt").read_bytes() == before, "the corpus prepared before is kept"


@pytest.mark.parametrize("encoding", ["utf-8", "utf-16-le"])
def test_a_forced_encoding_drops_its_own_byte_order_mark(tmp_path: Path, encoding: str):
    corpus = tmp_path / "bom.txt"
    text = "".join(f"Critique of pure reason, paragraph {i}.\n\n" for i in range(60))
    corpus.write_bytes(("\ufeff" + text).encode(encoding))
    _prepare(tmp_path, corpus, "--set", f"corpus.encoding={encoding}")
    written = [(tmp_path / "corpus" / name).read_text(encoding="utf-8") for name in ("train.txt", "eval.txt")]
    assert "\ufeff" not in "".join(written) and "Critique of pure reason, paragraph 0." in "\n".join(written)


def test_marker_lists_every_file_with_checksums(tmp_path: Path, corpus_file: Path):
    _prepare(tmp_path, corpus_file)
    manifest = read_marker(tmp_path / "corpus")
    assert set(manifest["files"]) == {"train.txt", "eval.txt", "stats.json"}
    assert manifest["files"]["train.txt"]["size"] == (tmp_path / "corpus" / "train.txt").stat().st_size


def test_utf8_bom_removed_and_a_page_break_is_a_space_not_glue(tmp_path: Path):
    corpus = tmp_path / "bom.txt"
    page = "Grüße aus Königsberg, says the critic.\fThe next page\x0bbegins\x85here.\n\f\n"
    corpus.write_bytes("\ufeff".encode() + (page * 40).encode())
    assert detect_encoding(lambda: corpus.open("rb"), "auto", f"corpus {corpus}").encoding == "utf_8_sig"
    lines = list(read_lines(corpus, "utf_8_sig"))
    assert lines[:2] == ["Grüße aus Königsberg, says the critic. The next page begins here.", ""]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "is empty"),
        (b"\r\n \r\n\t\r\n\x0c\r\n" * 10, "has no text"),
        (b"one paragraph only\n", "is one example of 18 characters, which cannot be split"),
        (b"Two paragraphs,\n\nno more.\n", "too small to split"),
    ],
)
def test_unusable_corpus_is_a_one_line_error(tmp_path: Path, content: bytes, message: str):
    corpus = tmp_path / "bad.txt"
    corpus.write_bytes(content)
    result = _prepare(tmp_path / "run", corpus, expect=3)
    assert message in result.stderr and str(corpus) in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "run" / "corpus").exists()
    assert not list((tmp_path / "run").glob(".corpus*")), "no scratch folder may be left behind"


def test_binary_file_is_rejected(tmp_path: Path):
    corpus = tmp_path / "weights.bin"
    corpus.write_bytes(bytes(range(256)) * 64)
    result = _prepare(tmp_path / "run", corpus, expect=3)
    assert "cannot detect a text encoding" in result.stderr


def test_missing_corpus_is_exit_4(tmp_path: Path):
    result = _prepare(tmp_path, tmp_path / "missing.txt", expect=4)
    assert f"corpus {tmp_path / 'missing.txt'} does not exist" in result.stderr


def test_failed_prepare_keeps_the_previous_corpus(tmp_path: Path, corpus_file: Path):
    _prepare(tmp_path, corpus_file)
    before = (tmp_path / "corpus" / "train.txt").read_bytes()
    empty = tmp_path / "empty.txt"
    empty.write_bytes(b"")
    _prepare(tmp_path, empty, expect=3)
    assert (tmp_path / "corpus" / MARKER).is_file()
    assert (tmp_path / "corpus" / "train.txt").read_bytes() == before


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:  # the server's access log would mix into the CLI's stderr
        pass


@pytest.fixture
def http_root(tmp_path: Path) -> Iterator[tuple[Path, str]]:
    root = tmp_path / "www"
    root.mkdir()
    handler = functools.partial(_QuietHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_corpus_from_an_http_url(tmp_path: Path, http_root: tuple[Path, str]):
    root, base = http_root
    (root / "kant.txt").write_bytes(kantian_text(50).encode("cp1252"))
    _prepare(tmp_path / "run", f"{base}/kant.txt")
    assert _stats(tmp_path / "run")["source"] == f"{base}/kant.txt"
    assert (tmp_path / "run" / "corpus" / "train.txt").stat().st_size > 1000


def test_http_404_names_the_url_and_the_local_alternative(tmp_path: Path, http_root: tuple[Path, str]):
    _, base = http_root
    result = _prepare(tmp_path / "run", f"{base}/missing.txt", expect=4)
    error = result.stderr.strip()
    assert len(error.splitlines()) == 1
    assert f"{base}/missing.txt" in error and "HTTP 404" in error and "--corpus PATH" in error


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("https://[::1/kant.txt", "not a valid URL (Invalid IPv6 URL)"),
        ("http://", "not a valid URL (no host)"),
        ("http://localhost:99999/kant.txt", "not a valid URL (Port out of range 0-65535)"),
        ("http://example.com/my kant.txt", "not a valid URL (a space or control character; percent-encode it)"),
    ],
)
def test_a_malformed_url_is_a_job_error_not_retried(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, url, says):
    """An unclosed IPv6 bracket was a traceback; no host or a space was retried three times, then exit 4."""
    monkeypatch.setattr("kantai_batch.sources.time.sleep", lambda _: pytest.fail("retried"))
    result = _prepare(tmp_path / "run", url, expect=2)
    assert result.stderr.strip() == f"kantai-batch: error: corpus {url}: {says}"
    assert not (tmp_path / "run" / "corpus").exists()


def test_unreachable_url_fails_after_bounded_retries(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
):
    monkeypatch.setattr("kantai_batch.sources.time.sleep", lambda _: None)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}/kant.txt"
    result = _prepare(tmp_path / "run", url, expect=4)
    assert url in result.stderr and "download failed" in result.stderr and "CORPUS=PATH" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert sum("retrying" in record.message for record in caplog.records) == 2


class _CuttingHandler(http.server.BaseHTTPRequestHandler):
    """Serves a text whose connection drops mid-body: announced with Content-Length (the first
    ``cuts`` answers) or sent chunked without its last chunk (every answer)."""

    body = b""
    cuts = 0
    answers: list[str] = []

    def do_GET(self) -> None:
        self.answers.append(self.path)
        self.send_response(200)
        if self.path.endswith("chunked.txt"):
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            self.wfile.write(b"%x\r\n%s\r\n" % (100, self.body[:100]))  # and no terminating chunk
        elif self.path.endswith("both.txt"):  # whole, chunked, with a stale length HTTP says to ignore
            self.send_header("Transfer-Encoding", "chunked")
            self.send_header("Content-Length", "123")
            self.end_headers()
            self.wfile.write(b"%x\r\n%s\r\n0\r\n\r\n" % (len(self.body), self.body))
        else:
            self.send_header("Content-Length", str(len(self.body)))
            self.end_headers()
            cut = len(self.answers) <= self.cuts
            self.wfile.write(self.body[: len(self.body) // 3] if cut else self.body)
        self.close_connection = True

    def log_message(self, *args) -> None:
        pass


@pytest.mark.parametrize(
    ("path", "cuts", "expect"), [("kant.txt", 1, 0), ("kant.txt", 9, 4), ("chunked.txt", 0, 4), ("both.txt", 0, 0)]
)
def test_a_download_cut_off_mid_body_is_retried_never_prepared(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, path: str, cuts: int, expect: int
):
    """The connection closing before the announced length ended the stream quietly: a third of the text
    became the corpus. A cut chunked body was a traceback."""
    monkeypatch.setattr("kantai_batch.sources.time.sleep", lambda _: None)
    text = kantian_text(80).encode("cp1252")
    handler = type("Handler", (_CuttingHandler,), {"body": text, "cuts": cuts, "answers": []})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/{path}"
    try:
        result = _prepare(tmp_path / "run", url, expect=expect)
    finally:
        server.shutdown()
    if expect == 0:
        assert len(handler.answers) == cuts + 1, "retried once per cut"
        prepared = "".join((tmp_path / "run" / "corpus" / name).read_text() for name in ("train.txt", "eval.txt"))
        assert sorted(prepared.split()) == sorted(text.decode("cp1252").split()), "the whole text, not a third"
        return
    error = result.stderr.strip().splitlines()[-1]  # below the progress bars
    assert error.startswith(f"kantai-batch: error: corpus {url}: download failed: "), error
    assert len(handler.answers) == 3, "each of the bounded attempts"
    assert not (tmp_path / "run" / "corpus").exists()


@pytest.mark.skipif(not KANT.exists(), reason="../shared/data/kant.txt is not present")
def test_real_kant_text_decodes_without_replacement_characters(tmp_path: Path):
    raw = KANT.read_bytes()
    # The recipe's decoding: UTF-8 with errors="replace" mangles every dash and curly quote.
    assert raw.decode("utf-8", errors="replace").count("\ufffd") == 1736
    _prepare(tmp_path, KANT)
    stats = _stats(tmp_path)
    assert stats["encoding"] == "cp1252" and stats["undecodable_chars"] == 0
    text = "".join((tmp_path / "corpus" / name).read_text(encoding="utf-8") for name in ("train.txt", "eval.txt"))
    assert "\r" not in text and "\ufffd" not in text
    assert text.count("\u2014") == raw.decode("cp1252").count("\u2014") > 1000
    assert "HUMAN REASON, in one sphere of its cognition" in text


@pytest.mark.parametrize("left", [".corpus.partial-999999", ".corpus.old-999999"])
def test_scratch_left_by_a_killed_prepare_is_cleaned_up(tmp_path: Path, corpus_file: Path, left: str):
    # .old: the folder a commit killed between its two renames had retired (a model's is gigabytes).
    stale = tmp_path / left
    stale.mkdir(parents=True)
    (stale / "train.txt").write_text("half")
    _prepare(tmp_path, corpus_file)
    assert not stale.exists()
    assert (tmp_path / "corpus" / MARKER).is_file()


def test_run_prepares_again_when_a_source_file_changes_in_place(tmp_path: Path):
    from kantai_batch.phases import PHASES
    from kantai_batch.pipeline import run_pipeline
    from kantai_batch.rundir import RunDir

    books = tmp_path / "books"
    books.mkdir()
    (books / "a.txt").write_text(kantian_text(60, seed=1))
    run = RunDir(tmp_path / "run")
    job = load_job(None, [], corpus=str(books))
    prepare = PHASES[:1]

    def corpus_text() -> str:
        return "".join((tmp_path / "run" / "corpus" / name).read_text() for name in ("train.txt", "eval.txt"))

    assert run_pipeline(job, run, track=False, phases=prepare) == ["prepare"]
    assert run_pipeline(job, run, track=False, phases=prepare) == [], "nothing changed"
    with (books / "a.txt").open("a") as grown:
        grown.write("\nA paragraph added in place, with the same job.\n")
    assert run_pipeline(job, run, track=False, phases=prepare) == ["prepare"]
    assert "A paragraph added in place" in corpus_text()
    (books / "b.txt").write_text(kantian_text(20, seed=2))
    assert run_pipeline(job, run, track=False, phases=prepare) == ["prepare"], "a new file in the folder"
    (books / "b.txt").unlink()
    assert run_pipeline(job, run, track=False, phases=prepare) == ["prepare"], "a file gone from the folder"
    shutil.rmtree(books)
    assert run_pipeline(job, run, track=False, phases=prepare) == [], "a source gone keeps the prepared corpus"
    assert "A paragraph added in place" in corpus_text()


def test_a_damaged_marker_is_a_one_line_error_naming_it(tmp_path: Path, corpus_file: Path):
    run_dir = tmp_path / "run"
    invoke("prepare", "--run-dir", str(run_dir), "--corpus", str(corpus_file))
    marker = run_dir / "corpus" / MARKER
    marker.write_text('{"files": {"train.txt"', encoding="utf-8")  # cut short by a hand, not by a writer
    failed = invoke("train-tokenizer", "--run-dir", str(run_dir), *tiny(), expect=3)  # input data
    assert (
        failed.stderr.startswith(f"kantai-batch: error: {marker} is not a manifest (")
        and failed.stderr.count("\n") == 1
    )
    assert f"delete {run_dir / 'corpus'} to redo" in failed.stderr
    assert (run_dir / "corpus" / "train.txt").is_file(), "nothing is removed on its account"


@pytest.mark.parametrize("damage", ["deleted", "cut short"])
def test_a_file_gone_from_a_complete_folder_is_a_one_line_error_saying_what_to_redo(
    damage: str, tmp_path: Path, corpus_file: Path
):
    """A file its manifest lists, deleted or cut short by a hand: the next phase read what was left (a model
    "cannot be loaded", a tokenizer trained on half the text) without saying the folder is to be redone."""
    run_dir = tmp_path / "run"
    invoke("prepare", "--run-dir", str(run_dir), "--corpus", str(corpus_file))
    train = run_dir / "corpus" / "train.txt"
    if damage == "deleted":
        train.unlink()
    else:
        train.write_bytes(train.read_bytes()[:100])
    failed = invoke("train-tokenizer", "--run-dir", str(run_dir), *tiny(), expect=3)  # input data
    state = "is missing" if damage == "deleted" else "holds 100 bytes, not the "
    assert failed.stderr.startswith(
        f"kantai-batch: error: {run_dir / 'corpus'}: train.txt, listed by its manifest, {state}"
    )
    assert failed.stderr.count("\n") == 1 and f"delete {run_dir / 'corpus'} to redo" in failed.stderr
    assert not (run_dir / "tokenizer").exists()


def test_a_corpus_that_is_not_a_file_is_unusable_not_unreachable(tmp_path: Path):
    fifo = tmp_path / "pipe.txt"
    os.mkfifo(fifo)
    failed = invoke("prepare", "--run-dir", str(tmp_path / "run"), "--corpus", str(fifo), expect=3)
    assert failed.stderr.strip() == f"kantai-batch: error: corpus {fifo} is not a file"


def test_a_phase_started_twice_on_one_run_dir_leaves_the_first_writer_alone(tmp_path: Path, corpus_file: Path):
    """The second writer of a folder used to delete the first one's scratch folder as a dead writer's."""
    from kantai_batch.manifest import committed_dir

    run_dir = tmp_path / "run"
    with committed_dir(run_dir / "corpus") as scratch:  # the first prepare, still writing
        (scratch / "train.txt").write_text("first writer's\n")
        second = subprocess.run(
            [sys.executable, "-m", "kantai_batch", "prepare", "--run-dir", str(run_dir), "--corpus", str(corpus_file)],
            env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert second.returncode == 4, second.stderr[-2000:]
        assert second.stderr.strip().splitlines()[-1] == (
            f"kantai-batch: error: {run_dir / 'corpus'} is being written by process {os.getpid()} on "
            f"{os.uname().nodename}: wait for it to finish (or stop it) and run this again"
        )
        assert (scratch / "train.txt").read_text() == "first writer's\n"
    assert (run_dir / "corpus" / "train.txt").read_text() == "first writer's\n"
    assert sorted(p.name for p in run_dir.iterdir()) == ["corpus"], "no lock file left behind"
    invoke("prepare", "--run-dir", str(run_dir), "--corpus", str(corpus_file))  # once the first is done


def test_a_folder_committed_again_replaces_the_old_in_one_step(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """The old folder was renamed aside and the new one into place: a pod killed between the two renames
    left no folder at all, and a reader then found nothing."""
    from kantai_batch.manifest import _exchanged, committed_dir

    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    if not _exchanged(tmp_path / "a", tmp_path / "b"):
        pytest.skip("this kernel or filesystem cannot swap two folders in one step (renameat2 RENAME_EXCHANGE)")
    final = tmp_path / "model"
    with committed_dir(final) as scratch:
        (scratch / "weights").write_text("old")

    def killed_between(self, target):
        raise KeyboardInterrupt  # the first rename of the two is where a kill left `model/` missing

    monkeypatch.setattr(Path, "rename", killed_between)
    with committed_dir(final) as scratch:
        (scratch / "weights").write_text("new")
    assert (final / "weights").read_text() == "new" and read_marker(final)["files"]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".model.") and p.name != ".model.lock"] == []


def test_a_folder_committed_over_a_link_leaves_what_it_points_at_whole(tmp_path: Path):
    """Swapped with the link, the old folder's removal followed it and deleted the shared folder's marker."""
    from kantai_batch.manifest import committed_dir

    shared = tmp_path / "shared-tokens"
    with committed_dir(shared) as scratch:
        (scratch / "data.arrow").write_text("tokens")
    final = tmp_path / "run" / "tokens"
    final.parent.mkdir()
    final.symlink_to(shared)
    with committed_dir(final) as scratch:
        (scratch / "data.arrow").write_text("new tokens")
    assert not final.is_symlink() and (final / "data.arrow").read_text() == "new tokens"
    assert (shared / MARKER).is_file() and (shared / "data.arrow").read_text() == "tokens"
    assert sorted(p.name for p in final.parent.iterdir()) == ["tokens"], "no link or scratch left behind"
