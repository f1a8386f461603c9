"""Masked LM training batches that follow from (seed, epoch, sample index) alone.

The Trainer's default path masks in the collator with the process's RNG, so what a sample looks like
depends on which worker collated it and on everything drawn before: a resumed run masks its first
batches differently from the uninterrupted run. Here the order of an epoch is a permutation seeded by
(seed, epoch), and each sample's masks come from a generator seeded by (seed, epoch, index). So a
resumed run trains on exactly the batches the uninterrupted one would, whatever the number of
dataloader workers, and the fast-forward past the trained batches starts the epoch's order at the
resume point (``EpochOrder.start_at``): it reads no sample and walks no batch.

Masking is RoBERTa's (BERT's 80/10/10, as ``DataCollatorForLanguageModeling`` does it): each
non-special token is chosen with ``mlm_probability``; a chosen token becomes ``<mask>`` 80% of the
time, a random token 10%, and stays 10%. It runs on whole batches of numpy arrays read from Arrow in
one slice, which also takes the per-token Python work of the stock collator off the data path. The
held-out samples are masked the same way, once, when they are built (``Masker.mask_lists``).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

IGNORE = -100  # the label of a position the loss does not score
_FIELDS = ("input_ids", "attention_mask", "labels")
# The generator stream of held-out samples: never an epoch, so eval masks are not any epoch's masks.
EVAL_STREAM = 2**32 - 1
_ORDER_SLICE = 65_536  # keys an epoch's order turns into Python ints at a time


class EpochOrder(Sampler[int]):
    """A fresh permutation per epoch, seeded by (seed, epoch); yields ``epoch * n + index`` keys.

    The key carries the epoch to the dataset, which may live in a persistent dataloader worker that
    never sees ``set_epoch``.

    With ``multiple`` (the global batch of several processes) the epoch is padded to a multiple of it
    by starting the order over, which is what accelerate's ``BatchSamplerShard`` does with the epoch's
    first batches when the last round is short. Done here, the order alone decides every batch, so a
    pass started at the resume point is the uninterrupted pass's rest, tail included.
    """

    def __init__(self, size: int, seed: int, *, multiple: int = 1) -> None:
        self.size = size
        self.seed = seed
        self.multiple = multiple
        self.epoch = 0
        self._start = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.size + (-self.size) % self.multiple

    def start_at(self, position: int) -> None:
        """Begin the next pass at ``position`` of the epoch's order: a resume's fast-forward in O(1)."""
        if not 0 <= position <= len(self):
            raise ValueError(f"resume position {position:,} is outside an epoch of {len(self):,} samples")
        self._start = position

    def __iter__(self):
        start, self._start = self._start, 0
        # The same permutation as ``Generator.permutation(size)`` (the same swaps), in 4 bytes a sample
        # where the corpus allows, and handed out a slice at a time: the epoch as one list of Python
        # ints cost 40 bytes a sample (200 MB for 5 million blocks) before the first step.
        order = np.arange(self.size, dtype=np.int32 if self.size < 2**31 else np.int64)
        np.random.default_rng([self.seed, self.epoch]).shuffle(order)
        if len(self) != self.size:
            order = np.resize(order, len(self))  # repeats the order from its start
        offset = self.epoch * self.size
        for at in range(start, len(order), _ORDER_SLICE):
            yield from (order[at : at + _ORDER_SLICE].astype(np.int64) + offset).tolist()


class MaskedSamples(Dataset):
    """Training samples (Arrow, memory-mapped) masked per (seed, epoch, index) as they are read.

    ``__getitems__`` reads a batch's rows in one Arrow ``take`` and masks the batch's tokens as one
    flat array; only the uniform draws are per sample, from that sample's own generator. Keys come
    from ``EpochOrder``; a plain index (below ``len``) is epoch 0.
    """

    def __init__(self, samples, tokenizer, mlm_probability: float, seed: int) -> None:
        self.samples = samples.with_format("arrow")
        self.size = len(samples)
        self.masker = Masker(tokenizer, mlm_probability, seed)
        self.has_special_mask = "special_tokens_mask" in samples.column_names

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, key: int) -> dict[str, np.ndarray]:
        return self.__getitems__([key])[0]

    def __getitems__(self, keys: list[int]) -> list[dict[str, np.ndarray]]:
        epochs, indices = np.divmod(np.asarray(keys, dtype=np.int64), self.size)
        rows = self.samples[indices.tolist()]
        ids, lengths = _flat(rows.column("input_ids"))
        special = _flat(rows.column("special_tokens_mask"))[0].astype(bool) if self.has_special_mask else None
        inputs, labels = self.masker.mask(ids, lengths, special, epochs, indices)
        bounds = np.cumsum(lengths)[:-1]
        return [
            {"input_ids": sample, "labels": label}
            for sample, label in zip(np.split(inputs, bounds), np.split(labels, bounds), strict=True)
        ]


class Masker:
    """RoBERTa's masking of a batch of samples, each by its own generator seeded by (seed, stream, index).

    The stream is the epoch for training samples and ``EVAL_STREAM`` for the held-out samples, whose
    masks are fixed once when they are built.
    """

    def __init__(self, tokenizer, mlm_probability: float, seed: int) -> None:
        self.mlm_probability = mlm_probability
        self.seed = seed
        self.mask_id = tokenizer.mask_token_id
        self.vocab = len(tokenizer)
        self.special = np.array(sorted(tokenizer.all_special_ids))

    def mask(self, ids, lengths, special, streams, indices) -> tuple[np.ndarray, np.ndarray]:
        """Masked inputs and labels for the flat ``ids`` of samples of ``lengths`` (``special``: None to look up)."""
        if special is None:
            special = np.isin(ids, self.special)
        samples = zip(np.asarray(streams).tolist(), np.asarray(indices).tolist(), lengths.tolist(), strict=True)
        draws = np.concatenate([np.random.default_rng([self.seed, s, i]).random((4, n)) for s, i, n in samples], axis=1)
        chosen = (draws[0] < self.mlm_probability) & ~special
        labels = np.where(chosen, ids, IGNORE)
        masked = chosen & (draws[1] < 0.8)
        # Half of the remaining 20%: a random token; the other half keeps its own.
        randomized = chosen & ~masked & (draws[2] < 0.5)
        inputs = np.where(masked, self.mask_id, ids)
        inputs = np.where(randomized, (draws[3] * self.vocab).astype(np.int64), inputs)
        return inputs, labels

    def mask_lists(self, batch: dict[str, list], indices: list[int]) -> dict[str, list[list[int]]]:
        """``datasets.map(batched=True, with_indices=True)``: a batch of held-out samples, masked for good."""
        lengths = np.array([len(ids) for ids in batch["input_ids"]], dtype=np.int64)
        ids = np.concatenate([np.asarray(row, dtype=np.int64) for row in batch["input_ids"]])
        special = None
        if "special_tokens_mask" in batch:
            special = np.concatenate([np.asarray(row, dtype=bool) for row in batch["special_tokens_mask"]])
        inputs, labels = self.mask(ids, lengths, special, np.full(len(lengths), EVAL_STREAM), indices)
        bounds = np.cumsum(lengths)[:-1]
        return {
            "input_ids": [row.tolist() for row in np.split(inputs, bounds)],
            "attention_mask": [[1] * int(n) for n in lengths],
            "labels": [row.tolist() for row in np.split(labels, bounds)],
        }


def _flat(column) -> tuple[np.ndarray, np.ndarray]:
    """A list column's values as one flat array, and each row's length."""
    lists = column.combine_chunks()
    return lists.flatten().to_numpy().astype(np.int64), lists.value_lengths().to_numpy().astype(np.int64)


def collate(features: list[dict[str, Any]], pad_id: int, multiple: int) -> dict[str, torch.Tensor]:
    """Stacks masked samples (arrays or lists) into tensors, padding to a multiple of ``multiple`` where needed."""
    features = [_arrays(feature) for feature in features]
    longest = max(len(f["input_ids"]) for f in features)
    if all(len(f["input_ids"]) == longest for f in features) and longest % multiple == 0:
        return {key: torch.from_numpy(np.stack([f[key] for f in features]).astype(np.int64)) for key in _FIELDS}
    width = -(-longest // multiple) * multiple
    fill = dict(zip(_FIELDS, (pad_id, 0, IGNORE), strict=True))
    out = {key: np.full((len(features), width), value, dtype=np.int64) for key, value in fill.items()}
    for row, feature in enumerate(features):
        for key in _FIELDS:
            out[key][row, : len(feature[key])] = feature[key]
    return {key: torch.from_numpy(value) for key, value in out.items()}


def _arrays(feature: dict[str, Any]) -> dict[str, np.ndarray]:
    ids = np.asarray(feature["input_ids"], dtype=np.int64)
    attention = feature["attention_mask"] if "attention_mask" in feature else np.ones_like(ids)
    return {"input_ids": ids, "attention_mask": np.asarray(attention), "labels": np.asarray(feature["labels"])}
