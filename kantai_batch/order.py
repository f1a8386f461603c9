"""The order of training samples: a permutation per (seed, epoch), and a resume that starts inside it.

The Trainer's default sampler draws the order from a generator, so a resumed run can only find its
place by drawing again through every batch it already trained on (accelerate's
``skip_first_batches``). Here the order of an epoch is ``EpochOrder``: a permutation seeded by
(seed, epoch), so the place of batch ``i`` is known without a walk and a resume starts the epoch at
it (``fast_forward``). Masked LM samples are masked by the same key (``masking.MaskedSamples``);
causal LM samples are read by it unchanged (``EpochRows``).
"""

from __future__ import annotations

import numpy as np
from accelerate import skip_first_batches
from accelerate.data_loader import BatchSamplerShard
from torch.utils.data import Dataset, Sampler

_ORDER_SLICE = 65_536  # keys an epoch's order turns into Python ints at a time
_MODEL_INPUTS = ("input_ids", "attention_mask")


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


class EpochRows(Dataset):
    """Samples read as they are by ``EpochOrder`` keys (``epoch * n + index``): the causal LM's.

    Only the model's inputs are kept: the Trainer drops other columns from a ``datasets.Dataset`` by
    itself, not from a dataset wrapped like this one.
    """

    def __init__(self, samples) -> None:
        self.samples = samples.select_columns([c for c in _MODEL_INPUTS if c in samples.column_names])
        self.size = len(samples)

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, key: int) -> dict:
        return self.__getitems__([key])[0]

    def __getitems__(self, keys: list[int]) -> list[dict]:
        return self.samples.__getitems__([key % self.size for key in keys])


def fast_forward(dataloader, num_batches: int = 0):
    """accelerate's ``skip_first_batches`` for a loader over ``EpochOrder``: the same batches, no walk.

    Each process's batch ``i`` is the global batch ``i * processes + rank`` of the epoch's order, so
    ``num_batches`` trained on every process are the order's first ``num_batches * batch * processes``
    samples.
    """
    batches, processes = getattr(dataloader, "batch_sampler", None), 1
    if isinstance(batches, BatchSamplerShard):
        if batches.split_batches:
            return skip_first_batches(dataloader, num_batches)
        batches, processes = batches.batch_sampler, batches.num_processes
    order = getattr(batches, "sampler", None)
    if not isinstance(order, EpochOrder) or getattr(batches, "batch_size", None) is None:
        return skip_first_batches(dataloader, num_batches)
    order.start_at(num_batches * batches.batch_size * processes)
    return dataloader
