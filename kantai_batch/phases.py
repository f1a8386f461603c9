"""The phase table: every phase of a run, in order, as one row.

A row says what the phase is called (its CLI command and Kubernetes Job), the run-dir folder it
commits, the job fields and upstream phases its output depends on (its fingerprint), whether every
rank of a multi-process launch takes part, and the function that runs it. The pipeline (`run`),
fingerprints, k8s submission, the CLI and `bench` all read this table, so a new phase is one row
here plus its module (and its Job in ``k8s/base``).

The functions are named, not imported: reading the table imports no torch.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kantai_batch.errors import JobConfigError


@dataclass(frozen=True)
class Phase:
    name: str
    output: str
    """The ``RunDir`` folder it commits."""
    reads: tuple[str, ...]
    """The job fields (dotted) its output depends on."""
    ignores: tuple[str, ...] = ()
    """Fields below ``reads`` that change nothing it writes (bookkeeping): changing one redoes nothing."""
    upstream: tuple[str, ...] = ()
    """The phases whose output it reads."""
    every_rank: bool = False
    """Under a multi-process launch every rank takes part; otherwise the main process runs it first."""
    runner: str = ""
    """``module:function`` taking ``(job, run, **options)``."""
    options: tuple[str, ...] = ()
    """The run-wide options (such as ``track``) the function takes."""
    starts_from_model: bool = False
    """Its output depends on the model ``train.init_from`` names (which version an alias points at)."""
    changed: str = ""
    """``module:function`` taking ``(job, run, marker)``: how what the phase read outside the job and the
    run dir (the corpus's source files) differs from when it committed, or None."""
    version: int = 1
    """Raised when the code changes what the phase writes from the same inputs: outputs of an older
    version are redone. Version 1 adds nothing to the fingerprint, so rows never raised keep theirs."""

    def output_of(self, run) -> Path:
        return getattr(run, self.output)

    def run(self, job, run, **options: Any) -> Any:
        module, _, function = self.runner.partition(":")
        wanted = {key: value for key, value in options.items() if key in self.options}
        return getattr(importlib.import_module(module), function)(job, run, **wanted)

    def change_outside(self, job, run, marker: dict[str, Any]) -> str | None:
        if not self.changed:
            return None
        module, _, function = self.changed.partition(":")
        return getattr(importlib.import_module(module), function)(job, run, marker)


PHASES: tuple[Phase, ...] = (
    Phase(
        "prepare",
        output="corpus",
        reads=("corpus", "data.eval_fraction", "eval.seed"),
        runner="kantai_batch.corpus:prepare",
        changed="kantai_batch.corpus:source_change",
        # 2: twcs conversations split by their customer tweet (its other replies trained on held-out text);
        # a form feed inside a line is a space (it glued the words around a page break)
        version=2,
    ),
    Phase(
        "train-tokenizer",
        output="tokenizer",
        # With train.init_from the tokenizer is the model's, copied (starts_from_model).
        reads=("corpus", "tokenizer"),
        # Where the corpus came from: what it holds is the upstream corpus's manifest. Read, a phase run
        # without --corpus (the job's default source) made the next `run --corpus` train it again.
        ignores=("corpus.source",),
        upstream=("prepare",),
        starts_from_model=True,
        runner="kantai_batch.tokenizer:train_tokenizer",
    ),
    Phase(
        "tokenize",
        output="tokens",
        # The eval samples of a masked LM carry their fixed masks; data.tokenize_workers (and how many
        # pods make the parts) changes no sample.
        reads=("task", "data.mode", "data.block_size", "eval.mlm_probability", "eval.seed"),
        upstream=("prepare", "train-tokenizer"),
        runner="kantai_batch.tokens:tokenize",
        options=("workers", "part", "parts"),
        # 2: eval masks drawn per sample (masking.Masker); 3: packed blocks (data.PACKING); 4: special-token
        # strings in the text tokenized as text (data.LITERALS)
        version=4,
    ),
    Phase(
        "pretrain",
        output="model",
        reads=("task", "model", "data.mode", "data.block_size", "train"),
        # How often it logs, evaluates, checkpoints and waits: the committed model is the same (the last
        # step is always saved, and a retry commits it).
        ignores=tuple(
            f"train.{name}"
            for name in "save_steps save_total_limit logging_steps eval_steps preemption_grace_s "
            "collective_timeout_s dataloader_workers profile_steps".split()
        ),
        # The tokenizer is saved with the model; the samples come from tokens.
        upstream=("train-tokenizer", "tokenize"),
        every_rank=True,
        starts_from_model=True,
        runner="kantai_batch.train:pretrain",
        options=("track",),
    ),
    Phase(
        "evaluate",
        output="eval",
        reads=(
            "data.mode",
            "data.block_size",
            "train.per_device_batch_size",
            "eval",
            "infer",
        ),
        # The run's eval samples come from tokens; a model with another tokenizer is scored on the text.
        upstream=("prepare", "tokenize", "pretrain"),
        every_rank=True,
        runner="kantai_batch.evaluate:evaluate",
        options=("model_dir", "corpus"),
        changed="kantai_batch.probes:probes_change",
    ),
)

NAMES = tuple(phase.name for phase in PHASES)


def phase(name: str) -> Phase:
    for row in PHASES:
        if row.name == name:
            return row
    raise JobConfigError(f"unknown phase {name}: choose from {', '.join(NAMES)}")


def before(name: str) -> tuple[Phase, ...]:
    """The phases that run before ``name``, in order."""
    return PHASES[: NAMES.index(phase(name).name)]
