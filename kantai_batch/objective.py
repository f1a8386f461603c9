"""What each task learns: its model class, how batches get labels, and the accuracy reported with the loss.

``mlm`` masks tokens at random (RoBERTa's objective; eval masks are fixed once, see ``data``) and
scores the masked positions. ``clm`` predicts every next token with a causal decoder; labels are the
inputs themselves (the model shifts them), and only padding is excluded from the loss (bench's
held-out cuts also leave out the special tokens, which each data format puts elsewhere).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from kantai_batch.job import Job
from kantai_batch.masking import IGNORE, collate

# Pad to a multiple of 8 so padded batches keep tensor-core friendly shapes on GPUs.
PAD_MULTIPLE = 8

# The key under which a training batch carries the flattened positions its labels score (sparse prediction).
MASKED_POSITIONS = "masked_positions"
# The key under which a training batch carries its count of real (not padding) tokens, a Python int.
REAL_TOKENS = "real_tokens"

MODEL_CLASSES = {"mlm": "RobertaForMaskedLM", "clm": "RobertaForCausalLM"}
ACCURACY = {"mlm": "masked_accuracy", "clm": "next_token_accuracy"}


def model_class(task: str):
    import transformers

    return getattr(transformers, MODEL_CLASSES[task])


def task_of(config) -> str | None:
    """The task a saved model was trained for, from its config; None when it is neither."""
    architectures = config.architectures or []
    if any(name.endswith("ForCausalLM") for name in architectures):
        return "clm"
    if any(name.endswith("ForMaskedLM") for name in architectures) and not getattr(config, "is_decoder", False):
        return "mlm"
    return None


def collator(task: str, tokenizer, job: Job, *, masked_positions: bool = False, real_tokens: bool = False):
    return LabelledCollator(tokenizer, task, job.train.mlm_probability, masked_positions, real_tokens)


# compute_metrics' name for the held-out loss averaged over scored tokens; PretrainTrainer makes it the eval loss.
TOKEN_LOSS = "token_loss"


def eval_predictions(task: str):
    """``preprocess_logits_for_metrics`` for the Trainer: each position's predicted id and its scored
    token's cross-entropy (0 where nothing is scored), so evaluation does not hold vocabulary-sized
    logits for the whole eval set, and its loss can be averaged over tokens (the Trainer's own eval
    loss is a mean of batch means, which moves with the batch size when batches score unequal counts).
    """

    def kept(logits, labels):
        import torch.nn.functional as F

        nll = torch.zeros(labels.shape, dtype=torch.float32, device=logits.device)
        # Position i of a causal LM predicts token i + 1, as its loss shifts the labels.
        scores, targets, losses = (
            (logits, labels, nll) if task == "mlm" else (logits[:, :-1], labels[:, 1:], nll[:, :-1])
        )
        scored = targets != IGNORE
        # In fp32 even under autocast, as the training loss computes it.
        losses[scored] = F.cross_entropy(scores[scored].float(), targets[scored], reduction="none")
        return logits.argmax(dim=-1), nll

    return kept


def accuracy_metric(task: str):
    """``compute_metrics`` for the Trainer: the share of scored positions predicted exactly, and the
    loss over all scored tokens (``TOKEN_LOSS``), from what ``eval_predictions`` kept."""

    def masked_accuracy(eval_pred) -> dict[str, float]:
        (predictions, nll), labels = eval_pred
        return {ACCURACY["mlm"]: _share_correct(predictions, labels), TOKEN_LOSS: _mean_scored(nll, labels)}

    def next_token_accuracy(eval_pred) -> dict[str, float]:
        (predictions, nll), labels = eval_pred
        predictions, nll, labels = predictions[:, :-1], nll[:, :-1], labels[:, 1:]
        return {ACCURACY["clm"]: _share_correct(predictions, labels), TOKEN_LOSS: _mean_scored(nll, labels)}

    return masked_accuracy if task == "mlm" else next_token_accuracy


def _share_correct(predictions, labels) -> float:
    scored = labels != -100
    return float((predictions[scored] == labels[scored]).mean()) if scored.any() else 0.0


def _mean_scored(nll, labels) -> float:
    scored = labels != -100
    return float(nll[scored].sum(dtype=np.float64) / scored.sum()) if scored.any() else float("nan")


@dataclass
class LabelledCollator:
    """Stacks samples that come with their labels (masked training samples from
    ``masking.MaskedSamples``, evaluation samples labelled once when built); the others get labels
    from the stock collator: masked at random for ``mlm`` (the run_mlm baseline), the inputs
    themselves for ``clm`` (padding left out).

    With ``masked_positions`` a masked LM's batch also carries the flattened positions of its masked
    tokens (``MASKED_POSITIONS``), found here on the host, for ``trainer.PretrainTrainer``'s sparse head:
    found on the device, the host would wait there for the step so far, and ``torch.compile`` would
    break its graph at that data-dependent shape.

    With ``real_tokens`` it also carries its count of tokens that are not padding (``REAL_TOKENS``), for
    ``trainer.PretrainTrainer``'s token count: counted from the mask on the device, the host would read
    it back every step."""

    tokenizer: Any
    task: str = "mlm"
    mlm_probability: float = 0.15
    masked_positions: bool = False
    real_tokens: bool = False

    def __post_init__(self) -> None:
        from transformers import DataCollatorForLanguageModeling

        self._label = DataCollatorForLanguageModeling(
            self.tokenizer,
            mlm=self.task == "mlm",
            mlm_probability=self.mlm_probability,
            pad_to_multiple_of=PAD_MULTIPLE,
        )

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        if "labels" in features[0]:
            batch = collate(features, self.tokenizer.pad_token_id, PAD_MULTIPLE)
        else:
            batch = self._label(features)
        # A batch without padding (every packed batch) goes without a mask, which the model reads as all
        # ones. Given one, a model under torch.compile cannot look inside it, so transformers builds the
        # attention mask and SDPA cannot take its flash kernel (tests/test_masking.py shows the traced call).
        # With real_tokens the count is taken first, from the mask (a masked LM can draw <pad> as a token).
        if self.real_tokens:
            mask = batch.get("attention_mask")
            batch[REAL_TOKENS] = int(mask.sum()) if mask is not None else batch["input_ids"].numel()
        if "attention_mask" in batch and bool(batch["attention_mask"].all()):
            del batch["attention_mask"]
        if self.masked_positions and self.task == "mlm":
            batch[MASKED_POSITIONS] = torch.from_numpy(np.flatnonzero(batch["labels"].numpy() != IGNORE))
        return batch


def loss_function(task: str):
    """The Trainer's ``compute_loss_func`` for ``task``; None keeps the model's own loss (clm)."""
    return masked_lm_loss if task == "mlm" else None


def masked_lm_loss(outputs, labels, num_items_in_batch=None):
    """Cross-entropy over the masked tokens, summed, divided by the masked tokens of the global batch.

    The logits are the head's output either for the masked positions only (sparse prediction, training),
    with ``labels`` those positions' labels, or for every position (evaluation), where the unmasked ones
    are dropped here.
    """
    import torch.nn.functional as F

    logits = outputs["logits"]
    labels = labels.reshape(-1).to(logits.device)
    if logits.dim() == 3:
        scored = labels != IGNORE
        logits, labels = logits.reshape(-1, logits.size(-1))[scored], labels[scored]
    # In fp32 even under autocast, as RoBERTa's own CrossEntropyLoss computes it.
    loss = F.cross_entropy(logits.float(), labels, reduction="sum", ignore_index=IGNORE)
    return loss / (num_items_in_batch if num_items_in_batch is not None else (labels != IGNORE).sum().clamp(min=1))
