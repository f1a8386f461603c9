"""From corpus text to training samples: tokenization, the three dataset modes, fixed eval masks.

``packed`` (the default) unwraps each paragraph, joins paragraphs with ``</s>`` and cuts the token
stream into full blocks of ``block_size``, each ``<s> … </s>``, like RoBERTa's FULL-SENTENCES input.
``grouped`` unwraps each paragraph too but frames each one ``<s> … </s>`` before the stream is cut,
as run_mlm.py / run_clm.py's group_texts frame each text: every paragraph starts after ``<s>``, as a
prompt does in ``generate``, and a block starts wherever the cut falls. ``line_by_line`` is the
recipe's LineByLineTextDataset: one sample per non-empty line, truncated to ``block_size`` and padded
per batch.

Corpus text is text: a literal ``<s>`` or ``<mask>`` in it (HTML's strike-through, a paper about masked
LMs) is tokenized as the characters it is, not as the special token; only a conversation corpus's
separator, which prepare put there, stays one.

For masked LM evaluation, samples are masked once, with a fixed seed, when they are built, so eval
loss compares like with like across steps, resumed runs and separate ``evaluate`` calls.

The ``tokenize`` phase builds both splits once into ``RUN/tokens/``; ``load_samples`` is how pretrain
and evaluate read them back (memory-mapped) and how they refuse samples made for other settings.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

from kantai_batch.errors import InputDataError, unusable_as
from kantai_batch.job import Job
from kantai_batch.rundir import RunDir, identity

log = logging.getLogger(__name__)

_PARALLEL_FROM_EXAMPLES = 100_000
_MAX_TOKENIZE_WORKERS = 8
# The modes whose every sample is exactly block_size tokens: their tail shorter than a block is dropped.
FULL_BLOCK_MODES = ("packed", "grouped")
# Paragraphs packed together (datasets' default map batch); each run of them drops its last partial block.
_PACK_ROWS = 1000
# How eval masks are drawn: per sample from (seed, index) since version 2 (one shared stream before).
EVAL_MASKS = 2
# Packed blocks since version 2: every <s> and </s> in a block is marked special (the </s> between two
# paragraphs was masked and scored like a word), and a causal LM's block ends on text, not on an
# added </s> it would learn to predict at every block's end.
PACKING = 2
# Special-token strings in the text were the special tokens before version 2 (see the module's doc).
LITERALS = 2


def part_rows(rows: int, index: int, count: int) -> range:
    """The rows of part ``index`` of ``count``: whole runs of _PACK_ROWS, so a part packs the blocks one process
    cuts from the same rows, and the parts in order are every row once."""
    runs = -(-rows // _PACK_ROWS)
    start, stop = (runs * i // count * _PACK_ROWS for i in (index, index + 1))
    return range(min(start, rows), min(stop, rows))


def build_split(
    path: Path,
    job: Job,
    tokenizer,
    *,
    fix_masks: bool,
    what: str,
    workers: int | None = None,
    part: tuple[int, int] | None = None,
    name: str | None = None,
):
    """Tokenize one text file (a prepared split) into a ``datasets.Dataset`` of samples.

    ``fix_masks`` masks every sample once, for masked-LM evaluation. ``workers`` processes tokenize it
    (default: several only on a large corpus); the samples are the same for any number. ``part``
    (index, count) makes only that part's samples (``part_rows``), which may be none: whether the
    whole split has a block is for whoever joins the parts to say. ``name`` is what messages call
    the text (the user's file, where ``path`` is a decoded copy of it).
    """
    from datasets import load_dataset
    from transformers.utils import logging as hf_logging

    sample_by = "line" if job.data.mode == "line_by_line" else "paragraph"
    raw = load_dataset("text", data_files={"corpus": str(path)}, sample_by=sample_by, split="corpus")
    raw = raw.filter(lambda row: bool(row["text"].strip()), desc=f"{what}: drop blank lines")
    if part is not None:
        raw = raw.select(part_rows(len(raw), *part))
    # Worker processes pay off only on large corpora (the twcs CSV has millions of examples); on a
    # book they cost more to start than they save.
    if workers is None:
        workers = min(_MAX_TOKENIZE_WORKERS, os.cpu_count() or 1) if len(raw) >= _PARALLEL_FROM_EXAMPLES else 1
    workers = workers if workers > 1 else None
    block = job.data.block_size
    separator = job.corpus.separator if job.corpus.conversation else None
    # Long paragraphs exceed model_max_length before they are cut into blocks; the warning is noise.
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        if job.data.mode != "line_by_line":
            # Tokenizing is per paragraph, so it runs in any number of processes; packing cuts each run
            # of _PACK_ROWS paragraphs into blocks and drops its tail, so it stays in one process with
            # the same cuts whatever the number of workers.
            ids = raw.map(
                _token_ids,
                batched=True,
                remove_columns=raw.column_names,
                fn_kwargs={"tokenizer": tokenizer, "separator": separator},
                num_proc=workers,
                desc=f"{what}: tokenize",
            )
            packed = job.data.mode == "packed"
            ends = {"bos": tokenizer.bos_token_id, "eos": tokenizer.eos_token_id, "block_size": block}
            samples = ids.map(
                _pack if packed else _group,
                batched=True,
                batch_size=_PACK_ROWS,
                remove_columns=ids.column_names,
                fn_kwargs={**ends, "close": job.task == "mlm"} if packed else ends,
                desc=f"{what}: {job.data.mode} into blocks of {block}",
            )
        else:
            samples = raw.map(
                _lines,
                batched=True,
                fn_kwargs={"tokenizer": tokenizer, "separator": separator, "block_size": block},
                remove_columns=raw.column_names,
                num_proc=workers,
                desc=f"{what}: tokenize line by line",
            )
    finally:
        hf_logging.set_verbosity(verbosity)
    if len(samples) == 0 and part is None:
        tokens = sum(len(ids) for ids in encode_text(tokenizer, list(raw["text"]), separator)["ids"])
        raise InputDataError(
            f"{what} {name or path} is too small for one block: {tokens} tokens, data.block_size is {block}; "
            "use a larger corpus or a smaller data.block_size"
        )
    if fix_masks:
        samples = mask_once(samples, job, tokenizer, what)
    return samples


def encode_text(tokenizer, texts: list[str], separator: str | None = None, *, max_length: int | None = None) -> dict:
    """Token ids of ``texts`` with special-token strings in them tokenized as text, ``separator`` excepted.

    Without ``max_length``: ``{"ids": ...}``, the bare ids. With it: each text framed ``<s> … </s>`` and
    cut to ``max_length`` tokens, with its attention and special-tokens masks, as the tokenizer makes
    them. The separator's pieces are tokenized apart and joined by its id, as the tokenizer itself splits
    its added tokens out before the rest, so a conversation tokenizes as it did.
    """
    if max_length is not None and (separator is None or not any(separator in text for text in texts)):
        found = tokenizer(
            texts, truncation=True, max_length=max_length, return_special_tokens_mask=True, split_special_tokens=True
        )
        return {key: found[key] for key in ("input_ids", "attention_mask", "special_tokens_mask")}
    if separator is None:
        return {"ids": tokenizer(texts, add_special_tokens=False, split_special_tokens=True)["input_ids"]}
    pieces = [text.split(separator) for text in texts]
    flat = tokenizer([p for split in pieces for p in split], add_special_tokens=False, split_special_tokens=True)
    joint = tokenizer.convert_tokens_to_ids(separator)
    ids, at = [], 0
    for split in pieces:
        row = list(flat["input_ids"][at])
        for piece in flat["input_ids"][at + 1 : at + len(split)]:
            row += [joint, *piece]
        ids.append(row)
        at += len(split)
    if max_length is None:
        return {"ids": ids}
    framed = [[tokenizer.bos_token_id, *row[: max_length - 2], tokenizer.eos_token_id] for row in ids]
    return {
        "input_ids": framed,
        "attention_mask": [[1] * len(row) for row in framed],
        # Only the framing is special here, as in the tokenizer's own mask: the separator is text to mask.
        "special_tokens_mask": [[1, *[0] * (len(row) - 2), 1] for row in framed],
    }


def _token_ids(batch: dict[str, list[str]], tokenizer, separator: str | None) -> dict[str, list[list[int]]]:
    return encode_text(tokenizer, [text.replace("\n", " ") for text in batch["text"]], separator)


def _lines(batch: dict[str, list[str]], tokenizer, separator: str | None, block_size: int) -> dict[str, list]:
    return encode_text(tokenizer, batch["text"], separator, max_length=block_size)


def _pack(
    batch: dict[str, list[list[int]]], bos: int, eos: int, block_size: int, close: bool = True
) -> dict[str, np.ndarray]:
    """Paragraphs joined by </s> and cut into ``<s> ... </s>`` blocks (``close``: a masked LM's, as
    RoBERTa's FULL-SENTENCES), or ``<s> ...`` blocks ending where the cut falls (a causal LM's: an
    added </s> would be a target at every block's end, mid-sentence)."""
    stream: list[int] = []
    for ids in batch["ids"]:
        stream.extend(ids)
        stream.append(eos)
    body = block_size - 2 if close else block_size - 1
    # The tail shorter than a block is dropped, as group_texts does: a padded block wastes compute.
    rows = len(stream) // body
    cut = np.asarray(stream[: rows * body], dtype=np.int64).reshape(rows, body)
    ends = [np.full((rows, 1), bos), cut] + ([np.full((rows, 1), eos)] if close else [])
    return _blocks(np.hstack(ends), bos, eos)


def _group(batch: dict[str, list[list[int]]], bos: int, eos: int, block_size: int) -> dict[str, np.ndarray]:
    stream: list[int] = []
    for ids in batch["ids"]:
        stream.extend((bos, *ids, eos))
    rows = len(stream) // block_size
    return _blocks(np.asarray(stream[: rows * block_size], dtype=np.int64).reshape(rows, block_size), bos, eos)


def _blocks(blocks: np.ndarray, bos: int, eos: int) -> dict[str, np.ndarray]:
    # Every <s> and </s> is special; corpus text holds neither (encode_text), so the ids tell them apart.
    # Arrays, not lists: datasets stores them as the same columns without a Python int per token.
    special = ((blocks == bos) | (blocks == eos)).astype(np.int64)
    return {"input_ids": blocks, "attention_mask": np.ones_like(blocks), "special_tokens_mask": special}


def mask_once(samples, job: Job, tokenizer, what: str):
    from kantai_batch.masking import Masker

    masker = Masker(tokenizer, job.eval.mlm_probability, job.eval.seed)
    return samples.map(
        masker.mask_lists,
        batched=True,
        with_indices=True,
        remove_columns=samples.column_names,
        desc=f"{what}: fix evaluation masks",
    )


def sample_settings(job: Job, split: str, tokenizer) -> dict[str, Any]:
    """What the samples of ``split`` depend on besides the corpus: ``tokens.json`` records it, readers compare."""
    settings: dict[str, Any] = {"mode": job.data.mode, "block_size": job.data.block_size}
    if job.data.mode == "packed":
        settings.update(packing=PACKING, task=job.task)
    settings["literals"] = LITERALS
    if split == "eval":
        settings["task"] = job.task
        if job.task == "mlm":
            settings.update(mlm_probability=job.eval.mlm_probability, seed=job.eval.seed, masks=EVAL_MASKS)
    return {**settings, "tokenizer_sha256": tokenizer_digest(tokenizer)}


def tokenizer_digest(tokenizer) -> str:
    """A tokenizer's ids: a model saved with the run's tokenizer has the same digest as the run's folder."""
    vocab = sorted(tokenizer.get_vocab().items())
    return hashlib.sha256(json.dumps([vocab, tokenizer.all_special_tokens]).encode()).hexdigest()


def tokens_mismatch(run: RunDir, job: Job, split: str, tokenizer) -> str | None:
    """Why the committed samples of ``split`` do not fit ``job`` and ``tokenizer``; None when they do."""
    with _damaged_tokens(run):
        stats = json.loads(run.tokens_stats.read_text(encoding="utf-8"))
        made = stats["splits"][split]["settings"]
    wanted = sample_settings(job, split, tokenizer)
    changed = [
        "another tokenizer" if key == "tokenizer_sha256" else f"{key} {made.get(key)} -> {wanted[key]}"
        for key in wanted
        if made.get(key) != wanted[key]
    ]
    # A reader need not have the corpus (pretrain does not mirror it), only its manifest to compare.
    corpus = corpus_digest(run)
    made_from = stats.get("corpus_sha256")
    if corpus is not None and made_from != corpus and made_from != corpus_digest(run, legacy=True):
        changed.append("another corpus")
    return ", ".join(changed) if changed else None


def corpus_digest(run: RunDir, *, legacy: bool = False, as_read: bool = False) -> str | None:
    """The committed corpus's identity (``rundir.identity``) as one digest; None where the run has no corpus.
    ``as_read``: the corpus this process read (``RunDir.marker_as_read``), not the one committed now."""
    found = run.marker_as_read(run.corpus) if as_read else run.marker(run.corpus)
    if not found:
        return None
    return hashlib.sha256(json.dumps(identity("corpus", found, legacy=legacy), sort_keys=True).encode()).hexdigest()


def load_samples(run: RunDir, job: Job, split: str, tokenizer):
    """The committed samples of ``split``, memory-mapped from the Arrow shards in ``RUN/tokens/``.

    ``run.require(run.tokens, ...)`` must have made them local. Samples made for other settings or
    another tokenizer are refused rather than trained on.
    """
    from datasets import load_from_disk

    mismatch = tokens_mismatch(run, job, split, tokenizer)
    if mismatch:
        raise InputDataError(
            f"tokens {run.uri(run.tokens)} were made for other settings ({mismatch}): run `kantai-batch tokenize` again"
        )
    with _damaged_tokens(run):
        return load_from_disk(str(run.tokens / split))


def _damaged_tokens(run: RunDir):
    """A committed tokens folder that cannot be read (damaged on this disk since its manifest was written)."""
    return unusable_as(f"tokens {run.uri(run.tokens)}", "delete it and run `kantai-batch tokenize` again")
