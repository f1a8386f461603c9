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
from pathlib import Path

from kantai_batch.fingerprint import fingerprint_of
from kantai_batch.job import Job
from kantai_batch.rundir import RunDir

log = logging.getLogger(__name__)

MODEL_MAX_LENGTH = 512


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
    bos, pad, eos, unk, mask = job.tokenizer.special_tokens
    special_tokens = [bos, pad, eos, unk, AddedToken(mask, lstrip=True, special=True)]
    conversation = job.corpus.format == "twcs" and job.corpus.conversation
    if conversation:
        special_tokens.append(AddedToken(job.corpus.separator, special=True))
    bpe = ByteLevelBPETokenizer()
    if job.corpus.format == "twcs":
        from kantai_batch.twcs import cleaner

        bpe.normalizer = cleaner(job.corpus)
    bpe.train(
        files=[str(run.train_text)],
        vocab_size=job.tokenizer.vocab_size,
        min_frequency=job.tokenizer.min_frequency,
        special_tokens=special_tokens,
        show_progress=True,
    )
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
    with run.committed(run.tokenizer, inputs_sha256=fingerprint_of(job, "train-tokenizer", run)) as out:
        bpe.save_model(str(out))
        tokenizer.save_pretrained(str(out))
    log.info(
        "tokenizer: %s tokens (vocab_size limit %s) in %s",
        f"{len(tokenizer):,}",
        f"{job.tokenizer.vocab_size:,}",
        run.tokenizer,
    )
    return run.tokenizer
