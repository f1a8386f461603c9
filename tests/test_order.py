"""The order of training samples: a permutation per (seed, epoch) that a resume enters at its place,
the same batches accelerate's walk would reach, and a causal LM resumed as exactly as a masked one."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from accelerate import skip_first_batches
from accelerate.data_loader import BatchSamplerShard
from datasets import Dataset
from torch.utils.data import BatchSampler, DataLoader

from helpers import (
    SUPPORT_JOB,
    assert_resumed_like_uninterrupted,
    invoke,
    killed_after,
    record_epoch_starts,
    support_conversations,
    tiny,
    twcs_csv,
)
from kantai_batch.job import load_job
from kantai_batch.order import EpochOrder, EpochRows, fast_forward


def test_epoch_order_is_a_fresh_permutation_per_epoch_carrying_its_epoch():
    order = EpochOrder(50, seed=3)
    first = list(order)
    assert sorted(first) == list(range(50)) and first != list(range(50))
    assert list(order) == first
    order.set_epoch(2)
    second = list(order)
    assert sorted(second) == list(range(100, 150))
    assert [key - 100 for key in second] != first


def test_epoch_order_keeps_its_permutation_and_does_not_list_the_epoch():
    import itertools
    import tracemalloc

    size = 3_000_000
    order = EpochOrder(size, seed=3)
    order.set_epoch(1)
    expected = np.random.default_rng([3, 1]).permutation(size) + size  # the order resumed runs were trained on
    tracemalloc.start()
    try:
        head = list(itertools.islice(iter(order), 1000))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert head == expected[:1000].tolist()
    # The permutation itself (4 bytes a sample) and a slice of keys; a list of the epoch is over 100 MB.
    assert peak < 4 * size + 10_000_000, f"{peak:,} bytes to start an epoch of {size:,}"
    assert np.array_equal(np.fromiter(order, dtype=np.int64, count=size), expected)


def _batches(order: EpochOrder, batch: int, processes: int, rank: int, skip: int = 0, *, fast: bool) -> list[list[int]]:
    """What one process trains on in an epoch over ``order``, after ``skip`` batches: accelerate's shard
    of the order's batches, fast-forwarded by ``fast_forward`` or by accelerate's walk."""
    batches = BatchSampler(order, batch, drop_last=False)
    if processes > 1:
        batches = BatchSamplerShard(batches, num_processes=processes, process_index=rank, even_batches=True)
    loader = DataLoader(range(order.size * (order.epoch + 1)), batch_sampler=batches, collate_fn=list)
    if not skip:
        return list(loader)
    forwarded = fast_forward(loader, skip) if fast else skip_first_batches(loader, skip)
    assert (forwarded is loader) == fast  # no walk: the same loader, its order started further on
    return list(forwarded)


@pytest.mark.parametrize("processes,batch", [(2, 3), (3, 4), (2, 8)])
def test_the_padded_epoch_order_shards_as_accelerate_shards_the_plain_one(processes: int, batch: int):
    for size in (1, 5, 23, 24, 25, 50, 97):
        for rank in range(processes):
            plain = _batches(EpochOrder(size, seed=3), batch, processes, rank, fast=False)
            padded = EpochOrder(size, seed=3, multiple=batch * processes)
            assert len(padded) % (batch * processes) == 0
            assert _batches(padded, batch, processes, rank, fast=False) == plain, (size, rank)


@pytest.mark.parametrize("processes,batch,size", [(1, 8, 203), (2, 3, 50), (3, 4, 97), (2, 8, 25)])
def test_fast_forward_gives_the_batches_accelerates_walk_gives(processes: int, batch: int, size: int):
    multiple = batch * processes if processes > 1 else 1
    for rank in range(processes):

        def order():
            made = EpochOrder(size, seed=3, multiple=multiple)
            made.set_epoch(2)
            return made

        whole = _batches(order(), batch, processes, rank, fast=False)
        for skip in range(1, len(whole)):
            walked = _batches(order(), batch, processes, rank, skip, fast=False)
            assert walked == whole[skip:]
            assert _batches(order(), batch, processes, rank, skip, fast=True) == walked, (rank, skip)
    with pytest.raises(ValueError, match="outside an epoch of 203 samples"):
        EpochOrder(203, seed=3).start_at(204)


def test_epoch_rows_read_a_sample_by_its_key_with_the_model_inputs_only():
    samples = Dataset.from_dict({
        "input_ids": [[0, 5, 2], [0, 6, 7, 2], [0, 8, 2]],
        "attention_mask": [[1] * 3, [1] * 4, [1] * 3],
        "special_tokens_mask": [[1, 0, 1], [1, 0, 0, 1], [1, 0, 1]],
    })  # fmt: skip
    rows = EpochRows(samples)
    assert len(rows) == 3
    assert rows.__getitems__([4, 0]) == [{"input_ids": [0, 6, 7, 2], "attention_mask": [1] * 4},
                                         {"input_ids": [0, 5, 2], "attention_mask": [1] * 3}]  # fmt: skip
    assert rows[5] == {"input_ids": [0, 8, 2], "attention_mask": [1] * 3}


@pytest.mark.slow
def test_a_resumed_causal_lm_trains_on_exactly_the_uninterrupted_batches(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    source = twcs_csv(tmp_path / "twcs.csv", support_conversations(300))
    job = ["--job", SUPPORT_JOB, *tiny("corpus.min_words=10", "train.max_steps=60", "train.save_steps=20",
                                       "train.save_total_limit=5", "train.logging_steps=1")]  # fmt: skip
    whole = tmp_path / "whole"
    invoke("prepare", "--run-dir", str(whole), "--corpus", str(source), *job)
    invoke("train-tokenizer", "--run-dir", str(whole), *job)
    invoke("tokenize", "--run-dir", str(whole), *job)
    invoke("pretrain", "--run-dir", str(whole), "--no-tracking", *job)
    train_samples = len(Dataset.load_from_disk(str(whole / "tokens" / "train")))
    assert 20 < train_samples / 8 < 60, train_samples  # step 20 is mid-epoch; an epoch boundary follows

    resumed = killed_after(whole, tmp_path / "resumed", 20)
    starts = record_epoch_starts(monkeypatch)
    invoke("pretrain", "--run-dir", str(resumed), "--no-tracking", *job)
    assert_resumed_like_uninterrupted(whole, resumed, resumed_from=20, last=60)
    seed = load_job(SUPPORT_JOB).train.seed
    resumed_epoch = np.random.default_rng([seed, 0]).permutation(train_samples)
    assert starts[0] == (0, resumed_epoch[20 * 8]), "the resumed pass starts at its place, without a walk"
