"""train-tokenizer: a byte-level BPE tokenizer trained from scratch on the corpus's train split.

Writes ``RUN/tokenizer/`` with the recipe's ``vocab.json`` and ``merges.txt`` and a ``tokenizer.json``
plus config that ``AutoTokenizer.from_pretrained`` loads as a fast tokenizer with RoBERTa's
conventions: ``<s> … </s>`` around every sequence, model_max_length 512, and a ``<mask>`` that
absorbs the space before it, as RoBERTa's does, so "human <mask>." masks the word the model was
trained to predict.

For the twcs format the tokenizer also carries the corpus's cleaning as its normalizer, so text given
at inference time is cleaned as the training tweets were; in conversation mode the separator is a
special token and the tokenizer gets a chat template that puts it after the customer's message.
"""

from __future__ import annotations

import logging
import random
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from kantai_batch.fingerprint import fingerprint_of
from kantai_batch.job import Job
from kantai_batch.rundir import RunDir

log = logging.getLogger(__name__)

MODEL_MAX_LENGTH = 512
# The sample of a large train split is drawn with a seed of its own: changing train.seed must not
# change the tokenizer (and with it every token id).
_SAMPLE_SEED = 0


def chat_template(separator: str) -> str:
    """One turn per message: a user message then the separator; a reply then end-of-text.

    The trailing space after the separator is stripped by the normalizer, so the rendered prompt
    tokenizes exactly like a training conversation and also reads well with the reply appended.
    """
    return (
        "{%- for message in messages -%}"
        "{%- if message['role'] == 'user' -%}{{ message['content'] }} " + separator + " "
        "{%- else -%}{{ message['content'] }}{{ eos_token }}{%- endif -%}"
        "{%- endfor -%}"
    )


def train_tokenizer(job: Job, run: RunDir) -> Path:
    """Train the tokenizer on ``RUN/corpus/train.txt``; return the tokenizer folder."""
    from tokenizers import AddedToken, ByteLevelBPETokenizer, Tokenizer, processors
    from transformers import PreTrainedTokenizerFast

    run.require(run.corpus, "corpus", "prepare")
    from kantai_batch.continued import copy_tokenizer, init_model_dir

    start_from = init_model_dir(job)
    if start_from is not None:
        return copy_tokenizer(job, run, start_from, fingerprint_of(job, "train-tokenizer", run, as_read=True))
    bos, pad, eos, unk, mask = job.tokenizer.special_tokens
    special_tokens = [bos, pad, eos, unk, AddedToken(mask, lstrip=True, special=True)]
    conversation = job.corpus.format == "twcs" and job.corpus.conversation
    if conversation:
        special_tokens.append(AddedToken(job.corpus.separator, special=True))
    bpe = ByteLevelBPETokenizer()
    if job.corpus.format == "twcs":
        from kantai_batch.twcs import cleaner

        bpe.normalizer = cleaner(job.corpus)
    sample = TrainingSample(run.train_text, job.tokenizer.max_training_bytes)
    bpe.train_from_iterator(
        sample.examples(),
        vocab_size=job.tokenizer.vocab_size,
        min_frequency=job.tokenizer.min_frequency,
        special_tokens=special_tokens,
        # The trainer's bar draws on stdout, and piped it leaves blank lines among the results there.
        show_progress=sys.stdout.isatty(),
        length=None,
    )
    log.info("tokenizer: trained on %s", sample.describe())
    backend = Tokenizer.from_str(bpe.to_str())
    backend.post_processor = processors.RobertaProcessing(
        (eos, backend.token_to_id(eos)), (bos, backend.token_to_id(bos))
    )
    # The generic fast tokenizer loads tokenizer.json exactly as trained; transformers 5's
    # RobertaTokenizer rebuilds its pipeline from vocab and merges and would drop the normalizer.
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=bos,
        pad_token=pad,
        eos_token=eos,
        sep_token=eos,
        cls_token=bos,
        unk_token=unk,
        mask_token=mask,
        model_max_length=MODEL_MAX_LENGTH,
        extra_special_tokens=[job.corpus.separator] if conversation else [],
    )
    if conversation:
        tokenizer.chat_template = chat_template(job.corpus.separator)
    fingerprint = fingerprint_of(job, "train-tokenizer", run, as_read=True)
    with run.committed(run.tokenizer, inputs_sha256=fingerprint, training_sample=sample.as_dict()) as out:
        bpe.save_model(str(out))
        tokenizer.save_pretrained(str(out))
    log.info(
        "tokenizer: %s tokens (vocab_size limit %s) in %s",
        f"{len(tokenizer):,}",
        f"{job.tokenizer.vocab_size:,}",
        run.tokenizer,
    )
    return run.tokenizer


class TrainingSample:
    """The train split's examples the tokenizer learns from: all of them, or a uniform sample of about
    ``max_bytes`` when the split is larger.

    Each example (a paragraph, or a line for line-per-example formats: blank lines separate them in
    the split) is kept with probability ``max_bytes / split bytes`` from a fixed-seed generator, so
    every file and every part of the corpus is represented in proportion and one pass streams it.
    """

    def __init__(self, path: Path, max_bytes: int | None) -> None:
        self.path = path
        self.total_bytes = path.stat().st_size
        self.share = 1.0 if max_bytes is None or self.total_bytes <= max_bytes else max_bytes / self.total_bytes
        self.bytes = 0
        self.examples_kept = 0
        self.examples_seen = 0

    def examples(self) -> Iterator[str]:
        """The kept examples' lines, endings included, as the trainer reads a file (one sequence per line)."""
        rng = random.Random(_SAMPLE_SEED)
        for example in _examples(self.path):
            self.examples_seen += 1
            if self.share < 1.0 and rng.random() >= self.share:
                continue
            self.examples_kept += 1
            self.bytes += sum(len(line.encode("utf-8")) for line in example)
            yield from example

    def describe(self) -> str:
        if self.share >= 1.0:
            return f"the whole train split ({self.examples_kept:,} examples, {self.total_bytes:,} bytes)"
        return (
            f"a uniform sample of the train split: {self.examples_kept:,} of {self.examples_seen:,} examples, "
            f"{self.bytes:,} of {self.total_bytes:,} bytes (tokenizer.max_training_bytes)"
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "sampled": self.share < 1.0,
            "share": self.share,
            "examples": self.examples_kept,
            "examples_in_split": self.examples_seen,
            "bytes": self.bytes,
            "split_bytes": self.total_bytes,
        }


def _examples(path: Path) -> Iterator[list[str]]:
    """The split's examples, each a run of non-blank lines with the blank lines after it, streamed."""
    lines: list[str] = []
    with path.open(encoding="utf-8", newline="") as text:
        for line in text:
            if line.strip() and lines and not lines[-1].strip():
                yield lines
                lines = []
            lines.append(line)
    if lines:
        yield lines
