"""The job file: typed sections, YAML plus ``--set`` overrides, validated once at load.

Every field has a default, and the defaults are the KantaiBERT recipe, so a run with no job file at
all is the reference job. A job file only names what it changes; unknown keys are errors, so a typo
never silently falls back to a default.
"""

from __future__ import annotations

import codecs
import difflib
import typing
import warnings
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from kantai_batch.errors import JobConfigError, first_line

# The copy the book (3rd edition, chapter 6) itself downloads.
DEFAULT_CORPUS_URL = (
    "https://raw.githubusercontent.com/Denis2054/Transformers-for-NLP-and-Computer-Vision-3rd-Edition/"
    "master/Chapter06/kant.txt"
)


class _Section(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        frozen=True,
        use_attribute_docstrings=True,
        validate_default=True,
        # `--set name=2024` arrives as an int after YAML parsing; a string field should take it.
        coerce_numbers_to_str=True,
        # `.inf` or `.nan` in a job file is a mistake, never a setting.
        allow_inf_nan=False,
    )

    @field_validator("*", mode="before")
    @classmethod
    def _no_boolean_numbers(cls, value: Any, info) -> Any:
        # pydantic takes true for 1: `num_hidden_layers: true` built a one-layer model without a word.
        if isinstance(value, bool):
            annotation = cls.model_fields[info.field_name].annotation
            accepted = {_unannotated(kind) for kind in typing.get_args(annotation) or (annotation,)}
            if bool not in accepted and accepted & {int, float}:
                raise ValueError("expects a number, not a boolean")
            if bool not in accepted and str in accepted:
                # YAML 1.1 reads an unquoted on/off/yes/no as a boolean: "got True" named nothing typed.
                raise ValueError("expects text; YAML reads unquoted true/false, yes/no, on/off as a boolean: quote it")
        return value


def _unannotated(kind: Any) -> Any:
    return typing.get_args(kind)[0] if typing.get_origin(kind) is Annotated else kind


# The corpus fields that only the twcs format reads; setting one for plain text is a mistake.
TWCS_FIELDS = (
    "min_words",
    "letters_only",
    "brand_replies_only",
    "strip_handles",
    "strip_urls",
    "dedupe",
    "conversation",
    "separator",
)


# The formats whose examples are one field of a record; `text_field` names it.
FIELD_FORMATS = ("jsonl", "csv", "parquet")
# A model and tokenizer small enough to train in seconds on a CPU: the tests' and smoke benchmarks' overrides.
TINY_MODEL = (
    "model.num_hidden_layers=2",
    "model.hidden_size=64",
    "model.num_attention_heads=4",
    "model.intermediate_size=128",
    "model.max_position_embeddings=66",
    "tokenizer.vocab_size=1000",
    "data.block_size=32",
)


