"""train-tokenizer: a byte-level BPE tokenizer trained from scratch on the corpus's train split.

Writes ``RUN/tokenizer/`` with the recipe's ``vocab.json`` and ``merges.txt`` and a ``tokenizer.json``
plus config that ``AutoTokenizer.from_pretrained`` loads as a RoBERTa tokenizer: ``<s> … </s>``
around every sequence, model_max_length 512, and a ``<mask>`` that absorbs the space before it, as
RoBERTa's does, so "human <mask>." masks the word the model was trained to predict.
"""

from __future__ import annotations

import logging
from pathlib import Path

from kantai_batch.corpus import TRAIN_FILE
from kantai_batch.errors import unusable_as
from kantai_batch.job import Job
from kantai_batch.storage import RunDir, committed_dir, require_complete

log = logging.getLogger(__name__)

MODEL_MAX_LENGTH = 512


def train_tokenizer(job: Job, run: RunDir) -> Path:
    """Train the tokenizer on ``RUN/corpus/train.txt``; return the tokenizer folder."""
    from tokenizers import AddedToken, ByteLevelBPETokenizer, Tokenizer
    from transformers import RobertaTokenizer

    require_complete(run.corpus, "corpus", "prepare")
    bos, pad, eos, unk, mask = job.tokenizer.special_tokens
    bpe = ByteLevelBPETokenizer()
    bpe.train(
        files=[str(run.corpus / TRAIN_FILE)],
        vocab_size=job.tokenizer.vocab_size,
        min_frequency=job.tokenizer.min_frequency,
        special_tokens=[bos, pad, eos, unk, AddedToken(mask, lstrip=True, special=True)],
        show_progress=True,
    )
    with committed_dir(run.tokenizer) as out:
        bpe.save_model(str(out))
        tokenizer = RobertaTokenizer(
            tokenizer_object=Tokenizer.from_str(bpe.to_str()),
            bos_token=bos,
            pad_token=pad,
            eos_token=eos,
            sep_token=eos,
            cls_token=bos,
            unk_token=unk,
            mask_token=mask,
            model_max_length=MODEL_MAX_LENGTH,
        )
        tokenizer.save_pretrained(str(out))
    log.info(
        "tokenizer: %s tokens (vocab_size limit %s) in %s",
        f"{len(tokenizer):,}",
        f"{job.tokenizer.vocab_size:,}",
        run.tokenizer,
    )
    return run.tokenizer


def load_tokenizer(folder: Path):
    from transformers import AutoTokenizer

    require_complete(folder, "tokenizer", "train-tokenizer")
    with unusable_as(f"tokenizer {folder}"):
        return AutoTokenizer.from_pretrained(str(folder))
