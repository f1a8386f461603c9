"""The architecture: RoBERTa configs from the job, initialization from scratch, parameter inspection."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from kantai_batch.errors import InputDataError, JobConfigError, first_line, unusable_as
from kantai_batch.job import Job, ModelSection
from kantai_batch.objective import model_class, task_of


@dataclass(frozen=True)
class ParameterRow:
    name: str
    shape: tuple[int, ...]
    count: int


# Dropout changes how a model trains, not its shape: a checkpoint resumes across it, a model continues.
ARCHITECTURE_KEYS = tuple(key for key in ModelSection.model_fields if not key.endswith("dropout_prob"))

# Embedding and output rows in multiples of 64 keep the LM head's matmul on fast kernel shapes.
VOCAB_MULTIPLE = 64


def resolved_vocab_size(job: Job, tokenizer_size: int) -> int:
    """``model.vocab_size``, with ``auto`` sized to the tokenizer; a fixed size must cover it."""
    wanted = job.model.vocab_size
    if wanted == "auto":
        return -(-tokenizer_size // VOCAB_MULTIPLE) * VOCAB_MULTIPLE
    if tokenizer_size > wanted:
        raise JobConfigError(f"model.vocab_size {wanted} is smaller than the tokenizer's {tokenizer_size} tokens")
    return wanted


def roberta_config(job: Job, vocab_size: int):
    from transformers import RobertaConfig

    m = job.model
    # Special-token ids follow the tokenizer's training order: bos 0, pad 1, eos 2 (RoBERTa's own).
    return RobertaConfig(
        vocab_size=vocab_size,
        hidden_size=m.hidden_size,
        num_hidden_layers=m.num_hidden_layers,
        num_attention_heads=m.num_attention_heads,
        intermediate_size=m.intermediate_size,
        max_position_embeddings=m.max_position_embeddings,
        type_vocab_size=m.type_vocab_size,
        hidden_dropout_prob=m.hidden_dropout_prob,
        attention_probs_dropout_prob=m.attention_probs_dropout_prob,
        bos_token_id=0,
        pad_token_id=1,
        eos_token_id=2,
        # A causal LM is RoBERTa with causal self-attention: each position sees only those before it.
        is_decoder=job.task == "clm",
    )


def init_model(job: Job, tokenizer_size: int):
    """A randomly initialized model for the job's task; its vocabulary must cover the tokenizer's."""
    from transformers import set_seed

    config = roberta_config(job, resolved_vocab_size(job, tokenizer_size))
    set_seed(job.train.seed)
    model = model_class(job.task)(config)
    if job.train.position_init == "sinusoidal":
        sinusoidal_positions(model)
    if job.train.attention_init != "random":
        mimetic_attention(model, value_output=job.train.attention_init != "mimetic_qk", seed=job.train.seed)
    if job.train.attention_init == "mimetic_local":
        local_window_heads(
            model, count=job.train.local_window_heads, gain=job.train.local_window_gain, causal=job.task == "clm"
        )
    return model


# Trockman & Kolter (2023), "Mimetic Initialization of Self-Attention Layers": the weight of the
# random part and of the (negative) identity in each product.
MIMETIC_QUERY_KEY = (0.7, 0.7)
MIMETIC_VALUE_OUTPUT = (0.4, 0.4)


def mimetic_attention(model, *, value_output: bool, seed: int) -> None:
    """Start each layer's query-key product W_q W_k^T near alpha Z + beta I and, with ``value_output``,
    its value-output product W_v W_o near alpha Z - beta I (Z Gaussian with variance 1/width).

    Each product is one width x width matrix split into two factors by its SVD, so the heads share
    it: head h takes the h-th slice of singular directions. Biases stay zero.
    """
    import torch

    width = model.config.hidden_size
    # Its own generator: the global one goes on to draw masks and sample order, which stay as with random init.
    generator = torch.Generator().manual_seed(seed)

    def factors(alpha: float, sign_beta: float) -> tuple[torch.Tensor, torch.Tensor]:
        z = torch.randn(width, width, generator=generator) / width**0.5
        u, s, vh = torch.linalg.svd(alpha * z + sign_beta * torch.eye(width))
        root = s.sqrt()
        return u * root, vh.T * root  # left @ right.T == alpha Z + sign_beta I

    with torch.no_grad():
        for layer in model.base_model.encoder.layer:
            attention = layer.attention
            alpha, beta = MIMETIC_QUERY_KEY
            left, right = factors(alpha, beta)
            # nn.Linear computes x @ weight.T: x W_q is x @ query.weight.T, so weight = factor.T.
            attention.self.query.weight.copy_(left.T)
            attention.self.key.weight.copy_(right.T)
            if value_output:
                alpha, beta = MIMETIC_VALUE_OUTPUT
                left, right = factors(alpha, -beta)
                attention.self.value.weight.copy_(left.T)
                attention.output.dense.weight.copy_(right)


def local_window_heads(model, *, count: int, gain: float, causal: bool) -> None:
    """Start ``count`` heads of each layer attending to a window of nearby tokens: for a masked LM half
    to the left and half to the right, a pair over each of the sinusoidal position table's fastest
    frequency bands; for a causal LM, which sees nothing to the right, all to the left, one band each.
    The windows widen from band to band (offsets of about 1-3, 4-7, 8-16 and 17-33 tokens, ...).

    Per (sin, cos) pair of the table the query is the key turned by 90 degrees, so the pair scores
    sin((j - i) w) between positions i and j: largest a quarter-turn away, zero for the token itself
    and, being antisymmetric, blind to which word sits where (a rotated word scores 0 with itself).
    The window is what a masked token needs from the first step (its own embedding is only <mask>),
    and what a next-token prediction needs most (the previous words). ``gain`` scales the query and
    key rows, so a pair's score by gain squared: how sharply the window starts.
    """
    import torch

    heads = model.config.num_attention_heads
    head_size = model.config.hidden_size // heads
    pairs = head_size // 2
    # (direction, first sine/cosine pair): the fastest band's window peaks at offset 2, slower ones further out.
    if causal:
        windows = [(-1, band * pairs) for band in range(count)]
    else:
        windows = [(direction, band * pairs) for band in range(count // 2) for direction in (-1, 1)]
    with torch.no_grad():
        for layer in model.base_model.encoder.layer:
            attention = layer.attention.self
            for head, (direction, first) in enumerate(windows):
                rows = slice(head * head_size, (head + 1) * head_size)
                query = torch.zeros(head_size, model.config.hidden_size)
                key = torch.zeros_like(query)
                sine = torch.arange(first, first + pairs) * 2  # the table's sine columns; cosine is the next one
                rank = torch.arange(pairs)
                key[2 * rank, sine] = gain
                key[2 * rank + 1, sine + 1] = gain
                # (sin, cos) of position i becomes direction * (cos, -sin): its dot with position j's is
                # direction * sin((j - i) w).
                query[2 * rank, sine + 1] = direction * gain
                query[2 * rank + 1, sine] = -direction * gain
                attention.query.weight[rows] = query
                attention.key.weight[rows] = key
                attention.query.bias[rows] = 0
                attention.key.bias[rows] = 0


def sinusoidal_positions(model) -> None:
    """Overwrite the position embeddings with the Transformer's sine/cosine table, scaled to the
    model's init std so positions do not drown the word embeddings they are added to."""
    import math

    import torch

    weight = model.base_model.embeddings.position_embeddings.weight
    rows, width = weight.shape
    # RoBERTa numbers positions from padding_idx + 1; the rows below it are never looked up by a token.
    first = model.config.pad_token_id + 1
    positions = torch.arange(rows - first, dtype=torch.float32)[:, None]
    rates = torch.exp(torch.arange(0, width, 2, dtype=torch.float32) * (-math.log(10_000.0) / width))
    table = torch.zeros(rows - first, width)
    table[:, 0::2] = torch.sin(positions * rates)
    table[:, 1::2] = torch.cos(positions * rates[: width // 2])
    # A sine's RMS is 1/sqrt(2); the other embeddings are drawn with std initializer_range.
    with torch.no_grad():
        weight[first:] = table * (model.config.initializer_range * math.sqrt(2))


def model_for_job(job: Job, tokenizer_size: int):
    """The job's model on the meta device: shapes without allocating or initializing weights."""
    import torch

    config = roberta_config(job, resolved_vocab_size(job, tokenizer_size))
    with torch.device("meta"):
        return model_class(job.task)(config)


def load_model_config(folder: Path):
    """The config of a saved model folder, or a one-line error saying why it is not one."""
    from transformers import AutoConfig

    if not folder.is_dir():
        raise InputDataError(
            f"model {folder} {'is a file, not a model folder' if folder.exists() else 'does not exist'}"
        )
    if not (folder / "config.json").is_file():
        raise InputDataError(f"model {folder} is not a model folder (no config.json)")
    try:
        return AutoConfig.from_pretrained(str(folder))
    except (OSError, ValueError) as exc:
        raise InputDataError(f"model {folder} has an unreadable config.json: {first_line(exc)}") from None


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


_USE_INSTEAD = {"mlm": "fill-mask", "clm": "generate or chat"}
_DESCRIBED = {"mlm": "a masked language model", "clm": "a causal language model"}


def require_task(config, model_dir: Path, task: str, command: str) -> None:
    """A model of the other kind gives nonsense, not an error, in the other command: refuse it here."""
    found = task_of(config)
    if found == task:
        return
    architectures = ", ".join(config.architectures or []) or config.model_type
    if found is None:
        raise InputDataError(f"model {model_dir} ({architectures}) is not a language model {command} can use")
    raise InputDataError(
        f"model {model_dir} is {_DESCRIBED[found]} ({architectures}); {command} needs {_DESCRIBED[task]} "
        f"(task: {task}); use {_USE_INSTEAD[found]} with this model"
    )


def usable_positions(config) -> int:
    """Tokens the model reads at most: RoBERTa numbers positions from padding_idx + 1, so two rows are never used."""
    return config.max_position_embeddings - 2


def position_ids(config, length: int):
    """The positions RoBERTa's own forward gives ``length`` unpadded tokens (padding_idx + 1 on). ``generate``
    numbers them from 0 when it is not given them: every token read two positions early."""
    import torch

    return torch.arange(length)[None] + config.pad_token_id + 1


def saved_job(folder: Path) -> dict:
    """The job file pretrain saved with a model (``job.yaml``), as plain data; empty when there is none."""
    import yaml

    from kantai_batch.rundir import JOB_FILE

    job_file = folder / JOB_FILE
    data = yaml.safe_load(job_file.read_text(encoding="utf-8")) if job_file.is_file() else None
    return data if isinstance(data, dict) else {}


def trained_length(folder: Path) -> int | None:
    """The longest sequence a saved model was trained on (its job's ``data.block_size``): the positions past
    it never had a gradient. None when the folder does not say."""
    block = (saved_job(folder).get("data") or {}).get("block_size")
    return block if isinstance(block, int) and block > 0 else None


def require_positions(config, model_dir: Path, block_size: int, what: str = "model") -> None:
    """Blocks longer than the model's positions fail deep inside the embedding: refuse them by name."""
    if block_size > usable_positions(config):
        raise InputDataError(
            f"{what} {model_dir} takes at most {usable_positions(config)} tokens; data.block_size is {block_size}"
        )


def load_lm_tokenizer(folder: Path, task: str, command: str):
    """The tokenizer of a saved model checked to be trained for ``task``, without reading the weights."""
    require_task(load_model_config(folder), folder, task, command)
    return load_model_tokenizer(folder)


def load_model_tokenizer(folder: Path):
    """The tokenizer saved with a model, or a one-line error naming the folder."""
    return load_tokenizer(folder, what="model")


def load_tokenizer(folder: Path, what: str = "tokenizer"):
    """A saved tokenizer (a tokenizer folder, or a model's), or a one-line error naming ``what`` and the folder."""
    from transformers import AutoTokenizer

    # Without its files transformers 5 builds an empty five-token tokenizer from the model's config,
    # and every prediction is garbage with exit 0.
    if not (folder / "tokenizer.json").is_file() and not all((folder / n).is_file() for n in _BPE_FILES):
        raise InputDataError(f"{what} {folder} has no tokenizer (tokenizer.json, or vocab.json with merges.txt)")
    with unusable_as(f"{what} {folder}"):
        return AutoTokenizer.from_pretrained(str(folder))


_BPE_FILES = ("vocab.json", "merges.txt")


def load_lm(folder: Path, task: str):
    """The weights of a saved model of ``task``, or a one-line error naming the folder."""
    return load_weights(model_class(task), folder)


def load_weights(cls, folder: Path, **kwargs):
    """``cls.from_pretrained(folder)`` holding every weight config.json describes, or a one-line error.

    transformers fills a tensor the weights file lacks, or holds in another shape than config.json says,
    with random values and only logs a report: every prediction and score would be noise, with exit 0.
    """
    from transformers.utils import logging as hf_logging

    # The report is a table over many lines; what it says is raised below as one.
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        with unusable_as(f"model {folder}"):
            model, info = cls.from_pretrained(
                str(folder), output_loading_info=True, ignore_mismatched_sizes=True, **kwargs
            )
    finally:
        hf_logging.set_verbosity(verbosity)
    remedy = "it is damaged or of another model than config.json describes; save or pull the model again"
    if info["mismatched_keys"]:
        key, saved, wanted = sorted(info["mismatched_keys"])[0]
        raise InputDataError(
            f"model {folder}: {key} is {list(saved)} in the weights but {list(wanted)} by config.json "
            f"({len(info['mismatched_keys'])} tensors differ); {remedy}"
        )
    for found, says in (("missing_keys", "lacks"), ("unexpected_keys", "holds tensors config.json has no place for:")):
        if info[found]:
            keys = sorted(info[found])
            more = f" and {len(keys) - 1} more" if len(keys) > 1 else ""
            raise InputDataError(f"model {folder}: the weights file {says} {keys[0]}{more}; {remedy}")
    return model