class CorpusSection(_Section):
    source: str | tuple[str, ...] = DEFAULT_CORPUS_URL
    """Where the raw corpus comes from: a file, a folder (every file under it whose name fits the format,
    in sorted order, hidden ones skipped), a glob (`books/*.txt`, `**` allowed), an `s3://bucket/prefix/`,
    an http(s) URL, or a list of these (`--corpus` overrides it with one). `.gz`, `.bz2`, `.xz` and
    `.zst` files are decompressed as they are read."""
    format: Literal["text", "lines", "jsonl", "csv", "parquet", "twcs"] = "text"
    """How the source is laid out: `text` is plain text, paragraphs separated by blank lines; `lines` is
    one example per non-empty line; `jsonl`, `csv` and `parquet` take each record's `text_field`; `twcs`
    is the Kaggle "Customer Support on Twitter" CSV, one example per tweet (or per conversation)."""
    text_field: str = "text"
    """jsonl, csv, parquet: the field (column) holding an example's text."""
    encoding: str = "auto"
    """`auto` detects each file's encoding (byte-order mark, whole-file UTF-8 check, Windows-1252 for
    Western text, else charset-normalizer); any Python codec name forces one for every file."""

    @field_validator("source", mode="before")
    @classmethod
    def _one_or_more_sources(cls, value: Any) -> Any:
        if isinstance(value, list):
            if not value:
                raise ValueError("source lists no input")
            value = tuple(value)
        for item in value if isinstance(value, tuple) else (value,):
            if not isinstance(item, str) or not item.strip():
                raise ValueError(f"a source must be a non-empty string, got {item!r}")
        return value

    @property
    def sources(self) -> tuple[str, ...]:
        """The configured inputs as a tuple, one or many."""
        return self.source if isinstance(self.source, tuple) else (self.source,)

    @property
    def source_label(self) -> str:
        """The configured inputs as one string, for messages and tags."""
        return ", ".join(self.sources)

    min_words: int = Field(30, ge=0)
    """twcs: keep an example only if it has more than this many words after cleaning."""
    letters_only: bool = True
    """twcs: lowercase, then keep only a-z, whitespace and apostrophes (the recipe's cleaning)."""
    brand_replies_only: bool = False
    """twcs: keep only the brands' tweets (`inbound` is False), not the customers'."""
    strip_handles: bool = False
    """twcs: remove @handles."""
    strip_urls: bool = False
    """twcs: remove http(s) links."""
    dedupe: bool = False
    """twcs: drop examples whose cleaned text repeats an earlier one."""
    conversation: bool = False
    """twcs: one example per customer tweet and the brand's reply to it, joined by `separator`."""
    separator: str = "<reply>"
    """twcs conversation mode: the special token between a customer tweet and the reply; generate and
    chat put it after the prompt so the model answers."""

    @field_validator("encoding")
    @classmethod
    def _known_codec(cls, value: str) -> str:
        if value != "auto":
            try:
                codec = codecs.lookup(value)
            except LookupError:
                raise ValueError(f"unknown encoding {value!r} (use 'auto' or a Python codec name)") from None
            # base64, rot13, zlib and kin are codecs too, but of bytes to bytes or str to str.
            if not getattr(codec, "_is_text_encoding", True):
                raise ValueError(f"{value!r} is not a text encoding (use 'auto' or one such as utf-8, cp1252)")
            try:  # idna and kin refuse to stand U+FFFD in for a bad byte, which every reader relies on
                codec.incrementaldecoder("replace").decode(b"", final=True)
            except UnicodeError:
                raise ValueError(
                    f"{value!r} cannot read text with bad bytes in it (use 'auto' or one such as utf-8)"
                ) from None
        return value

    @model_validator(mode="after")
    def _options_fit_the_format(self) -> CorpusSection:
        if self.format != "twcs":
            # Compared with the defaults, not with what was set: a full dump of a job reloads.
            fields = type(self).model_fields
            misplaced = [name for name in TWCS_FIELDS if getattr(self, name) != fields[name].default]
            if misplaced:
                raise ValueError(f"{', '.join(misplaced)} only apply to format twcs, not {self.format}")
        if self.format not in FIELD_FORMATS and self.text_field != "text":
            raise ValueError(f"text_field only applies to formats {', '.join(FIELD_FORMATS)}, not {self.format}")
        if not self.text_field.strip():
            raise ValueError("text_field must name a field")
        if self.conversation and self.brand_replies_only:
            raise ValueError("conversation pairs customer tweets with replies; it excludes brand_replies_only")
        if not self.separator.strip() or any(ch.isspace() for ch in self.separator):
            raise ValueError(f"separator must be one token without whitespace, got {self.separator!r}")
        return self


class TokenizerSection(_Section):
    vocab_size: int = Field(52_000, gt=261)
    """Upper bound on the byte-level BPE vocabulary (256 byte tokens + special tokens + merges)."""
    min_frequency: int = Field(2, ge=1)
    """A pair must occur at least this often to be merged."""
    special_tokens: tuple[str, str, str, str, str] = ("<s>", "<pad>", "</s>", "<unk>", "<mask>")
    """Special tokens in the order bos, pad, eos, unk, mask; they get ids 0-4."""

    @field_validator("special_tokens")
    @classmethod
    def _five_distinct_tokens(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        # A repeated one would take one id for two roles and shift the rest: the model config fixes
        # pad at id 1, so every `</s>` would then be read as padding.
        if any(not token.strip() or token != token.strip() for token in value):
            raise ValueError(f"each special token must be non-empty without surrounding whitespace, got {value}")
        if len(set(value)) != len(value):
            raise ValueError(f"the five special tokens must differ, got {value}")
        return value

    max_training_bytes: int | None = Field(1_000_000_000, ge=1)
    """A train split larger than this trains the tokenizer on a uniform sample of its examples of about
    this size (fixed seed: the same corpus gives the same tokenizer); `null` trains on all of it."""


class ModelSection(_Section):
    """The `RobertaConfig` fields that define the architecture."""

    vocab_size: Annotated[int, Field(ge=261)] | Literal["auto"] = "auto"
    """Embedding rows: `auto` is the trained tokenizer's size rounded up to a multiple of 64; a number
    (at least the tokenizer's size) fixes it, e.g. the recipe's 52000."""
    hidden_size: int = Field(768, ge=1)
    """Width of the hidden states."""
    num_hidden_layers: int = Field(6, ge=1)
    """Transformer layers."""
    num_attention_heads: int = Field(12, ge=1)
    """Attention heads per layer; must divide hidden_size."""
    intermediate_size: int = Field(3072, ge=1)
    """Width of the feed-forward layer."""
    max_position_embeddings: int = Field(514, ge=3)
    """Position embeddings; RoBERTa offsets positions by 2, so usable length is this minus 2."""
    type_vocab_size: int = Field(1, ge=1)
    """Token type embeddings (RoBERTa uses 1)."""
    hidden_dropout_prob: float = Field(0.0, ge=0.0, lt=1.0)
    """Dropout on embeddings and layer outputs while training; the recipe (RoBERTa's default) uses 0.1."""
    attention_probs_dropout_prob: float = Field(0.0, ge=0.0, lt=1.0)
    """Dropout on attention weights while training; the recipe uses 0.1."""

    @model_validator(mode="after")
    def _heads_divide_width(self) -> ModelSection:
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not a multiple of num_attention_heads {self.num_attention_heads}"
            )
        return self


