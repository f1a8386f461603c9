"""Masked LM training batches from (seed, epoch, index): the same sample masks the same way wherever it is read,
and a run resumed from a checkpoint trains on exactly the batches of the uninterrupted run."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
from datasets import Dataset
from tokenizers import ByteLevelBPETokenizer
from transformers import PreTrainedTokenizerFast

from helpers import assert_resumed_like_uninterrupted, invoke, killed_after, prepared_run, record_epoch_starts, tiny
from kantai_batch.errors import InputDataError
from kantai_batch.job import Job
from kantai_batch.masking import IGNORE, MaskedSamples, Masker, collate, selection_probabilities, token_counts
from kantai_batch.throughput import ThroughputCallback

SPECIALS = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(["Human thinking involves human reason."] * 20, vocab_size=300, special_tokens=SPECIALS)
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe._tokenizer, bos_token="<s>", pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
        mask_token="<mask>",
    )  # fmt: skip


def blocks(count: int, length: int = 64, seed: int = 0) -> Dataset:
    ids = np.random.default_rng(seed).integers(5, 300, (count, length))
    ids[:, 0], ids[:, -1] = 0, 2
    special = np.zeros_like(ids)
    special[:, [0, -1]] = 1
    return Dataset.from_dict({"input_ids": ids.tolist(), "special_tokens_mask": special.tolist()})


def test_a_sample_masks_the_same_in_any_batch_and_differently_each_epoch(tokenizer):
    samples = MaskedSamples(blocks(100), tokenizer, 0.15, seed=7)
    alone = samples[42]
    among_others = samples.__getitems__([3, 42, 99])[1]
    assert np.array_equal(alone["input_ids"], among_others["input_ids"])
    assert np.array_equal(alone["labels"], among_others["labels"])
    next_epoch = samples[100 + 42]
    assert not np.array_equal(alone["labels"], next_epoch["labels"])
    other_seed = MaskedSamples(blocks(100), tokenizer, 0.15, seed=8)[42]
    assert not np.array_equal(alone["labels"], other_seed["labels"])


def test_masking_is_robertas_80_10_10_and_never_touches_special_tokens(tokenizer):
    ids = np.asarray(blocks(2000)["input_ids"])
    batch = collate(MaskedSamples(blocks(2000), tokenizer, 0.15, seed=0).__getitems__(list(range(2000))), 1, 8)
    labels, inputs = batch["labels"].numpy(), batch["input_ids"].numpy()
    chosen = labels != IGNORE
    assert not chosen[:, [0, -1]].any()
    assert np.array_equal(labels[chosen], ids[chosen])
    assert chosen[:, 1:-1].mean() == pytest.approx(0.15, abs=0.005)
    masked = inputs[chosen] == tokenizer.mask_token_id
    kept = inputs[chosen] == ids[chosen]
    assert masked.mean() == pytest.approx(0.8, abs=0.01)
    assert kept.mean() == pytest.approx(0.1 + 0.1 / len(tokenizer), abs=0.01)
    assert np.array_equal(inputs[~chosen], ids[~chosen])


def test_the_random_tenth_of_chosen_tokens_is_swapped_for_tokens_drawn_from_the_vocabulary(tokenizer):
    """RoBERTa's 10% "random token" is a token drawn from the whole vocabulary: one fixed stand-in
    would be just another mask token, and the model would learn it as one."""
    ids = np.asarray(blocks(2000)["input_ids"])
    batch = collate(MaskedSamples(blocks(2000), tokenizer, 0.15, seed=0).__getitems__(list(range(2000))), 1, 8)
    labels, inputs = batch["labels"].numpy(), batch["input_ids"].numpy()
    chosen = labels != IGNORE
    swapped = (inputs[chosen] != tokenizer.mask_token_id) & (inputs[chosen] != ids[chosen])
    assert 0.08 < swapped.mean() < 0.12
    replacements = inputs[chosen][swapped]
    assert len(np.unique(replacements)) > 100, np.unique(replacements)[:10]
    assert replacements.min() >= 0 and replacements.max() < len(tokenizer)


def test_samples_without_a_special_tokens_mask_never_mask_their_special_tokens(tokenizer):
    """Samples tokenized without a special_tokens_mask column: the masker finds <s> and </s> by their ids."""
    rng = np.random.default_rng(0)
    ids = rng.integers(5, 300, (2000, 32))
    ids[:, 0], ids[:, -1] = tokenizer.bos_token_id, tokenizer.eos_token_id
    data = Dataset.from_dict({"input_ids": ids.tolist()})
    batch = collate(MaskedSamples(data, tokenizer, 0.15, seed=0).__getitems__(list(range(2000))), 1, 8)
    labels, inputs = batch["labels"].numpy(), batch["input_ids"].numpy()
    assert not (labels[:, [0, -1]] != IGNORE).any()
    assert np.array_equal(inputs[:, [0, -1]], ids[:, [0, -1]])
    assert (labels[:, 1:-1] != IGNORE).mean() == pytest.approx(0.15, abs=0.005)


def test_frequency_weighted_selection_keeps_the_rate_and_favours_rare_tokens():
    counts = np.array([0, 1000, 100, 10, 1, 0])
    chosen = selection_probabilities(counts, 0.3, 0.5)
    assert (counts * chosen).sum() / counts.sum() == pytest.approx(0.3)
    assert chosen[0] == chosen[5] == 0  # never seen
    assert np.all(np.diff(chosen[1:5]) >= 0) and chosen[1] < 0.3 < chosen[3]
    assert chosen[4] == 1.0  # capped: a probability
    assert chosen[1] / chosen[2] == pytest.approx(10**-0.5)
    assert np.allclose(selection_probabilities(counts, 0.3, 0.0)[1:5], 0.3)


def test_frequency_weighted_masking_chooses_frequent_tokens_less_at_the_same_rate(tokenizer):
    rng = np.random.default_rng(0)
    ids = np.where(rng.random((2000, 64)) < 0.5, 7, rng.integers(20, 280, (2000, 64)))  # token 7: half of all
    ids[:, 0], ids[:, -1] = 0, 2
    special = np.zeros_like(ids)
    special[:, [0, -1]] = 1
    data = Dataset.from_dict({"input_ids": ids.tolist(), "special_tokens_mask": special.tolist()})
    weighted = MaskedSamples(data, tokenizer, 0.3, seed=0, frequency_power=0.5)
    labels = collate(weighted.__getitems__(list(range(2000))), 1, 8)["labels"].numpy()
    chosen = labels != IGNORE
    assert not chosen[:, [0, -1]].any()
    assert chosen[:, 1:-1].mean() == pytest.approx(0.3, abs=0.005)
    assert chosen[ids == 7].mean() < 0.1 < 0.5 < chosen[(ids != 7) & (special == 0)].mean()
    again = weighted.__getitems__([5, 42])[1]
    assert np.array_equal(again["labels"], weighted[42]["labels"])


def test_frequency_weighted_masking_chooses_a_special_token_the_samples_treat_as_text(tokenizer):
    """A conversation's separator is a special token of the tokenizer, but text to the samples (their
    special_tokens_mask leaves it out): uniform masking chooses it, so frequency weighting must too."""
    rng = np.random.default_rng(0)
    ids = rng.integers(20, 280, (2000, 64))
    ids[:, 10], ids[:, 0], ids[:, -1] = 3, 0, 2  # 3 is a special id of the tokenizer, as text here
    special = np.zeros_like(ids)
    special[:, [0, -1]] = 1
    data = Dataset.from_dict({"input_ids": ids.tolist(), "special_tokens_mask": special.tolist()})
    labels = collate(
        MaskedSamples(data, tokenizer, 0.3, seed=0, frequency_power=0.5).__getitems__(list(range(2000))), 1, 8
    )["labels"].numpy()
    assert 0.05 < (labels[:, 10] != IGNORE).mean(), "the separator is never chosen"
    assert not (labels[:, [0, -1]] != IGNORE).any()
    assert token_counts(data, 300)[[0, 2, 3]].tolist() == [0, 0, 2000]


def test_token_counts_count_only_the_rows_a_selection_holds():
    data = Dataset.from_dict({"input_ids": [[0, 5, 5, 2], [0, 6, 2], [0, 7, 7, 7, 2]]})
    assert token_counts(data, 9).tolist() == [3, 0, 3, 0, 0, 2, 1, 3, 0]
    assert token_counts(data.select([2, 1]), 9).tolist() == [2, 0, 2, 0, 0, 0, 1, 3, 0]
    assert token_counts(data.shard(3, 0), 9).tolist() == [1, 0, 1, 0, 0, 2, 0, 0, 0]


def test_frequency_weighted_masking_of_only_special_tokens_is_a_clear_error(tokenizer):
    data = Dataset.from_dict({"input_ids": [[0, 4, 2], [0, 2]]})
    with pytest.raises(InputDataError, match="train split: every token is a special token"):
        MaskedSamples(data, tokenizer, 0.3, seed=0, frequency_power=0.5)


def test_collate_pads_samples_of_different_lengths(tokenizer):
    lines = Dataset.from_dict({"input_ids": [[0, 5, 6, 2], [0, 7, 8, 9, 10, 11, 12, 13, 14, 2]]})
    batch = collate(MaskedSamples(lines, tokenizer, 0.5, seed=0).__getitems__([0, 1]), tokenizer.pad_token_id, 8)
    assert batch["input_ids"].shape == (2, 16)
    assert batch["attention_mask"].sum(dim=1).tolist() == [4, 10]
    assert (batch["input_ids"][0, 4:] == tokenizer.pad_token_id).all()
    assert (batch["labels"][0, 4:] == IGNORE).all()


@pytest.mark.parametrize("task", ["mlm", "clm"])
def test_a_batch_without_padding_reaches_a_compiled_model_without_a_mask(tokenizer, task: str):
    import torch
    from transformers import RobertaConfig

    from kantai_batch.objective import LabelledCollator, model_class

    collator = LabelledCollator(tokenizer, task, 0.3)
    full, lines = blocks(4, length=16), Dataset.from_dict({"input_ids": [[0, 5, 6, 2], [0, 7, 8, 9, 10, 2]]})
    if task == "mlm":
        full, padded = (
            collator(MaskedSamples(d, tokenizer, 0.3, seed=0).__getitems__(list(range(len(d))))) for d in (full, lines)
        )
    else:
        full, padded = (collator([{"input_ids": ids} for ids in d["input_ids"]]) for d in (full, lines))
    assert "attention_mask" not in full and full["input_ids"].shape == (4, 16)
    assert padded["attention_mask"].sum(dim=1).tolist() == [4, 6]

    config = RobertaConfig(vocab_size=300, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                           intermediate_size=64, max_position_embeddings=40, is_decoder=task == "clm")  # fmt: skip
    model = model_class(task)(config).eval()
    graphs = []

    def capture(graph, example_inputs):
        graphs.append(graph)
        return graph.forward

    def attention_masks(batch) -> list:
        graphs.clear()
        torch._dynamo.reset()
        torch.compile(model, backend=capture)(**{k: v for k, v in batch.items() if k != "labels"})
        calls = [n for g in graphs for n in g.graph.nodes if "scaled_dot_product" in str(n.target)]
        assert calls, "no SDPA call traced"
        return [call.kwargs.get("attn_mask") for call in calls]

    # Given even an all-ones mask, the traced model builds one and SDPA gets it: no flash kernel.
    assert attention_masks(full) == [None]
    assert attention_masks({**full, "attention_mask": torch.ones_like(full["input_ids"])}) != [None]


def test_steady_throughput_leaves_out_compilations(monkeypatch: pytest.MonkeyPatch):
    clock = iter([0.0, 0.0, 1.0, 2.0, 32.0, 33.0, 34.0, 35.0])  # train begin, then step ends: one 30 s step
    monkeypatch.setattr("kantai_batch.throughput.time.perf_counter", lambda: next(clock))

    class State:
        num_input_tokens_seen = 0
        global_step = 0

    state = State()
    meter = ThroughputCallback(flops_per_token=1.0, peak_flops=1.0, world_size=1)
    meter.on_train_begin(None, state, None)
    for _ in range(6):
        state.num_input_tokens_seen += 100
        meter.on_step_end(None, state, None)
    summary = meter.summary()
    assert summary["warmup_steps"] == 1 and summary["warmup_seconds"] == 30.0
    assert summary["steady_tokens_per_second"] == pytest.approx(100.0)


@pytest.mark.floors
@pytest.mark.slow
def test_a_resumed_run_trains_on_exactly_the_uninterrupted_batches(
    tmp_path: Path, corpus_file: Path, monkeypatch: pytest.MonkeyPatch
):
    # Batches of 8 over a few hundred blocks: an epoch is a few dozen steps, so step 25 is mid-epoch
    # and the resumed run crosses an epoch boundary before step 60.
    job = tiny("train.max_steps=60", "train.save_steps=25", "train.save_total_limit=5", "train.logging_steps=1")
    whole = prepared_run(tmp_path / "whole", corpus_file)
    invoke("pretrain", "--run-dir", str(whole), "--no-tracking", *job)
    train_blocks = len(Dataset.load_from_disk(str(whole / "tokens" / "train")))
    assert 25 < train_blocks // 8 < 60, train_blocks

    resumed = killed_after(whole, tmp_path / "resumed", 25)
    starts = record_epoch_starts(monkeypatch)
    invoke("pretrain", "--run-dir", str(resumed), "--no-tracking", *job)
    assert_resumed_like_uninterrupted(whole, resumed, resumed_from=25, last=60)
    # The fast-forward started the resumed epoch at its 201st sample rather than walking 200 to it.
    seed = Job().train.seed

    def order(epoch: int) -> np.ndarray:
        return np.random.default_rng([seed, epoch]).permutation(train_blocks) + epoch * train_blocks

    assert starts[:2] == [(0, order(0)[200]), (1, order(1)[0])]


def test_eval_masks_are_per_sample_whatever_the_batching(tokenizer):
    masker = Masker(tokenizer, 0.15, seed=5)
    rows = blocks(40)[:]
    whole = masker.mask_lists(rows, list(range(40)))
    cuts = ((0, 17), (17, 40))
    halves = [masker.mask_lists({k: v[a:b] for k, v in rows.items()}, list(range(a, b))) for a, b in cuts]
    for key in ("input_ids", "labels", "attention_mask"):
        assert whole[key] == halves[0][key] + halves[1][key]
    train_epoch0 = MaskedSamples(blocks(40), tokenizer, 0.15, seed=5).__getitems__(list(range(40)))
    assert any(list(t["labels"]) != e for t, e in zip(train_epoch0, whole["labels"], strict=True))


def test_a_raised_phase_version_changes_its_fingerprint(monkeypatch: pytest.MonkeyPatch):
    from kantai_batch import fingerprint, phases
    from kantai_batch.job import Job

    job = Job()
    raised = fingerprint.fingerprint_of(job, "tokenize")
    first = dataclasses.replace(phases.phase("tokenize"), version=1)
    monkeypatch.setattr(fingerprint, "phase_row", lambda name: first if name == "tokenize" else phases.phase(name))
    assert phases.phase("tokenize").version > 1 and fingerprint.fingerprint_of(job, "tokenize") != raised
