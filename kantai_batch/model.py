"""The architecture: RoBERTa configs from the job, initialization from scratch, parameter inspection."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from kantai_batch.errors import InputDataError, JobConfigError, unusable_as
from kantai_batch.job import Job


@dataclass(frozen=True)
class ParameterRow:
    name: str
    shape: tuple[int, ...]
    count: int


def roberta_config(job: Job):
    from transformers import RobertaConfig

    m = job.model
    # Special-token ids follow the tokenizer's training order: bos 0, pad 1, eos 2 (RoBERTa's own).
    return RobertaConfig(
        vocab_size=m.vocab_size,
        hidden_size=m.hidden_size,
        num_hidden_layers=m.num_hidden_layers,
        num_attention_heads=m.num_attention_heads,
        intermediate_size=m.intermediate_size,
        max_position_embeddings=m.max_position_embeddings,
        type_vocab_size=m.type_vocab_size,
        bos_token_id=0,
        pad_token_id=1,
        eos_token_id=2,
    )


def init_model(job: Job, tokenizer_size: int):
    """A randomly initialized masked LM for the job; its vocabulary must cover the tokenizer's."""
    from transformers import RobertaForMaskedLM, set_seed

    if tokenizer_size > job.model.vocab_size:
        raise JobConfigError(
            f"model.vocab_size {job.model.vocab_size} is smaller than the tokenizer's {tokenizer_size} tokens"
        )
    set_seed(job.train.seed)
    return RobertaForMaskedLM(roberta_config(job))


def model_for_job(job: Job):
    """The job's model on the meta device: shapes without allocating or initializing weights."""
    import torch
    from transformers import RobertaForMaskedLM

    with torch.device("meta"):
        return RobertaForMaskedLM(roberta_config(job))


def load_model_config(folder: Path):
    """The config of a saved model folder, or a one-line error saying why it is not one."""
    from transformers import AutoConfig

    if not folder.is_dir():
        raise InputDataError(f"model {folder} does not exist")
    if not (folder / "config.json").is_file():
        raise InputDataError(f"model {folder} is not a model folder (no config.json)")
    try:
        return AutoConfig.from_pretrained(str(folder))
    except (OSError, ValueError) as exc:
        raise InputDataError(f"model {folder} has an unreadable config.json: {str(exc).splitlines()[0]}") from None


def saved_model_skeleton(folder: Path):
    """A saved model's architecture, as its config names it, on the meta device (no weights read)."""
    import torch
    import transformers

    config = load_model_config(folder)
    name = (config.architectures or [""])[0]
    model_class = getattr(transformers, name, None) if name else None
    if model_class is None:
        raise InputDataError(f"model {folder}: config.json names no known architecture ({name or 'none'})")
    with torch.device("meta"), unusable_as(f"model {folder}"):
        return model_class(config)


def parameter_rows(model) -> list[ParameterRow]:
    """Every parameter tensor (tied weights once), as ``model.parameters()`` counts them."""
    return [ParameterRow(name, tuple(p.shape), p.numel()) for name, p in model.named_parameters()]


def require_masked_lm(config, model_dir: Path) -> None:
    architectures = config.architectures or []
    if getattr(config, "is_decoder", False) or not any(name.endswith("ForMaskedLM") for name in architectures):
        raise InputDataError(
            f"model {model_dir} is not a masked language model ({', '.join(architectures) or config.model_type})"
        )


def load_masked_lm_tokenizer(folder: Path):
    """The tokenizer of a saved masked LM (checked to be one), without reading the weights."""
    from transformers import AutoTokenizer

    require_masked_lm(load_model_config(folder), folder)
    with unusable_as(f"model {folder}"):
        return AutoTokenizer.from_pretrained(str(folder))


def load_masked_lm(folder: Path):
    """The weights of a saved masked LM, or a one-line error naming the folder."""
    from transformers import AutoModelForMaskedLM

    with unusable_as(f"model {folder}"):
        return AutoModelForMaskedLM.from_pretrained(str(folder))