class DataSection(_Section):
    block_size: int = Field(128, ge=8)
    """Tokens per training sample, special tokens included."""
    mode: Literal["packed", "grouped", "line_by_line"] = "packed"
    """`packed` fills every block with text, one `<s>` per block and `</s>` between paragraphs; `grouped`
    fills every block too but frames each paragraph `<s> … </s>` (run_clm's group_texts), so each starts
    as a prompt does; `line_by_line` makes one padded sample per line."""
    eval_fraction: float = Field(0.1, gt=0.0, lt=1.0)
    """Share of the corpus's paragraphs held out for evaluation."""
    tokenize_workers: int | None = Field(None, ge=1)
    """Processes the tokenize phase uses (`tokenize --workers` overrides it); unset: one per CPU core, up
    to 8, on corpora of 100,000 paragraphs or more, else one. The samples do not depend on it."""


class TrainSection(_Section):
    max_steps: int | None = Field(None, ge=1)
    """Optimizer steps to train for; when unset, `epochs` decides."""
    epochs: float | None = Field(None, gt=0.0)
    """Passes over the training split (ignored when max_steps is set); unset: 1, or as many as
    max_seconds allows when that is set."""
    max_seconds: float | None = Field(None, gt=0.0)
    """Wall-clock budget for training: the ranks stop together at the first step boundary past it,
    and the learning-rate schedule is planned (from the timed first steps) to end when it does. A
    resumed run counts the time already spent. max_steps, or epochs when set, still bound it."""
    per_device_batch_size: int = Field(4, ge=1)
    """Samples per device per step."""
    learning_rate: float = Field(2e-4, gt=0.0)
    """Peak AdamW learning rate, reached after the warm-up; `lr_scheduler` shapes the rest. For the Kant
    job 2e-4 ended 0.24-0.43 lower in held-out loss than 1e-4 and 0.05-0.13 lower than 1.5e-4 at 20
    minutes (two seeds, with the local windows); 3e-4 ended at most 0.05 lower but left the early
    plateau later and reached run_mlm's loss a quarter later (two seeds); before the windows 3e-4 and
    5e-4 stalled on a post-LN plateau."""
    lr_scheduler: Literal["linear", "cosine", "warmup_stable_decay", "constant_with_warmup"] = "linear"
    """After the warm-up: `linear` and `cosine` decay to 0 at the last step; `warmup_stable_decay` holds
    the peak and decays (linearly) to 0 over the last `decay_ratio` of the steps; `constant_with_warmup`
    holds the peak."""
    warmup_steps: int = Field(0, ge=0)
    """Linear warm-up steps; when above 0 it replaces warmup_ratio."""
    warmup_ratio: float = Field(0.1, ge=0.0, lt=1.0)
    """Linear warm-up as a share of all training steps, so it follows the length of the training."""
    decay_ratio: float = Field(0.2, gt=0.0, le=1.0)
    """warmup_stable_decay: share of all training steps spent decaying to 0 at the end."""
    weight_decay: float = Field(0.01, ge=0.0)
    """AdamW weight decay (not applied to biases and LayerNorm weights)."""
    adam_beta1: float = Field(0.9, ge=0.0, lt=1.0)
    """AdamW beta1."""
    adam_beta2: float = Field(0.98, ge=0.0, lt=1.0)
    """AdamW beta2; RoBERTa pretrained with 0.98."""
    adam_epsilon: float = Field(1e-6, gt=0.0)
    """AdamW epsilon; RoBERTa pretrained with 1e-6."""
    max_grad_norm: float = Field(1.0, ge=0.0)
    """Clip the gradients' global norm to this; 0 turns clipping off."""
    mlm_probability: float = Field(0.3, gt=0.0, lt=1.0)
    """mlm: share of tokens selected for masking while training; 30% gives twice RoBERTa's 15% of
    predictions per step and learned faster in time (README: Time to quality). Held-out text is
    scored at `eval.mlm_probability`."""
    mask_frequency_power: float = Field(0.0, ge=0.0, le=1.0)
    """mlm: 0 chooses every token for masking alike (RoBERTa); above 0, a token is chosen with a
    probability proportional to its train-split count to the power of minus this, scaled so that
    `mlm_probability` of the tokens are still chosen on average: frequent tokens (punctuation,
    articles) are predicted less often and content words more. Held-out text keeps uniform masking."""
    save_steps: int = Field(10_000, ge=1)
    """Write a checkpoint every this many steps."""
    save_total_limit: int = Field(2, ge=1)
    """Checkpoints kept in the run dir; older ones are deleted."""
    preemption_grace_s: float = Field(120.0, gt=0)
    """On SIGTERM, checkpoint at the next step boundary and exit within this many seconds (keep it
    below the pod's terminationGracePeriodSeconds)."""
    collective_timeout_s: int = Field(600, ge=10)
    """Longest wait in a collective (gradient all-reduce, barrier) before a process gives up: a rank
    on a lost node then fails the whole launch in this time instead of torch's 30 minutes, and the
    retried pods resume from the newest complete checkpoint. It must cover the longest legitimate
    wait, e.g. the main process tokenizing the corpus or uploading a checkpoint while others wait."""
    eval_steps: int | None = Field(None, ge=1)
    """Evaluate every this many steps; when unset, only at the end."""
    logging_steps: int = Field(50, ge=1)
    """Log the training loss every this many steps."""
    seed: int = Field(42, ge=0, lt=2**32)
    """Seed for initialization, training masks and data order (not the held-out split: `eval.seed`)."""
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    """Mixed precision (autocast; weights stay fp32): `auto` is bf16 where the hardware runs it natively
    (Ampere+ GPUs, CPUs with avx512-bf16 or AMX), fp16 on older GPUs, fp32 otherwise."""
    sparse_prediction: bool = True
    """mlm: run the LM head on masked positions only while training (same loss, a fraction of the
    head's compute); the saved model is a standard RobertaForMaskedLM either way."""
    position_init: Literal["random", "sinusoidal"] = "sinusoidal"
    """How a model trained from scratch starts its learned position embeddings: `random` (RoBERTa's
    normal init) or `sinusoidal` (the original Transformer's table at the same scale), which gives
    attention the offsets between positions from step 0. Only the start differs: the embeddings still
    train and the saved model is the same architecture."""
    attention_init: Literal["random", "mimetic", "mimetic_qk", "mimetic_local"] = "mimetic_local"
    """How a model trained from scratch starts its self-attention weights: `random` (RoBERTa's normal
    init, under which every head starts attending almost uniformly) or mimetic initialization
    (Trockman & Kolter, 2023), which starts each layer's query-key product near the identity (a token
    attends to tokens and positions like its own) and, with `mimetic`, its value-output product near
    the negative identity, as in trained Transformers; `mimetic_qk` sets the query-key product only
    (on the Kant job it alone changed nothing). `mimetic_local` is `mimetic` with `local_window_heads`
    heads of each layer (4 by default) starting as windows on the nearby tokens (half to the left, half
    to the right; for a causal LM all to the left), drawn on the sinusoidal position table, so it
    needs `position_init: sinusoidal` and at least `local_window_heads` heads: a masked token's own
    embedding says nothing, its neighbours do. It is the Kant job's default: after 20
    minutes its held-out loss was lower than `mimetic`'s and far lower than `random`'s, with concepts
    in the recipe sentence's top 5 (README: Time to quality). Only the start differs: the saved model
    is the same architecture."""
    local_window_heads: int = Field(4, ge=2)
    """`mimetic_local` only: how many heads of each layer start as windows on the nearby tokens, an even
    number up to `model.num_attention_heads`. A masked LM's come in pairs, one to the left and one to
    the right, each pair over a slower band of the sinusoidal table (offsets of about 1-3, 4-7, 8-16,
    17-33 tokens, ...); a causal LM's all look left, band after band. 8 was worse than 4 on the Kant job, 2 the same."""
    local_window_gain: float = Field(1.0, gt=0.0)
    """`mimetic_local` only: the scale of a window head's query and key rows, so how sharply its window
    starts (the scores grow with its square). A full-size model's first layer starts with about 17% of
    a window head's attention on its 1-3 nearest tokens at 1.0, 46% at 1.4, 70% at 2.0. On the Kant job
    in 20 minutes 1.4 ended 0.37-0.55 lower in held-out loss than 2.0, and 1.0 another 0.10-0.17 lower
    (two seeds each), 1.2 level with 1.0; 0.85 ended 0.08-0.15 higher than 1.0, and 0.7 stayed on the
    early plateau and ended about level with 2.0 (one seed each)."""
    profile_steps: int | None = Field(None, ge=1)
    """Profile this many training steps, after the first 5 (allocation, compilation), with
    torch.profiler: the ops that took the most device time (CPU time on a CPU) and the share in
    matmuls go into the train summary (and bench's record), a trace per process into the run dir's
    `profile/` (Perfetto opens it). Profiling slows the steps it records; leave it unset to train."""
    attention: Literal["auto", "sdpa", "eager"] = "auto"
    """The attention kernel training and `evaluate` run (not saved with the model): `sdpa` is torch's fused
    scaled-dot-product attention (flash on a GPU), `eager` plain matmuls and a softmax, the same
    arithmetic. `auto` is eager on a CPU training in bf16, where torch's fused CPU kernel is the slower
    (1.13x training tokens/s with eager for the Kant job, 1.11x for the
    customer-support job, measured beside it), and sdpa everywhere else."""
    torch_compile: bool = False
    """Compile the model with torch.compile: on a GPU faster steps after a compile of a minute or
    less (1.17x on an H200); on a CPU no faster (0.99x on a bf16 CPU), so only the compile's cost."""
    dataloader_workers: Annotated[int, Field(ge=0)] | Literal["auto"] = "auto"
    """Processes collating batches: `auto` is up to 4 per GPU process (one CPU per process left free)
    and 0 on a CPU, whose cores the training step needs."""
    init_from: str | None = None
    """Continued pretraining: start from this model's weights instead of random ones and reuse its
    tokenizer (train-tokenizer copies it, so token ids keep their meaning): `models:/NAME@ALIAS`,
    `models:/NAME/VERSION`, a model folder or an s3:// model folder. An alias that does not exist yet
    (the first scheduled retraining, before any champion) trains from scratch. `null` trains from scratch."""
    deepspeed: str | None = None
    """A DeepSpeed config (JSON) to train under instead of plain DDP, e.g. the shipped
    `jobs/deepspeed/zero2.json` or `zero3.json`; a relative path is taken from the working directory
    (the image's is the folder holding `jobs/`). Its `auto` values come from this section."""

    @model_validator(mode="after")
    def _warmup_ends_before_training(self) -> TrainSection:
        # Otherwise the learning rate never reaches its peak: training ends still warming up.
        if self.max_steps is not None and self.warmup_steps >= self.max_steps:
            raise ValueError(
                f"train.warmup_steps {self.warmup_steps} must be below train.max_steps {self.max_steps}: "
                "the learning rate reaches its peak only after the warm-up"
            )
        return self


