"""train.attention: which kernel computes attention while training, and that both compute the same thing."""

from __future__ import annotations

import pytest
import torch

from helpers import SUPPORT_JOB, TINY
from kantai_batch.hardware import resolve_attention
from kantai_batch.job import load_job
from kantai_batch.model import init_model


@pytest.mark.parametrize(
    ("setting", "precision", "gpu", "expected"),
    [
        ("auto", "bf16", False, "eager"),  # the fused CPU kernel is the slower one in bf16
        ("auto", "fp32", False, "sdpa"),
        ("auto", "bf16", True, "sdpa"),
        ("auto", "fp16", True, "sdpa"),
        ("sdpa", "bf16", False, "sdpa"),
        ("eager", "bf16", True, "eager"),
    ],
)
def test_auto_picks_eager_only_for_bf16_on_a_cpu(
    setting: str, precision: str, gpu: bool, expected: str, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpu)
    assert resolve_attention(setting, precision) == expected


def test_an_unknown_attention_is_a_config_error():
    from kantai_batch.errors import JobConfigError

    with pytest.raises(JobConfigError, match="train.attention"):
        load_job(None, [*TINY, "train.attention=flash"])


@pytest.mark.floors
@pytest.mark.parametrize("job_file", [None, SUPPORT_JOB], ids=["masked LM", "causal LM"])
@pytest.mark.parametrize("padded", [False, True], ids=["full blocks", "padded lines"])
def test_eager_and_sdpa_give_the_same_loss_and_gradients(job_file: str | None, padded: bool):
    # The local-window init makes attention far from uniform, so a kernel that dropped the causal or the
    # padding mask, or scaled the scores differently, would change the loss.
    job = load_job(job_file, [*TINY, "train.position_init=sinusoidal", "train.attention_init=mimetic_local"])
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 300, (3, 24), generator=generator)
    batch = {"input_ids": ids}
    if padded:
        mask = torch.ones_like(ids)
        mask[1, 15:] = 0
        mask[2, 7:] = 0
        batch["attention_mask"] = mask
        ids = ids.masked_fill(mask == 0, 1)
        batch["input_ids"] = ids
    labels = (
        ids.clone() if job.task == "clm" else torch.where(torch.rand(ids.shape, generator=generator) < 0.3, ids, -100)
    )
    if padded:
        labels = labels.masked_fill(batch["attention_mask"] == 0, -100)
    results = {}
    for kernel in ("sdpa", "eager"):
        model = init_model(job, 300)
        model.set_attn_implementation(kernel)
        model.train()
        loss = model(**batch, labels=labels).loss
        loss.backward()
        results[kernel] = (loss.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None])
    (sdpa_loss, sdpa_grads), (eager_loss, eager_grads) = results["sdpa"], results["eager"]
    assert model.config._attn_implementation == "eager"
    assert torch.allclose(sdpa_loss, eager_loss, atol=1e-5), (sdpa_loss, eager_loss)
    assert len(sdpa_grads) == len(eager_grads)
    for a, b in zip(sdpa_grads, eager_grads, strict=True):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-4)
