"""The held-out metrics each task reports: the accuracy and the token loss over the positions it scores."""

from __future__ import annotations

import numpy as np
import pytest

from kantai_batch.masking import IGNORE
from kantai_batch.objective import ACCURACY, TOKEN_LOSS, accuracy_metric


def test_masked_accuracy_and_token_loss_score_only_the_masked_positions():
    """Unmasked positions (IGNORE) count neither as misses nor in the loss's denominator: the loss is
    the mean over masked tokens, as the training loss is, not diluted by every position of the batch."""
    predictions = np.array([[5, 6, 7, 8], [4, 4, 4, 4]])
    labels = np.array([[5, IGNORE, 9, IGNORE], [IGNORE, IGNORE, 4, IGNORE]])
    nll = np.array([[0.5, 0.0, 1.5, 0.0], [0.0, 0.0, 1.0, 0.0]], dtype=np.float32)
    metrics = accuracy_metric("mlm")(((predictions, nll), labels))
    assert metrics[ACCURACY["mlm"]] == pytest.approx(2 / 3)
    assert metrics[TOKEN_LOSS] == pytest.approx(1.0)


def test_next_token_accuracy_compares_each_prediction_with_the_following_token():
    """Position i of a causal LM predicts token i + 1: its prediction is scored against that label,
    and the last position (which predicts nothing) and padding are left out."""
    predictions = np.array([[3, 4, 9, 0, 0]])
    labels = np.array([[1, 3, 4, 5, IGNORE]])  # the inputs as labels, padding left out
    nll = np.array([[0.25, 0.5, 0.75, 0.0, 0.0]], dtype=np.float32)  # position i's loss for token i + 1
    metrics = accuracy_metric("clm")(((predictions, nll), labels))
    assert metrics[ACCURACY["clm"]] == pytest.approx(2 / 3)
    assert metrics[TOKEN_LOSS] == pytest.approx(0.5)
