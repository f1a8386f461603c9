"""How a model trained from scratch starts: train.position_init."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForMaskedLM, RobertaForMaskedLM

from helpers import TINY
from kantai_batch.errors import JobConfigError
from kantai_batch.job import load_job
from kantai_batch.model import init_model

TOKENIZER_SIZE = 300


def _positions(model) -> torch.Tensor:
    # Rows 0 and 1 sit below RoBERTa's first position (padding_idx + 1) and are never used.
    return model.roberta.embeddings.position_embeddings.weight.detach()[2:]


def _same_similarity_for_same_offset(weight: torch.Tensor) -> bool:
    gram = weight @ weight.T
    pairs = [((3, 5), (20, 22)), ((0, 7), (40, 47)), ((1, 30), (30, 59))]
    return all(torch.allclose(gram[a], gram[b], atol=1e-6) for a, b in pairs)


def test_sinusoidal_positions_encode_offsets_at_the_init_scale_and_change_nothing_else(tmp_path: Path):
    plain = init_model(load_job(None, [*TINY, "train.position_init=random"]), TOKENIZER_SIZE)
    model = init_model(load_job(None, [*TINY, "train.position_init=sinusoidal"]), TOKENIZER_SIZE)
    positions = _positions(model)
    assert _same_similarity_for_same_offset(positions)
    assert not _same_similarity_for_same_offset(_positions(plain)), "random init has no offset structure"
    # The scale of the other embeddings (RMS initializer_range), so words are not drowned out.
    assert positions.pow(2).mean().sqrt().item() == pytest.approx(model.config.initializer_range, rel=0.01)
    changed = {
        name
        for (name, a), (_, b) in zip(plain.state_dict().items(), model.state_dict().items(), strict=True)
        if not torch.equal(a, b)
    }
    assert changed == {"roberta.embeddings.position_embeddings.weight"}
    model.save_pretrained(tmp_path / "model")
    loaded = AutoModelForMaskedLM.from_pretrained(tmp_path / "model")
    assert type(loaded) is RobertaForMaskedLM
    assert torch.equal(_positions(loaded), positions)


def test_an_unknown_position_init_is_a_config_error():
    with pytest.raises(JobConfigError, match="train.position_init"):
        load_job(None, [*TINY, "train.position_init=rotary"])
