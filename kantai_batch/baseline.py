"""The configurations ``bench`` measures the job against.

``recipe`` is the notebook's KantaiBERT: a 52,000-row vocabulary whatever the tokenizer learned, one
padded sample per line, the LM head on every position, fp32, RoBERTa's default dropout, batches of
64 and the Trainer's default optimizer and schedule.

``run_mlm`` is what a skilled user gets from transformers' ``examples/pytorch/language-modeling/
run_mlm.py`` on the same prepared corpus and trained tokenizer: a right-sized vocabulary, every line
tokenized with its special tokens and the stream cut into full blocks (``group_texts``),
``DataCollatorForLanguageModeling`` with 15% masking, bf16 where native, RoBERTa's dropout of 0.1,
the dense LM head, and the Trainer's defaults for everything run_mlm does not set: AdamW (β 0.9,
0.999, ε 1e-8, no weight decay), learning rate 5e-5 decaying linearly to 0 with no warm-up,
gradients clipped at 1.0, 8 samples per device, 3 epochs.

``run_clm`` is the same for a causal LM job: ``run_clm.py`` tokenizes, groups and trains exactly as
``run_mlm.py`` does, with next-token labels instead of masks.
"""

from __future__ import annotations

from itertools import chain
from pathlib import Path
from typing import Any

from kantai_batch.errors import JobConfigError
from kantai_batch.job import Job

# The Trainer's optimizer and schedule defaults, which both the notebook and run_mlm.py train with.
TRAINER_DEFAULTS: dict[str, Any] = {
    "learning_rate": 5e-5,
    "lr_scheduler": "linear",
    "warmup_steps": 0,
    "warmup_ratio": 0.0,
    "weight_decay": 0.0,
    "adam_beta1": 0.9,
    "adam_beta2": 0.999,
    "adam_epsilon": 1e-8,
    "max_grad_norm": 1.0,
    "mlm_probability": 0.15,
    "mask_frequency_power": 0.0,
}

RECIPE: dict[str, dict[str, Any]] = {
    "model": {"vocab_size": 52_000, "hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.1},
    "data": {"mode": "line_by_line"},
    "train": {
        "sparse_prediction": False,
        "precision": "fp32",
        "torch_compile": False,
        "attention": "sdpa",  # transformers' default
        "per_device_batch_size": 64,
        "position_init": "random",  # RoBERTa's init, whatever the job starts from
        "attention_init": "random",
        **TRAINER_DEFAULTS,
    },
}

RUN_MLM: dict[str, dict[str, Any]] = {
    "model": {"vocab_size": "auto", "hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.1},
    "train": {
        "sparse_prediction": False,
        "precision": "auto",
        "torch_compile": False,
        "attention": "sdpa",  # transformers' default
        "max_steps": None,
        "epochs": 3.0,
        "per_device_batch_size": 8,
        "position_init": "random",  # RoBERTa's init, whatever the job starts from
        "attention_init": "random",
        **TRAINER_DEFAULTS,
    },
}

BASELINES = {"recipe": RECIPE, "run_mlm": RUN_MLM, "run_clm": RUN_MLM}
# The task each baseline trains: the recipe is the notebook's masked LM; run_clm is run_mlm's causal twin.
BASELINE_TASK = {"recipe": "mlm", "run_mlm": "mlm", "run_clm": "clm"}
# The transformers example scripts: their schedule is fitted to the time, and ours are timed against their loss.
SCRIPTS = ("run_mlm", "run_clm")


def baseline_job(job: Job, name: str) -> Job:
    """The job with the baseline's choices; corpus, tokenizer, architecture and block size stay the job's."""
    if job.task != BASELINE_TASK[name]:
        fits = " or ".join(sorted(other for other, task in BASELINE_TASK.items() if task == job.task))
        raise JobConfigError(
            f"--baseline {name} trains task {BASELINE_TASK[name]}, job {job.name} is task {job.task}: "
            f"use --baseline {fits}"
        )
    raw = job.model_dump(mode="json")
    for section, values in BASELINES[name].items():
        raw[section].update(values)
    return Job.model_validate(raw)


def grouped_lines(path: Path, tokenizer, block_size: int, *, what: str):
    """run_mlm.py's samples: each line tokenized with ``<s> … </s>``, concatenated, cut into full blocks.

    Like run_mlm, every line of the file is a text (blank ones included) and the tail shorter than a
    block is dropped.
    """
    from datasets import load_dataset
    from transformers.utils import logging as hf_logging

    raw = load_dataset("text", data_files={"corpus": str(path)}, split="corpus")

    def tokenize(batch: dict[str, list[str]]) -> dict[str, Any]:
        return tokenizer(batch["text"], return_special_tokens_mask=True)

    def group_texts(batch: dict[str, list[list[int]]]) -> dict[str, list[list[int]]]:
        joined = {key: list(chain(*batch[key])) for key in batch}
        total = len(joined["input_ids"]) // block_size * block_size
        return {key: [ids[i : i + block_size] for i in range(0, total, block_size)] for key, ids in joined.items()}

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # long lines exceed model_max_length before they are grouped
    try:
        tokens = raw.map(tokenize, batched=True, remove_columns=raw.column_names, desc=f"{what}: tokenize lines")
        return tokens.map(group_texts, batched=True, desc=f"{what}: group_texts into blocks of {block_size}")
    finally:
        hf_logging.set_verbosity(verbosity)
