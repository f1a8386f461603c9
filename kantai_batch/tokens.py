"""tokenize: both splits' samples, tokenized once into ``RUN/tokens/`` as memory-mapped Arrow shards.

``RUN/tokens/train/`` and ``RUN/tokens/eval/`` are ``datasets`` folders (``save_to_disk``), read back
by pretrain and evaluate with ``load_from_disk``, which memory-maps the shards: no rank tokenizes, and
their start-up time and memory do not grow with the corpus. Eval samples of a masked LM carry their
fixed masks, so every evaluation scores the same masked tokens. ``tokens.json`` records the sample and
token counts and the settings, tokenizer and corpus the samples were made from, which readers check.

``workers`` processes tokenize and write the shards; the samples do not depend on how many. Several
pods (or processes) can each make a part of them and the last one commits the folder: ``tokenize_parts``.
"""

from __future__ import annotations

import logging
from pathlib import Path

from kantai_batch.data import build_split
from kantai_batch.errors import JobConfigError
from kantai_batch.fingerprint import fingerprint_of
from kantai_batch.job import Job
from kantai_batch.model import load_tokenizer
from kantai_batch.rundir import RunDir
from kantai_batch.token_splits import SPLITS, write_splits
from kantai_batch.tokenize_parts import tokenize_part

log = logging.getLogger(__name__)


def tokenize(job: Job, run: RunDir, *, workers: int | None = None, part: int = 0, parts: int = 1) -> Path | None:
    """Tokenize ``RUN/corpus/{train,eval}.txt`` with ``RUN/tokenizer``; return the committed tokens folder.

    With ``parts`` above 1 this process makes only part ``part`` of them (see ``tokenize_parts``) and
    returns the tokens folder only if it was the one that committed it.
    """
    if not 0 <= part < parts:
        raise JobConfigError(f"tokenize: part {part} of {parts} does not exist: parts are numbered 0 to {parts - 1}")
    run.require(run.corpus, "corpus", "prepare")
    tokenizer = load_tokenizer(run.require(run.tokenizer, "tokenizer", "train-tokenizer"))
    workers = workers or job.data.tokenize_workers
    if parts > 1:
        return tokenize_part(job, run, tokenizer, index=part, count=parts, workers=workers)
    texts = {"train": run.train_text, "eval": run.eval_text}
    inputs = fingerprint_of(job, "tokenize", run, as_read=True)
    with run.committed(run.tokens, inputs_sha256=inputs) as out:
        samples = {
            split: build_split(
                texts[split],
                job,
                tokenizer,
                fix_masks=split == "eval" and job.task == "mlm",
                what=f"{split} split",
                workers=workers,
            )
            for split in SPLITS
        }
        write_splits(out, samples, job, run, tokenizer, workers=workers, inputs=inputs)
    return run.tokens
