from __future__ import annotations

from pathlib import Path

import pytest
import torch

from helpers import TINY, prepared_run
from kantai_batch.data import build_split
from kantai_batch.errors import InputDataError
from kantai_batch.job import load_job
from kantai_batch.model import load_tokenizer
from kantai_batch.objective import LabelledCollator


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory, corpus_file: Path) -> Path:
    return prepared_run(tmp_path_factory.mktemp("data"), corpus_file)


def _build(run_dir: Path, *overrides: str, split: str = "train.txt", evaluation: bool = False):
    job = load_job(None, [*TINY, *overrides])
    tokenizer = load_tokenizer(run_dir / "tokenizer")
    return job, tokenizer, build_split(run_dir / "corpus" / split, job, tokenizer, fix_masks=evaluation, what="split")


def test_packed_blocks_are_full_and_framed(prepared: Path):
    job, tokenizer, samples = _build(prepared)
    assert len(samples) > 50
    for ids in samples["input_ids"]:
        assert len(ids) == job.data.block_size
        assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id
        assert tokenizer.pad_token_id not in ids
    text = tokenizer.decode(samples["input_ids"][1], skip_special_tokens=False)
    assert "\n" not in text, "wrapped lines are joined into paragraphs"
    assert "</s>" in "".join(tokenizer.decode(ids) for ids in samples["input_ids"][:5]), "paragraphs are separated"
    # Every </s> is special, the one between two paragraphs too: masking never picks it, nor evaluation.
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    assert [[int(t in (bos, eos)) for t in ids] for ids in samples["input_ids"]] == samples["special_tokens_mask"]
    assert sum(ids[1:-1].count(eos) for ids in samples["input_ids"]) > 0, "some blocks hold a paragraph end"
    scored = _build(prepared, split="eval.txt", evaluation=True)[2]
    assert not any(label == eos for labels in scored["labels"] for label in labels)


def test_a_causal_lms_packed_blocks_end_where_the_cut_falls(prepared: Path):
    job, tokenizer, samples = _build(prepared, "task=clm")
    masked = _build(prepared)[2]
    eos = tokenizer.eos_token_id
    assert all(len(ids) == job.data.block_size and ids[0] == tokenizer.bos_token_id for ids in samples["input_ids"])
    # No </s> added at the cut: a closing one only where a paragraph ends there.
    assert sum(ids[-1] != eos for ids in samples["input_ids"]) > len(samples) * 0.9
    # The same stream, one more token of text a block.
    text = [t for ids in samples["input_ids"] for t in ids[1:]]
    assert (
        text[: 10 * job.data.block_size]
        == [t for ids in masked["input_ids"] for t in ids[1:-1]][: len(text)][: 10 * job.data.block_size]
    )


def test_line_by_line_makes_one_sample_per_line(prepared: Path):
    job, tokenizer, samples = _build(prepared, "data.mode=line_by_line")
    lines = [line for line in (prepared / "corpus" / "train.txt").read_text().splitlines() if line.strip()]
    assert len(samples) == len(lines)
    assert tokenizer.decode(samples["input_ids"][0], skip_special_tokens=True) == lines[0]
    assert max(len(ids) for ids in samples["input_ids"]) <= job.data.block_size


def test_padding_is_never_a_target(prepared: Path):
    job, tokenizer, samples = _build(prepared, "data.mode=line_by_line")
    collate = LabelledCollator(tokenizer, "mlm", 0.5)
    batch = collate([samples[i] for i in range(16)])
    pad = batch["input_ids"] == tokenizer.pad_token_id
    assert pad.any(), "lines differ in length, so the batch is padded"
    assert (batch["labels"][pad] == -100).all()
    assert (batch["labels"] != -100).any()


def test_eval_masks_are_fixed_and_about_the_configured_share(prepared: Path):
    _, tokenizer, first = _build(prepared, split="eval.txt", evaluation=True)
    _, _, second = _build(prepared, split="eval.txt", evaluation=True)
    assert first["labels"] == second["labels"] and first["input_ids"] == second["input_ids"]
    labels = torch.tensor(first["labels"])
    share = (labels != -100).float().mean().item()
    assert 0.10 < share < 0.20
    batch = LabelledCollator(tokenizer, "mlm", 0.15)([first[i] for i in range(4)])
    assert torch.equal(batch["labels"], labels[:4]), "evaluation batches keep their fixed masks"


def test_corpus_too_small_for_one_block(prepared: Path):
    with pytest.raises(InputDataError, match="too small for one block: .* data.block_size is 64"):
        job = load_job(None, [*TINY, "data.block_size=64", "model.max_position_embeddings=66"])
        tiny_text = prepared / "tiny.txt"
        tiny_text.write_text("Too short.\n")
        build_split(tiny_text, job, load_tokenizer(prepared / "tokenizer"), fix_masks=False, what="train split")