class InferSection(_Section):
    fill_mask_text: str = "Human thinking involves human <mask>."
    """mlm: the text `run` fills in at the end, as the recipe does."""
    top_k: int = Field(5, ge=1)
    """mlm: predictions shown per mask."""


class EvalSection(_Section):
    seed: int = Field(42, ge=0, lt=2**32)
    """The held-out split (which examples `prepare` holds out) and its fixed masks (also `evaluate
    --corpus`'s and the registry benchmark's). Apart from `train.seed`, so that runs differing only in
    their training seed are scored on the same text and masks, and share corpus, tokenizer and tokens."""
    mlm_probability: float = Field(0.15, gt=0.0, lt=1.0)
    """mlm: the share of held-out tokens masked when scoring (the eval split's fixed masks, `evaluate`,
    the registry benchmark). Kept apart from `train.mlm_probability` so eval loss means the same thing
    whatever rate a job trains with: at 30% masking each prediction has less context and scores worse."""
    probes: str | None = None
    """mlm: a probe file, lines of `TEXT -> ANSWER, ANSWER` with one mask token in TEXT, that `evaluate`
    and `run` score as top-1 and top-`infer.top_k` hits (e.g. the shipped `jobs/probes/kant.txt`); a
    relative path is taken from the working directory (the image's is the folder holding `jobs/`)."""
    benchmark: str | None = None
    """`run --register`: the fixed text (any corpus source: file, folder, glob, URL, s3://, plain text)
    that the new model and the champion are both scored on before promotion. Unset: the held-out split of
    the first version registered, frozen then as an artifact of that version."""


