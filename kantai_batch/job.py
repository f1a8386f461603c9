"""The job file: typed sections, YAML plus ``--set`` overrides, validated once at load.

Every field has a default, and the defaults are the KantaiBERT recipe, so a run with no job file at
all is the reference job. A job file only names what it changes; unknown keys are errors, so a typo
never silently falls back to a default.
"""

from __future__ import annotations

import codecs
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from kantai_batch.errors import JobConfigError

DEFAULT_CORPUS_URL = (
    "https://raw.githubusercontent.com/Denis2054/Transformers-for-NLP-2nd-Edition/master/Chapter04/kant.txt"
)


class _Section(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        frozen=True,
        use_attribute_docstrings=True,
        validate_default=True,
        # `--set name=2024` arrives as an int after YAML parsing; a string field should take it.
        coerce_numbers_to_str=True,
    )


class CorpusSection(_Section):
    source: str = DEFAULT_CORPUS_URL
    """Where the raw corpus comes from: a local path or an http(s) URL (`--corpus` overrides it)."""
    format: Literal["text"] = "text"
    """How the source is laid out: `text` is plain text, paragraphs separated by blank lines."""
    encoding: str = "auto"
    """`auto` detects the encoding (charset-normalizer); any Python codec name forces one."""

    @field_validator("encoding")
    @classmethod
    def _known_codec(cls, value: str) -> str:
        if value != "auto":
            try:
                codecs.lookup(value)
            except LookupError:
                raise ValueError(f"unknown encoding {value!r} (use 'auto' or a Python codec name)") from None
        return value


class TokenizerSection(_Section):
    vocab_size: int = Field(52_000, gt=261)
    """Upper bound on the byte-level BPE vocabulary (256 byte tokens + special tokens + merges)."""
    min_frequency: int = Field(2, ge=1)
    """A pair must occur at least this often to be merged."""
    special_tokens: tuple[str, str, str, str, str] = ("<s>", "<pad>", "</s>", "<unk>", "<mask>")
    """Special tokens in the order bos, pad, eos, unk, mask; they get ids 0-4."""


class ModelSection(_Section):
    """The `RobertaConfig` fields that define the architecture."""

    vocab_size: int = Field(52_000, ge=1)
    """Embedding rows; must be at least the trained tokenizer's size."""
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
    mode: Literal["packed", "line_by_line"] = "packed"
    """`packed` fills every block with text; `line_by_line` makes one padded sample per line."""
    eval_fraction: float = Field(0.1, gt=0.0, lt=1.0)
    """Share of the corpus's paragraphs held out for evaluation."""


class TrainSection(_Section):
    max_steps: int | None = Field(None, ge=1)
    """Optimizer steps to train for; when unset, `epochs` decides."""
    epochs: float = Field(1.0, gt=0.0)
    """Passes over the training split (ignored when max_steps is set)."""
    per_device_batch_size: int = Field(64, ge=1)
    """Samples per device per step."""
    learning_rate: float = Field(5e-5, gt=0.0)
    """Peak AdamW learning rate (linear decay)."""
    warmup_steps: int = Field(0, ge=0)
    """Linear warm-up steps."""
    weight_decay: float = Field(0.0, ge=0.0)
    """AdamW weight decay."""
    mlm_probability: float = Field(0.15, gt=0.0, lt=1.0)
    """Share of tokens selected for masking."""
    save_steps: int = Field(10_000, ge=1)
    """Write a checkpoint every this many steps."""
    save_total_limit: int = Field(2, ge=1)
    """Checkpoints kept in the run dir; older ones are deleted."""
    eval_steps: int | None = Field(None, ge=1)
    """Evaluate every this many steps; when unset, only at the end."""
    logging_steps: int = Field(50, ge=1)
    """Log the training loss every this many steps."""
    seed: int = 42
    """Seed for initialization, masking and data order."""


class InferSection(_Section):
    fill_mask_text: str = "Human thinking involves human <mask>."
    """The text `run` fills in at the end, as the recipe does."""
    top_k: int = Field(5, ge=1)
    """Predictions shown per mask."""


class Job(_Section):
    name: str = "kantaibert"
    """The job's name; also the MLflow experiment."""
    task: Literal["mlm"] = "mlm"
    """Training objective: `mlm` is RoBERTa's masked language modelling."""
    corpus: CorpusSection = CorpusSection()
    """The raw corpus and how to read it (`prepare`)."""
    tokenizer: TokenizerSection = TokenizerSection()
    """The byte-level BPE tokenizer (`train-tokenizer`)."""
    model: ModelSection = ModelSection()
    """The architecture, initialized from scratch (`pretrain`)."""
    data: DataSection = DataSection()
    """How text becomes training samples (`prepare`, `pretrain`)."""
    train: TrainSection = TrainSection()
    """The Trainer's settings (`pretrain`)."""
    infer: InferSection = InferSection()
    """What `run` shows at the end."""

    @model_validator(mode="after")
    def _sections_agree(self) -> Job:
        if self.data.block_size + 2 > self.model.max_position_embeddings:
            raise ValueError(
                f"data.block_size {self.data.block_size} needs model.max_position_embeddings of at least "
                f"{self.data.block_size + 2}, got {self.model.max_position_embeddings}"
            )
        mask = self.tokenizer.special_tokens[4]
        if mask not in self.infer.fill_mask_text:
            raise ValueError(f"infer.fill_mask_text has no {mask} token")
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
        raise JobConfigError(f"job {where}: {_describe(exc)}") from None


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise JobConfigError(f"job file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise JobConfigError(f"job file {path} cannot be read: {exc}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise JobConfigError(f"job file {path} is not valid YAML{where}: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise JobConfigError(f"job file {path} must be a mapping of sections, got {type(data).__name__}")
    return data


def _apply_override(raw: dict[str, Any], override: str) -> None:
    key, sep, text = override.partition("=")
    key = key.strip()
    if not sep or not key:
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


def _describe(exc: ValidationError) -> str:
    messages = []
    for error in exc.errors():
        loc = ".".join(str(part) for part in error["loc"])
        msg = error["msg"].removeprefix("Value error, ")
        if error["type"] == "extra_forbidden":
            msg = "unknown key"
        elif not isinstance(error["input"], dict) and repr(error["input"]) not in msg:
            msg = f"{msg} (got {error['input']!r})"
        messages.append(f"{loc}: {msg}" if loc else msg)
    return "; ".join(messages)
