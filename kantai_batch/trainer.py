"""The HF Trainer as pretraining extends it: the masked LM's loss and sparse head, a re-plannable schedule.

Each extension goes through a door the Trainer's authors left for it, so nothing is patched on a
live object and the model stays a standard ``RobertaForMaskedLM`` / ``RobertaForCausalLM``:

- The masked LM's loss is the Trainer's ``compute_loss_func``: the summed cross-entropy over the
  masked tokens divided by the number of masked tokens in the whole global batch, which the Trainer
  counts over every gradient-accumulation step and process. So the gradient is the token mean over
  the global batch whatever the world size (RoBERTa's own loss is a per-process mean that the
  Trainer would multiply by the number of processes).
- Sparse prediction: while training, a forward pre-hook on the LM head hands it the masked
  positions only. The head (a dense layer and the vocabulary projection) is the model's widest
  matmul, and with 15% masking 85% of its output is thrown away by the loss; gathering first gives
  the same loss for a fraction of the work, as ModernBERT's ``sparse_prediction`` does. The hook
  runs inside the model's own forward, so DDP and DeepSpeed see an ordinary forward; evaluation
  keeps the per-position logits the accuracy metric reads.
- A time budget's schedule (``budget.PlannedSchedule``) through ``create_scheduler``.
"""

from __future__ import annotations

from torch.optim.lr_scheduler import LambdaLR
from transformers import Trainer

from kantai_batch.objective import loss_function


class PretrainTrainer(Trainer):
    def __init__(self, *args, task: str, sparse: bool = False, schedule=None, **kwargs) -> None:
        super().__init__(*args, compute_loss_func=loss_function(task), **kwargs)
        self.sparse = sparse
        self.schedule = schedule
        self._scored = None  # the flattened positions the head runs on, during one training forward
        if sparse:
            self.accelerator.unwrap_model(self.model).lm_head.register_forward_pre_hook(self._scored_positions_only)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self.sparse and model.training and "labels" in inputs:
            self._scored = inputs["labels"].reshape(-1) != -100
        try:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        finally:
            self._scored = None

    def _scored_positions_only(self, head, args):
        if self._scored is None:
            return None
        hidden, *rest = args
        return (hidden.reshape(-1, hidden.size(-1))[self._scored.to(hidden.device)], *rest)

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        if self.schedule is None:
            return super().create_scheduler(num_training_steps, optimizer)
        if self.lr_scheduler is None:
            self.lr_scheduler = LambdaLR(optimizer or self.optimizer, self.schedule)
            self._created_lr_scheduler = True
        return self.lr_scheduler