class RegisterSection(_Section):
    min_improvement: float = Field(0.005, ge=0.0, lt=1.0)
    """`run --register`: the new version becomes `champion` only if its benchmark loss is lower than the
    champion's by at least this share (0.005 is 0.5%); otherwise it gets the alias `challenger`."""


class Sampling(_Section):
    """How a causal LM picks tokens. The job's `generate` section is one, and a command's options or the
    chat page's fields become one through ``with_overrides``: the bounds live here only."""

    max_new_tokens: int = Field(40, ge=1)
    """Tokens generated at most (generation also stops at the end-of-text token)."""
    temperature: float = Field(0.8, ge=0)
    """Sampling temperature; 0 means greedy decoding (always the most likely token)."""
    top_k: int = Field(50, ge=0)
    """Sample among the k most likely tokens only; 0 disables the cut."""
    top_p: float = Field(0.95, gt=0, le=1)
    """Sample among the most likely tokens whose probabilities sum to p; 1 disables the cut."""
    seed: int | None = Field(0, ge=0, lt=2**32)
    """Seed for sampling, so the same prompt gives the same answer; null draws a fresh one each time."""
    num_return_sequences: int = Field(1, ge=1)
    """Continuations `generate` and `run` print for the prompt (more than one needs sampling); `chat`
    answers with one."""

    @model_validator(mode="after")
    def _greedy_gives_one_answer(self) -> Sampling:
        if self.num_return_sequences > 1 and self.temperature == 0:
            raise ValueError("greedy decoding (temperature 0) gives one answer; use a temperature above 0 for several")
        return self

    def with_overrides(self, **given: object) -> Sampling:
        """These settings with the ``given`` ones over them, validated by this model; a setting given as
        None or "" (an option not passed, a form field left empty) keeps its value here."""
        values = {name: getattr(self, name) for name in Sampling.model_fields}
        values.update({name: value for name, value in given.items() if value is not None and value != ""})
        try:
            return Sampling.model_validate(values)
        except ValidationError as exc:
            raise JobConfigError(_describe_settings(exc)) from None


