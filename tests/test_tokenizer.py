from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from helpers import invoke, prepared_run, tiny
from kantai_batch.manifest import MARKER


@pytest.fixture(scope="module")
def tokenizer_run(tmp_path_factory: pytest.TempPathFactory, corpus_file: Path) -> Path:
    return prepared_run(tmp_path_factory.mktemp("tok"), corpus_file)


@pytest.mark.floors
def test_writes_the_recipe_files_and_a_loadable_tokenizer(tokenizer_run: Path):
    folder = tokenizer_run / "tokenizer"
    for name in ("vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json", "_COMPLETE"):
        assert (folder / name).is_file(), name
    vocab = json.loads((folder / "vocab.json").read_text())
    assert [vocab[t] for t in ("<s>", "<pad>", "</s>", "<unk>", "<mask>")] == [0, 1, 2, 3, 4]
    assert 256 < len(vocab) <= 1000


@pytest.mark.floors
def test_auto_tokenizer_gets_roberta_post_processing(tokenizer_run: Path):
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_run / "tokenizer"))
    assert tokenizer.model_max_length == 512
    ids = tokenizer("Human thinking involves human reason.")["input_ids"]
    assert ids[0] == tokenizer.bos_token_id == 0 and ids[-1] == tokenizer.eos_token_id == 2
    assert tokenizer.decode(ids, skip_special_tokens=True) == "Human thinking involves human reason."
    assert tokenizer.pad_token_id == 1 and tokenizer.mask_token_id == 4


@pytest.mark.floors
def test_mask_token_absorbs_the_space_before_it(tokenizer_run: Path):
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_run / "tokenizer"))
    tokens = lambda text: tokenizer.convert_ids_to_tokens(tokenizer(text)["input_ids"])  # noqa: E731
    plain = tokens("Human thinking involves human reason.")
    # " reason" is one piece with its leading space ("Ġreason"); the mask must stand for it whole,
    # not leave a lone "Ġ" before it as a plain added token would.
    assert "Ġreason" in plain
    assert tokens("Human thinking involves human <mask>.") == ["<mask>" if t == "Ġreason" else t for t in plain]


def test_undecodable_bytes_never_become_unknown_tokens(tokenizer_run: Path):
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_run / "tokenizer"))
    ids = tokenizer("Königsberg \u2014 \u201cnoumenon\u201d \U0001f914", add_special_tokens=False)["input_ids"]
    assert tokenizer.unk_token_id not in ids
    assert tokenizer.decode(ids) == "Königsberg \u2014 \u201cnoumenon\u201d \U0001f914"


def test_needs_a_prepared_corpus(tmp_path: Path):
    result = invoke("train-tokenizer", "--run-dir", str(tmp_path), expect=3)
    assert "run `kantai-batch prepare` first" in result.stderr


def test_corrupt_tokenizer_is_a_one_line_error(tmp_path: Path, corpus_file: Path):
    run_dir = prepared_run(tmp_path, corpus_file)
    damaged = run_dir / "tokenizer" / "tokenizer.json"
    damaged.write_text("{not json".ljust(damaged.stat().st_size))  # at its recorded size: read, not refused unread
    result = invoke("pretrain", "--run-dir", str(run_dir), "--no-tracking", expect=3)
    assert f"tokenizer {run_dir / 'tokenizer'} cannot be loaded" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_a_split_within_the_limit_trains_exactly_as_the_recipe_does(tokenizer_run: Path):
    from tokenizers import ByteLevelBPETokenizer

    marker = json.loads((tokenizer_run / "tokenizer" / MARKER).read_text())
    assert marker["training_sample"]["sampled"] is False
    recipe = ByteLevelBPETokenizer()
    recipe.train(
        files=[str(tokenizer_run / "corpus" / "train.txt")], vocab_size=1000, min_frequency=2,
        special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"], show_progress=False,
    )  # fmt: skip
    ours = json.loads((tokenizer_run / "tokenizer" / "vocab.json").read_text())
    assert ours == recipe.get_vocab()


def test_a_split_beyond_the_limit_trains_on_a_uniform_sample(tmp_path: Path, corpus_file: Path):
    run_dir = tmp_path / "run"
    invoke("prepare", "--run-dir", str(run_dir), "--corpus", str(corpus_file))
    split = (run_dir / "corpus" / "train.txt").stat().st_size
    limit = split // 4
    invoke("train-tokenizer", "--run-dir", str(run_dir), *tiny(f"tokenizer.max_training_bytes={limit}"))
    sample = json.loads((run_dir / "tokenizer" / MARKER).read_text())["training_sample"]
    assert sample["sampled"] is True and sample["split_bytes"] == split
    assert 0.5 * limit < sample["bytes"] < 1.5 * limit, sample
    assert 0 < sample["examples"] < sample["examples_in_split"]
    # Again: the same sample, so the same tokenizer.
    first = (run_dir / "tokenizer" / "vocab.json").read_text()
    invoke("train-tokenizer", "--run-dir", str(run_dir), *tiny(f"tokenizer.max_training_bytes={limit}"))
    assert (run_dir / "tokenizer" / "vocab.json").read_text() == first


def test_the_tokenizers_inputs_are_the_corpus_it_got_not_where_it_came_from():
    """train-tokenizer run on its own (the job's default corpus.source) and `run --corpus FILE` trained the
    same tokenizer from the same corpus folder: `run` must not train it again on the name's account."""
    from kantai_batch.fingerprint import fingerprint_of
    from kantai_batch.job import load_job

    default = fingerprint_of(load_job(None, []), "train-tokenizer")
    assert fingerprint_of(load_job(None, ["corpus.source=/data/kant.txt"]), "train-tokenizer") == default
    assert fingerprint_of(load_job(None, ["corpus.encoding=cp1252"]), "train-tokenizer") != default
    assert fingerprint_of(load_job(None, ["corpus.source=/data/kant.txt"]), "prepare") != fingerprint_of(
        load_job(None, []), "prepare"
    )


def test_train_tokenizer_leaves_a_piped_stdout_empty(tmp_path: Path, corpus_file: Path):
    """stdout is for results: the tokenizer trainer's progress bar drew there, and piped it left blank lines."""
    run_dir = tmp_path / "run"
    invoke("prepare", "--run-dir", str(run_dir), "--corpus", str(corpus_file))
    done = subprocess.run(
        [sys.executable, "-m", "kantai_batch", "train-tokenizer", "--run-dir", str(run_dir), *tiny()],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout == ""
    assert (run_dir / "tokenizer" / MARKER).is_file()
