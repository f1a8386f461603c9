"""Masked LM training batches that follow from (seed, epoch, sample index) alone.

The Trainer's default path masks in the collator with the process's RNG, so what a sample looks like
depends on which worker collated it and on everything drawn before: a resumed run masks its first
batches differently from the uninterrupted run. Here the order of an epoch is a permutation seeded by
(seed, epoch), and each sample's masks come from a generator seeded by (seed, epoch, index). So a
resumed run trains on exactly the batches the uninterrupted one would, whatever the number of
dataloader workers, and the fast-forward past the trained batches starts the epoch's order at the
resume point (``order.EpochOrder``): it reads no sample and walks no batch.

Masking is RoBERTa's (BERT's 80/10/10, as ``DataCollatorForLanguageModeling`` does it): each
non-special token is chosen with ``mlm_probability``; a chosen token becomes ``<mask>`` 80% of the
time, a random token 10%, and stays 10%. It runs on whole batches of numpy arrays read from Arrow in
one slice, which also takes the per-token Python work of the stock collator off the data path. The
held-out samples are masked the same way, once, when they are built (``Masker.mask_lists``).

With ``train.mask_frequency_power`` above 0, a token is chosen with a probability of its own instead:
proportional to its train-split count to the power of minus ``power``, scaled so that on average
``mlm_probability`` of the tokens are still chosen (``selection_probabilities``). Frequent tokens
(punctuation, articles) are then predicted less often and content words more, as word2vec subsamples
frequent words; held-out samples keep uniform masking, so their loss still scores every token alike.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from kantai_batch.errors import InputDataError

IGNORE = -100  # the label of a position the loss does not score
_FIELDS = ("input_ids", "attention_mask", "labels")
_COUNT_ROWS = 10_000
# The generator stream of held-out samples: never an epoch, so eval masks are not any epoch's masks.
EVAL_STREAM = 2**32 - 1


class MaskedSamples(Dataset):
    """Training samples (Arrow, memory-mapped) masked per (seed, epoch, index) as they are read.

    ``__getitems__`` reads a batch's rows in one Arrow ``take`` and masks the batch's tokens as one
    flat array; only the uniform draws are per sample, from that sample's own generator. Keys come
    from ``order.EpochOrder``; a plain index (below ``len``) is epoch 0.
    """

    def __init__(self, samples, tokenizer, mlm_probability: float, seed: int, frequency_power: float = 0.0) -> None:
        self.samples = samples.with_format("arrow")
        self.size = len(samples)
        selection = None
        if frequency_power > 0:
            counts = token_counts(samples, len(tokenizer))
            if "special_tokens_mask" not in samples.column_names:
                counts[sorted(tokenizer.all_special_ids)] = 0
            if not counts.any():
                raise InputDataError(
                    "train split: every token is a special token, so train.mask_frequency_power has no token to choose"
                )
            selection = selection_probabilities(counts, mlm_probability, frequency_power)
        self.masker = Masker(tokenizer, mlm_probability, seed, selection)
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
    masks are fixed once when they are built. ``selection``, when given, is each token id's own
    probability of being chosen in place of ``mlm_probability``.
    """

    def __init__(self, tokenizer, mlm_probability: float, seed: int, selection: np.ndarray | None = None) -> None:
        self.mlm_probability = mlm_probability
        self.selection = selection
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
        threshold = self.mlm_probability if self.selection is None else self.selection[ids]
        chosen = (draws[0] < threshold) & ~special
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


def token_counts(samples, vocab: int) -> np.ndarray:
    """How often each token id occurs in ``samples`` (a ``datasets.Dataset``) where masking may choose it
    (outside its ``special_tokens_mask``, when it has one), a batch of rows at a time.

    Iterating (not reading the Arrow table under it) counts only the dataset's rows when it is a
    selection or a shard of a larger table."""
    counts = np.zeros(vocab, dtype=np.int64)
    for rows in samples.with_format("arrow").iter(batch_size=_COUNT_ROWS):
        ids = _flat(rows.column("input_ids"))[0]
        if "special_tokens_mask" in rows.column_names:
            # Only what masking may choose: a special token the samples treat as text (a conversation's
            # separator) counts, the framing does not.
            ids = ids[_flat(rows.column("special_tokens_mask"))[0] == 0]
        counts += np.bincount(ids, minlength=vocab)[:vocab]
    return counts


def selection_probabilities(counts: np.ndarray, rate: float, power: float) -> np.ndarray:
    """Per-token probabilities of being chosen, ``min(1, c * count**-power)``, with ``c`` set so that
    ``rate`` of all occurrences are chosen on average; ids that never occur get 0."""
    seen = counts > 0
    weights = np.zeros(len(counts))
    weights[seen] = counts[seen].astype(np.float64) ** -power
    target = rate * counts.sum()
    # The chosen share grows with c and reaches all occurrences at c = 1 / min weight: bisect for it.
    low, high = 0.0, 1.0 / weights[seen].min()
    for _ in range(100):
        middle = (low + high) / 2
        if (counts * np.minimum(1.0, middle * weights)).sum() < target:
            low = middle
        else:
            high = middle
    return np.minimum(1.0, high * weights)


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