class GenerateSection(Sampling):
    """clm: what `run` generates at the end, and the defaults of `generate` and `chat`."""

    prompt: str = "my package was supposed to arrive yesterday and it still has not shown up"
    """The prompt `run` continues at the end."""

    @field_validator("prompt")
    @classmethod
    def _something_to_continue(cls, value: str) -> str:
        # Found empty only after the whole training, by `run`'s generation at the end.
        if not value.strip():
            raise ValueError("must not be empty: it is the text `run` continues at the end")
        return value


# The `register` section shadows ABCMeta.register on the class, which nothing here calls.
warnings.filterwarnings("ignore", message='Field name "register" in "Job" shadows', category=UserWarning)


class Job(_Section):
    name: str = "kantaibert"
    """The job's name; also the MLflow experiment."""
    task: Literal["mlm", "clm"] = "mlm"
    """Training objective: `mlm` is RoBERTa's masked language modelling (`RobertaForMaskedLM`); `clm` is
    next-token prediction with a decoder (`RobertaForCausalLM`, `is_decoder`) that can generate text."""

    @field_validator("name")
    @classmethod
    def _usable_name(cls, value: str) -> str:
        # It names the MLflow experiment (which refuses an empty one, found only after the data phases)
        # and the bench records' files.
        if not value.strip() or value != value.strip() or any(ch in value for ch in "/\\") or not value.isprintable():
            raise ValueError(f"must be non-empty, printable, without surrounding spaces, '/' or '\\', got {value!r}")
        return value

    corpus: CorpusSection = CorpusSection()
    """The raw corpus and how to read it (`prepare`)."""
    tokenizer: TokenizerSection = TokenizerSection()
    """The byte-level BPE tokenizer (`train-tokenizer`)."""
    model: ModelSection = ModelSection()
    """The architecture, initialized from scratch (`pretrain`)."""
    data: DataSection = DataSection()
    """How text becomes training samples (`prepare`, `tokenize`, `pretrain`)."""
    train: TrainSection = TrainSection()
    """The Trainer's settings (`pretrain`)."""
    infer: InferSection = InferSection()
    """What `run` shows at the end of an mlm job."""
    eval: EvalSection = EvalSection()
    """What `evaluate` reports next to loss and accuracy."""
    generate: GenerateSection = GenerateSection()
    """What `run` shows at the end of a clm job; the defaults of `generate` and `chat`."""
    register: RegisterSection = RegisterSection()
    """When `run --register` promotes the new version to `champion`."""

    @model_validator(mode="after")
    def _sections_agree(self) -> Job:
        if self.data.block_size + 2 > self.model.max_position_embeddings:
            raise ValueError(
                f"data.block_size {self.data.block_size} needs model.max_position_embeddings of at least "
                f"{self.data.block_size + 2}, got {self.model.max_position_embeddings}"
            )
        mask = self.tokenizer.special_tokens[4]
        # One mask: evaluate and bench read the sentence's answers as one ranked list, as a probe's.
        if self.task == "mlm" and self.infer.fill_mask_text.count(mask) != 1:
            found = self.infer.fill_mask_text.count(mask)
            raise ValueError(f"infer.fill_mask_text needs exactly one {mask} token, has {found}")
        if self.train.attention_init == "mimetic_local":
            heads, width = self.model.num_attention_heads, self.model.hidden_size
            if self.train.position_init != "sinusoidal":
                raise ValueError(
                    "train.attention_init mimetic_local needs train.position_init sinusoidal: "
                    "its windows are drawn on that table"
                )
            local = self.train.local_window_heads
            if heads < local or (width // heads) % 2:
                raise ValueError(
                    f"train.attention_init mimetic_local needs model.num_attention_heads of at least "
                    f"train.local_window_heads ({local}) with an even head size, got {heads} heads of {width // heads}"
                )
            if local % 2:
                raise ValueError(f"train.local_window_heads must be even, got {local}")
        if self.corpus.conversation and self.corpus.separator in self.tokenizer.special_tokens:
            raise ValueError(f"corpus.separator {self.corpus.separator} is already one of tokenizer.special_tokens")
        return self

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def load_job(
    path: str | Path | None = None, overrides: tuple[str, ...] | list[str] = (), corpus: str | None = None
) -> Job:
    """Read a job file (or the embedded defaults), apply ``key=value`` overrides, validate once."""
    where = str(path) if path else "embedded defaults"
    raw: dict[str, Any] = {}
    if path is not None:
        raw = _read_yaml(Path(path))
    # A section whose keys are all commented out is empty, not null.
    for name, value in list(raw.items()):
        field = Job.model_fields.get(name)
        if value is None and field is not None and isinstance(field.default, BaseModel):
            raw[name] = {}
    for override in overrides:
        _apply_override(raw, override)
    if corpus is not None:
        raw.setdefault("corpus", {})
        if not isinstance(raw["corpus"], dict):
            raise JobConfigError(f"job {where}: corpus must be a mapping")
        raw["corpus"]["source"] = corpus
    try:
        return Job.model_validate(raw)
    except ValidationError as exc:
        given = _override_keys(overrides) | ({"corpus.source": "--corpus"} if corpus is not None else {})
        raise JobConfigError(_describe(exc, f"job {where}", given)) from None


def _override_keys(overrides) -> dict[str, str]:
    """The dotted keys ``overrides`` set, each with the option that set it."""
    return {override.partition("=")[0].strip(): "--set" for override in overrides}


class _JobLoader(yaml.SafeLoader):
    """YAML's loader refusing a key given twice in one mapping: YAML keeps the last, so a section
    repeated further down silently dropped every setting of the first."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor`, which the base class flattens
                continue
            key = self.construct_object(key_node, deep=deep)
            if isinstance(key, (str, int, float)):
                if key in seen:
                    raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key}", key_node.start_mark)
                seen.add(key)
        return super().construct_mapping(node, deep)


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise JobConfigError(f"job file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise JobConfigError(f"job file {path} cannot be read: {exc}") from None
    try:
        data = yaml.load(text, Loader=_JobLoader)  # noqa: S506 - a SafeLoader
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or first_line(exc)
        raise JobConfigError(f"job file {path} is not valid YAML{where}: {problem}") from None
    if data is None:
        # Empty (or all comments): more likely a file cut short than a wish for the defaults,
        # which leaving out --job gives.
        raise JobConfigError(f"job file {path} has no settings (leave out --job for the embedded defaults)")
    if not isinstance(data, dict):
        raise JobConfigError(f"job file {path} must be a mapping of sections, got {type(data).__name__}")
    return data


def _apply_override(raw: dict[str, Any], override: str) -> None:
    key, sep, text = override.partition("=")
    key = key.strip()
    if not sep or not key or "" in key.split("."):
        raise JobConfigError(f"--set {override!r}: expected dotted.key=value")
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        value = text
    node = raw
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise JobConfigError(f"--set {key}: {part} is not a section")
        node = child
    node[parts[-1]] = value


def _describe(exc: ValidationError, where: str, overridden: dict[str, str] | None = None) -> str:
    """One line naming each bad key, and where its value came from: ``where`` (the job file), or the
    option that gave it (``overridden``: dotted key -> ``--set`` or ``--corpus``)."""
    overridden = overridden or {}
    fields: dict[str, list[str]] = {}
    got: dict[str, Any] = {}
    for error in exc.errors():
        path = _field_path(error["loc"])
        loc = ".".join(map(str, path))
        msg = error["msg"].removeprefix("Value error, ")
        if path and msg.startswith(f"{loc}."):
            loc = ""  # a section's own check, whose message names the fields it compares
        if error["type"] == "extra_forbidden":
            msg = "unknown key" + _did_you_mean(path)
        elif not isinstance(error["input"], dict):
            got[loc] = error["input"]
        if msg not in fields.setdefault(loc, []):
            fields[loc].append(msg)
    origins: dict[str, list[str]] = {}
    for loc, msgs in fields.items():
        # The members of a union (vocab_size: a number or 'auto') each say what they wanted: one message.
        wanted = "Input should be "
        if len(msgs) > 1 and all(msg.startswith(wanted) for msg in msgs):
            msg = wanted + " or ".join(msg.removeprefix(wanted) for msg in msgs)
        else:
            msg = "; ".join(msgs)
        if loc in got and repr(got[loc]) not in msg:
            msg = f"{msg} (got {got[loc]!r})"
        origin = next((label for key, label in overridden.items() if _gave(key, loc, msg)), where)
        origins.setdefault(origin, []).append(f"{loc}: {msg}" if loc and origin != "--corpus" else msg)
    return "; ".join(
        f"{origin}{' ' if origin == '--set' else ': '}{'; '.join(items)}" for origin, items in origins.items()
    )


def _gave(key: str, loc: str, msg: str) -> bool:
    """Whether setting ``key`` gave the value that an error at ``loc`` saying ``msg`` is about."""
    if loc:  # the key itself, or one below or above it
        return f"{key}.".startswith(f"{loc}.") or loc.startswith(f"{key}.")
    return key in msg  # a check across fields names the fields it compares


def _field_path(loc: tuple) -> tuple:
    """``loc`` without the union member tags pydantic appends (``constrained-int``, ``literal['auto']``)."""
    model: Any = Job
    path: list = []
    for part in loc:
        if isinstance(model, type) and issubclass(model, BaseModel):
            path.append(part)
            field = model.model_fields.get(part) if isinstance(part, str) else None
            model = field.annotation if field is not None else None
        elif isinstance(part, int):  # an item of a list
            path.append(part)
        else:
            break
    return tuple(path)


def _section(path: tuple) -> type[BaseModel] | None:
    """The model class ``path`` leads to from the job, or None where it ends elsewhere."""
    model: Any = Job
    for part in path:
        field = model.model_fields.get(part) if isinstance(part, str) else None
        model = field.annotation if field is not None else None
        if not (isinstance(model, type) and issubclass(model, BaseModel)):
            return None
    return model


def _did_you_mean(path: tuple) -> str:
    section = _section(path[:-1])
    close = difflib.get_close_matches(str(path[-1]), list(section.model_fields), n=1) if section else []
    return f" (did you mean {close[0]}?)" if close else ""


_BOUNDS = {"ge": "at least", "gt": "above", "le": "at most", "lt": "below"}


def _number(value: float) -> str:
    """1.0 as 1, and a seed's bound 4294967296 in full rather than as 4.29497e+09."""
    return f"{value:g}" if isinstance(value, float) else str(value)


def _describe_settings(exc: ValidationError) -> str:
    """One line naming each bad sampling setting as the options spell it (``top-p``): a command's option
    and the chat page's field of the same name get the same message."""
    problems = []
    for error in exc.errors():
        name = str(error["loc"][0]).replace("_", "-") if error["loc"] else ""
        got = error["input"]
        bound = next(
            (f"{word} {_number(error['ctx'][key])}" for key, word in _BOUNDS.items() if key in error.get("ctx", {})),
            None,
        )
        if error["type"] == "extra_forbidden":
            problem = f"{name} is not a sampling setting"
        elif error["type"].startswith("int_"):
            problem = f"{name} must be a whole number, got {got!r}"
        elif error["type"].startswith("float_"):
            problem = f"{name} must be a number, got {got!r}"
        elif bound:
            problem = f"{name} must be {bound}, got {got!r}"
        else:
            msg = error["msg"].removeprefix("Value error, ")
            problem = f"{name}: {msg}" if name else msg
        problems.append(problem)
    return "; ".join(problems)


def override_job(job: Job, overrides: tuple[str, ...] | list[str], where: str) -> Job:
    """``job`` with ``key=value`` overrides applied and validated; errors name ``where``."""
    raw = job.model_dump(mode="json")
    for override in overrides:
        _apply_override(raw, override)
    try:
        return Job.model_validate(raw)
    except ValidationError as exc:
        raise JobConfigError(_describe(exc, where)) from None