def test_grouped_blocks_frame_every_paragraph(prepared: Path):
    job, tokenizer, samples = _build(prepared, "data.mode=grouped")
    packed = _build(prepared)[2]
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    assert all(len(ids) == job.data.block_size and tokenizer.pad_token_id not in ids for ids in samples["input_ids"])
    stream = [token for ids in samples["input_ids"] for token in ids]
    assert stream[0] == bos
    # Every paragraph end is followed by the next one's start, across block boundaries too.
    ends = [i for i, token in enumerate(stream[:-1]) if token == eos]
    assert ends and all(stream[i + 1] == bos for i in ends)
    assert sum(ids[0] != bos for ids in samples["input_ids"]) > len(samples) // 2, "blocks start where the cut falls"
    assert [[int(t in (bos, eos)) for t in ids] for ids in samples["input_ids"]] == samples["special_tokens_mask"]
    # The same paragraphs as packed, with one more token each: about as many blocks.
    assert abs(len(samples) - len(packed)) <= len(packed) // 5
    first = (prepared / "corpus" / "train.txt").read_text().strip().split("\n\n")[0]
    assert tokenizer.decode(stream[1 : ends[0]]) == first.replace("\n", " "), "a paragraph, its lines unwrapped"


LITERALS = "The tag <s> strikes text out; BERT fills a <mask>, skips <pad> and stops at </s> here."


@pytest.mark.floors
@pytest.mark.parametrize("mode", ["packed", "grouped", "line_by_line"])
def test_special_token_strings_in_the_text_are_text(prepared: Path, mode: str):
    job = load_job(None, [*TINY, f"data.mode={mode}"])
    tokenizer = load_tokenizer(prepared / "tokenizer")
    text = prepared / f"literals-{mode}.txt"
    text.write_text((LITERALS + "\n\n") * 40)
    samples = build_split(text, job, tokenizer, fix_masks=False, what="split")
    special = set(tokenizer.all_special_ids)
    framing = {tokenizer.bos_token_id, tokenizer.eos_token_id}
    for ids, marked in zip(samples["input_ids"], samples["special_tokens_mask"], strict=True):
        assert not (set(ids) & special) - framing, "no <mask> or <pad> comes from the text"
        assert [int(t in framing) for t in ids] == marked
    if mode == "line_by_line":
        # One <s> and one </s> a line, the frame's: the line's own are characters.
        bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
        assert all(ids.count(bos) == 1 == ids.count(eos) for ids in samples["input_ids"])
        assert LITERALS.startswith(tokenizer.decode(samples["input_ids"][0][1:-1]))
        assert "<s>" in tokenizer.decode(samples["input_ids"][0][1:-1]), "cut at the block, after the text's <s>"
    else:
        stream = [t for ids in samples["input_ids"] for t in ids]
        # One </s> a paragraph (packed adds one more at each block's end): the text's </s> is not one.
        paragraph_ends = stream.count(tokenizer.eos_token_id) - (len(samples) if mode == "packed" else 0)
        words = len(tokenizer(LITERALS, add_special_tokens=False, split_special_tokens=True)["input_ids"]) + 1
        assert paragraph_ends == pytest.approx(len(stream) / words, abs=len(samples) + 1)
        text = tokenizer.decode([t for t in stream if t not in framing])
        assert "BERT fills a <mask>, skips <pad> and stops at </s> here." in text


def test_a_conversations_separator_stays_one_token(tmp_path: Path):
    from helpers import SUPPORT_JOB, SUPPORT_OVERRIDES, support_conversations, twcs_csv
    from kantai_batch.data import encode_text

    run = prepared_run(
        tmp_path / "run",
        twcs_csv(tmp_path / "twcs.csv", support_conversations(300)),
        *SUPPORT_OVERRIDES,
        job=SUPPORT_JOB,
    )
    job = load_job(Path(SUPPORT_JOB), [*TINY, *SUPPORT_OVERRIDES])
    tokenizer = load_tokenizer(run / "tokenizer")
    separator = job.corpus.separator
    lines = [line for line in (run / "corpus" / "train.txt").read_text().splitlines() if separator in line][:50]
    assert len(lines) == 50
    # Without special-token strings of its own, a conversation tokenizes as the tokenizer tokenizes it.
    assert encode_text(tokenizer, lines, separator)["ids"] == tokenizer(lines, add_special_tokens=False)["input_ids"]
    framed = encode_text(tokenizer, lines, separator, max_length=16)
    expected = tokenizer(lines, truncation=True, max_length=16, return_special_tokens_mask=True)
    assert framed == {key: expected[key] for key in framed}
    # With some, only the separator is special.
    ids = encode_text(tokenizer, [f"my <mask> is late {separator} sorry </s> <s>"], separator)["ids"][0]
    assert ids.count(tokenizer.convert_tokens_to_ids(separator)) == 1
    assert not set(ids) & set(tokenizer.all_special_ids) - {tokenizer.convert_tokens_to_ids(separator)}
    # (The job's cleaner, its tokenizer's normalizer, leaves letters only: what stays of "<mask>" is "mask".)
    assert "mask" in tokenizer.decode(ids)
