"""From corpus text to training samples: tokenization, the two dataset modes, fixed eval masks.

``packed`` (the default) unwraps each paragraph, joins paragraphs with ``</s>`` and cuts the token
stream into full blocks of ``block_size``, each ``<s> … </s>``, like RoBERTa's FULL-SENTENCES input
and run_mlm.py's group_texts. ``line_by_line`` is the recipe's LineByLineTextDataset: one sample per
non-empty line, truncated to ``block_size`` and padded per batch.

For masked LM evaluation, samples are masked once, with a fixed seed, when they are built, so eval
loss compares like with like across steps, resumed runs and separate ``evaluate`` calls.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from kantai_batch.errors import InputDataError
from kantai_batch.job import Job

log = logging.getLogger(__name__)

_PARALLEL_FROM_EXAMPLES = 100_000
_MAX_TOKENIZE_WORKERS = 8


def build_split(path: Path, job: Job, tokenizer, *, fix_masks: bool, what: str):
    """Tokenize one text file (a prepared split) into a ``datasets.Dataset`` of samples.

    ``fix_masks`` masks every sample once, for masked-LM evaluation.
    """
    from datasets import load_dataset
    from transformers.utils import logging as hf_logging

    sample_by = "paragraph" if job.data.mode == "packed" else "line"
    raw = load_dataset("text", data_files={"corpus": str(path)}, sample_by=sample_by, split="corpus")
    raw = raw.filter(lambda row: bool(row["text"].strip()), desc=f"{what}: drop blank lines")
    # Worker processes pay off only on large corpora (the twcs CSV has millions of examples); on a
    # book they cost more to start than they save.
    workers = min(_MAX_TOKENIZE_WORKERS, os.cpu_count() or 1) if len(raw) >= _PARALLEL_FROM_EXAMPLES else None
    block = job.data.block_size
    # Long paragraphs exceed model_max_length before they are cut into blocks; the warning is noise.
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        if job.data.mode == "packed":
            samples = raw.map(
                _pack,
                batched=True,
                remove_columns=raw.column_names,
                fn_kwargs={"tokenizer": tokenizer, "block_size": block},
                num_proc=workers,
                desc=f"{what}: tokenize and pack into blocks of {block}",
            )
        else:
            samples = raw.map(
                lambda batch: tokenizer(
                    batch["text"], truncation=True, max_length=block, return_special_tokens_mask=True
                ),
                batched=True,
                remove_columns=raw.column_names,
                num_proc=workers,
                desc=f"{what}: tokenize line by line",
            )
    finally:
        hf_logging.set_verbosity(verbosity)
    if len(samples) == 0:
        tokens = sum(len(ids) for ids in tokenizer(list(raw["text"]), add_special_tokens=False)["input_ids"])
        raise InputDataError(
            f"{what} {path} is too small for one block: {tokens} tokens, data.block_size is {block}; "
            "use a larger corpus or a smaller data.block_size"
        )
    if fix_masks:
        samples = mask_once(samples, job, tokenizer, what)
    return samples


def _pack(batch: dict[str, list[str]], tokenizer, block_size: int) -> dict[str, list[list[int]]]:
    stream: list[int] = []
    for ids in tokenizer([text.replace("\n", " ") for text in batch["text"]], add_special_tokens=False)["input_ids"]:
        stream.extend(ids)
        stream.append(tokenizer.eos_token_id)
    body = block_size - 2
    # The tail shorter than a block is dropped, as group_texts does: a padded block wastes compute.
    blocks = [
        [tokenizer.bos_token_id, *stream[start : start + body], tokenizer.eos_token_id]
        for start in range(0, len(stream) - body + 1, body)
    ]
    special = [[1] + [0] * body + [1] for _ in blocks]
    return {"input_ids": blocks, "attention_mask": [[1] * block_size for _ in blocks], "special_tokens_mask": special}


def mask_once(samples, job: Job, tokenizer, what: str):
    from transformers import DataCollatorForLanguageModeling

    masker = DataCollatorForLanguageModeling(tokenizer, mlm_probability=job.train.mlm_probability, seed=job.train.seed)

    def mask(example: dict[str, Any]) -> dict[str, list[int]]:
        batch = masker([example])
        return {key: value[0].tolist() for key, value in batch.items()}

    return samples.map(mask, remove_columns=samples.column_names, desc=f"{what}: fix evaluation masks")
