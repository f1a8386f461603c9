"""What each task learns: its model class, how batches get labels, and the accuracy reported with the loss.

``mlm`` masks tokens at random (RoBERTa's objective; eval masks are fixed once, see ``data``) and
scores the masked positions. ``clm`` predicts every next token with a causal decoder; labels are the
inputs themselves (the model shifts them), and only padding is excluded from the loss.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kantai_batch.job import Job

# Pad to a multiple of 8 so padded batches keep tensor-core friendly shapes on GPUs.
PAD_MULTIPLE = 8

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


def collator(task: str, tokenizer, job: Job):
    if task == "mlm":
        return MlmCollator(tokenizer, job.train.mlm_probability)
    from transformers import DataCollatorForLanguageModeling

    # mlm=False: labels are a copy of input_ids with pad positions set to -100.
    return DataCollatorForLanguageModeling(tokenizer, mlm=False, pad_to_multiple_of=PAD_MULTIPLE)


def predicted_ids(logits, labels):
    # Keep only the argmax so evaluation does not hold vocabulary-sized logits for the whole eval set.
    return logits.argmax(dim=-1)


def accuracy_metric(task: str):
    """``compute_metrics`` for the Trainer: the share of scored positions predicted exactly."""

    def masked_accuracy(eval_pred) -> dict[str, float]:
        predictions, labels = eval_pred
        return {ACCURACY["mlm"]: _share_correct(predictions, labels)}

    def next_token_accuracy(eval_pred) -> dict[str, float]:
        predictions, labels = eval_pred
        # Position i predicts token i + 1, as the causal LM loss shifts its labels.
        return {ACCURACY["clm"]: _share_correct(predictions[:, :-1], labels[:, 1:])}

    return masked_accuracy if task == "mlm" else next_token_accuracy


def _share_correct(predictions, labels) -> float:
    scored = labels != -100
    return float((predictions[scored] == labels[scored]).mean()) if scored.any() else 0.0


@dataclass
class MlmCollator:
    """Masks training batches at random; pads evaluation batches, whose masks were fixed at build time."""

    tokenizer: Any
    mlm_probability: float

    def __post_init__(self) -> None:
        from transformers import DataCollatorForLanguageModeling, DataCollatorForTokenClassification

        self._mask = DataCollatorForLanguageModeling(
            self.tokenizer, mlm_probability=self.mlm_probability, pad_to_multiple_of=PAD_MULTIPLE
        )
        self._pad = DataCollatorForTokenClassification(self.tokenizer, pad_to_multiple_of=PAD_MULTIPLE)

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        if "labels" in features[0]:
            return self._pad(features)
        return self._mask(features)


def enable_sparse_prediction(model) -> None:
    """Run a masked LM's head on the masked positions only, while training.

    The head (a dense layer and the vocabulary projection) is the model's widest matmul, and with
    15% masking 85% of its output is thrown away by the loss. Gathering the scored positions first
    gives the same loss (the mean cross-entropy over the same positions) for a fraction of the work,
    as ModernBERT's ``sparse_prediction`` does. Only this instance's ``forward`` changes: the class,
    the weights and what ``save_pretrained`` writes stay a standard ``RobertaForMaskedLM``.
    Evaluation keeps the dense path, whose per-position logits the accuracy metric reads.
    """
    import types

    import torch.nn.functional as F
    from transformers.modeling_outputs import MaskedLMOutput

    dense_forward = model.forward

    def forward(self, input_ids=None, attention_mask=None, labels=None, **kwargs):
        if labels is None or not self.training:
            return dense_forward(input_ids=input_ids, attention_mask=attention_mask, labels=labels, **kwargs)
        kwargs.pop("num_items_in_batch", None)
        hidden = self.roberta(input_ids, attention_mask=attention_mask, return_dict=True, **kwargs)[0]
        labels = labels.to(hidden.device).reshape(-1)
        scored = labels != -100
        logits = self.lm_head(hidden.reshape(-1, hidden.size(-1))[scored])
        # The loss in fp32 even under autocast, as the dense path's CrossEntropyLoss computes it.
        loss = F.cross_entropy(logits.float(), labels[scored])
        return MaskedLMOutput(loss=loss, logits=logits)

    model.forward = types.MethodType(forward, model)


def mean_loss_per_rank(model, task: str) -> None:
    """Tell the Trainer that a masked LM's loss is a per-rank mean that ignores ``num_items_in_batch``.

    The Trainer takes any ``forward(**kwargs)`` to normalize its loss by the global token count and
    multiplies the loss by the number of processes to undo DDP's gradient averaging. RoBERTa's MLM
    loss (and the sparse one) is a plain mean, so with 2 ranks the reported loss and the gradients
    would double. The causal LM's loss does use ``num_items_in_batch`` and keeps the default.
    """
    if task == "mlm":
        model.accepts_loss_kwargs = False
