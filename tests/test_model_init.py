"""How a model trained from scratch starts: train.position_init and train.attention_init."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForMaskedLM, RobertaForCausalLM, RobertaForMaskedLM

from helpers import TINY
from kantai_batch.errors import JobConfigError
from kantai_batch.job import load_job
from kantai_batch.model import init_model

TOKENIZER_SIZE = 300
# The window tests read each window's place from where its attention goes at init: at the sharper
# gain of 2.0 that is most of a head's attention, whatever the default gain.
SHARP = "train.local_window_gain=2.0"


def _positions(model) -> torch.Tensor:
    # Rows 0 and 1 sit below RoBERTa's first position (padding_idx + 1) and are never used.
    return model.roberta.embeddings.position_embeddings.weight.detach()[2:]


def _same_similarity_for_same_offset(weight: torch.Tensor) -> bool:
    gram = weight @ weight.T
    pairs = [((3, 5), (20, 22)), ((0, 7), (40, 47)), ((1, 30), (30, 59))]
    return all(torch.allclose(gram[a], gram[b], atol=1e-6) for a, b in pairs)


def test_sinusoidal_positions_encode_offsets_at_the_init_scale_and_change_nothing_else(tmp_path: Path):
    # Attention starts at RoBERTa's init, so the positions are the only difference.
    random_attention = "train.attention_init=random"
    plain = init_model(load_job(None, [*TINY, "train.position_init=random", random_attention]), TOKENIZER_SIZE)
    model = init_model(load_job(None, [*TINY, "train.position_init=sinusoidal", random_attention]), TOKENIZER_SIZE)
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


def _products(model) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer, W_q W_k^T and W_v W_o as maps on the residual stream (x @ product)."""
    rows = []
    for layer in model.roberta.encoder.layer:
        attention = layer.attention
        query_key = attention.self.query.weight.T @ attention.self.key.weight
        value_output = attention.self.value.weight.T @ attention.output.dense.weight.T
        rows.append((query_key.detach(), value_output.detach()))
    return rows


def _diagonal_and_rest(product: torch.Tensor) -> tuple[float, float]:
    off = product - torch.diag(torch.diagonal(product))
    return torch.diagonal(product).mean().item(), off.abs().mean().item()


def _self_attention_share(model, tokens: torch.Tensor) -> float:
    """How much attention each position pays itself, averaged over layers, heads and positions."""
    with torch.no_grad():
        attentions = model(input_ids=tokens, output_attentions=True).attentions
    return torch.stack([a.diagonal(dim1=-2, dim2=-1).mean() for a in attentions]).mean().item()


@pytest.mark.parametrize("kind", ["mimetic", "mimetic_qk"])
def test_mimetic_attention_starts_near_the_identity_and_changes_only_attention(tmp_path: Path, kind: str):
    plain = init_model(load_job(None, [*TINY, "train.attention_init=random"]), TOKENIZER_SIZE)
    model = init_model(load_job(None, [*TINY, f"train.attention_init={kind}"]), TOKENIZER_SIZE)
    for (plain_qk, plain_vo), (query_key, value_output) in zip(_products(plain), _products(model), strict=True):
        diagonal, rest = _diagonal_and_rest(query_key)
        assert diagonal == pytest.approx(0.7, abs=0.1)  # beta of alpha Z + beta I
        assert rest < 0.2 * diagonal
        assert abs(_diagonal_and_rest(plain_qk)[0]) < 0.01, "RoBERTa's init has no such structure"
        if kind == "mimetic":
            diagonal, rest = _diagonal_and_rest(value_output)
            assert diagonal == pytest.approx(-0.4, abs=0.06)
            assert rest < 0.2 * abs(diagonal)
        else:
            assert torch.equal(value_output, plain_vo)
    changed = {
        name
        for (name, a), (_, b) in zip(plain.state_dict().items(), model.state_dict().items(), strict=True)
        if not torch.equal(a, b)
    }
    touched = {"query", "key"} | ({"value", "output.dense"} if kind == "mimetic" else set())
    expected = {
        f"roberta.encoder.layer.{i}.attention.{'self.' if part != 'output.dense' else ''}{part}.weight"
        for i in range(model.config.num_hidden_layers)
        for part in touched
    }
    assert changed == expected
    # What the start is for: a position attends to itself (and tokens like it) far more than uniformly.
    tokens = torch.randint(5, TOKENIZER_SIZE, (2, 24), generator=torch.Generator().manual_seed(0))
    plain.set_attn_implementation("eager")
    model.set_attn_implementation("eager")
    assert _self_attention_share(plain, tokens) == pytest.approx(1 / 24, rel=0.2)
    assert _self_attention_share(model, tokens) > 3 / 24
    model.save_pretrained(tmp_path / "model")
    loaded = AutoModelForMaskedLM.from_pretrained(tmp_path / "model")
    assert type(loaded) is RobertaForMaskedLM
    assert all(torch.equal(a, b) for a, b in zip(_products(loaded)[0], _products(model)[0], strict=True))


def test_the_same_seed_gives_the_same_mimetic_start_and_another_seed_another():
    def query(seed: int) -> torch.Tensor:
        job = load_job(None, [*TINY, "train.attention_init=mimetic", f"train.seed={seed}"])
        return init_model(job, TOKENIZER_SIZE).roberta.encoder.layer[0].attention.self.query.weight

    assert torch.equal(query(1), query(1))
    assert not torch.equal(query(1), query(2))


def _attention_by_offset(model, tokens: torch.Tensor, layer: int, head: int) -> dict[int, float]:
    """A head's attention to the token `offset` places away, averaged over positions at least 8 from either end."""
    with torch.no_grad():
        attention = model(input_ids=tokens, output_attentions=True).attentions[layer][:, head]
    positions = torch.arange(8, tokens.shape[1] - 8)
    return {offset: attention[:, positions, positions + offset].mean().item() for offset in range(-8, 9)}


def test_local_window_heads_start_attending_to_one_side_and_not_to_themselves(tmp_path: Path):
    # Eight heads of 32: four windows of 16 sine/cosine pairs each, and four heads left mimetic.
    shape = ["model.hidden_size=256", "model.num_attention_heads=8"]
    mimetic = init_model(load_job(None, [*TINY, *shape, "train.attention_init=mimetic"]), TOKENIZER_SIZE)
    model = init_model(load_job(None, [*TINY, *shape, "train.attention_init=mimetic_local", SHARP]), TOKENIZER_SIZE)
    head_size = model.config.hidden_size // 8
    window_rows = slice(0, 4 * head_size)
    for plain_layer, layer in zip(mimetic.roberta.encoder.layer, model.roberta.encoder.layer, strict=True):
        for part in ("query", "key"):
            ours, theirs = getattr(layer.attention.self, part).weight, getattr(plain_layer.attention.self, part).weight
            assert not torch.equal(ours[window_rows], theirs[window_rows])
            assert torch.equal(ours[window_rows.stop :], theirs[window_rows.stop :]), "the other heads stay mimetic"
    changed = {
        name
        for (name, a), (_, b) in zip(mimetic.state_dict().items(), model.state_dict().items(), strict=True)
        if not torch.equal(a, b)
    }
    assert changed and all(name.endswith(("self.query.weight", "self.key.weight")) for name in changed)

    tokens = torch.randint(5, TOKENIZER_SIZE, (4, 30), generator=torch.Generator().manual_seed(0))
    model.set_attn_implementation("eager")
    for layer in range(model.config.num_hidden_layers):
        for head, side in ((0, -1), (1, 1), (2, -1), (3, 1)):
            by_offset = _attention_by_offset(model, tokens, layer, head)
            # At init a uniform head gives 8/30 to either side; the window takes most of it from one side.
            near = sum(share for offset, share in by_offset.items() if offset * side > 0)
            other_side = sum(share for offset, share in by_offset.items() if -4 <= offset * side < 0)
            assert near > 0.5, (layer, head, by_offset)
            assert by_offset[0] < 0.02 and other_side < 0.02, (layer, head, by_offset)
    model.save_pretrained(tmp_path / "model")
    assert type(AutoModelForMaskedLM.from_pretrained(tmp_path / "model")) is RobertaForMaskedLM


def test_local_window_heads_of_a_causal_lm_all_look_left_and_widen_from_head_to_head(tmp_path: Path):
    # Heads of 64 like the real job's, so the four bands are its frequencies; two thin layers keep it fast.
    shape = ["model.hidden_size=768", "model.num_attention_heads=12", "model.intermediate_size=256"]
    shape += ["task=clm", "model.num_hidden_layers=2", "model.max_position_embeddings=130"]
    model = init_model(load_job(None, [*TINY, *shape, "train.attention_init=mimetic_local", SHARP]), TOKENIZER_SIZE)
    tokens = torch.randint(5, TOKENIZER_SIZE, (4, 128), generator=torch.Generator().manual_seed(0))
    model.set_attn_implementation("eager")
    with torch.no_grad():
        attentions = model(input_ids=tokens, output_attentions=True).attentions
    positions = torch.arange(64, 128)  # each with 64 tokens behind it
    windows = [(1, 3), (4, 7), (8, 16), (17, 33)]
    for layer, attention in enumerate(attentions):
        for head in range(4):
            share = [attention[:, head, positions, positions - back].mean().item() for back in range(34)]
            by_window = [sum(share[first : last + 1]) for first, last in windows]
            assert share[0] < 0.02, (layer, head, share[0])
            assert max(by_window) == by_window[head] > 0.5, (layer, head, by_window)
    model.save_pretrained(tmp_path / "model")
    assert type(AutoModelForCausalLM.from_pretrained(tmp_path / "model")) is RobertaForCausalLM


def test_more_local_window_heads_of_a_masked_lm_pair_up_over_slower_bands():
    # train.local_window_heads=8 on heads of 64 like the real job's: four pairs (left, right), the pair
    # of band b over the windows the causal LM's head b uses; the last four heads stay mimetic.
    shape = ["model.hidden_size=768", "model.num_attention_heads=12", "model.intermediate_size=256"]
    shape += ["model.num_hidden_layers=2", "model.max_position_embeddings=130"]
    local = [*TINY, *shape, "train.attention_init=mimetic_local", SHARP]
    four = init_model(load_job(None, local), TOKENIZER_SIZE)
    model = init_model(load_job(None, [*local, "train.local_window_heads=8"]), TOKENIZER_SIZE)
    head_size = 64
    for layer_four, layer in zip(four.roberta.encoder.layer, model.roberta.encoder.layer, strict=True):
        for part in ("query", "key"):
            ours, theirs = getattr(layer.attention.self, part).weight, getattr(layer_four.attention.self, part).weight
            assert torch.equal(ours[: 4 * head_size], theirs[: 4 * head_size]), "the first four as before"
            assert not torch.equal(ours[4 * head_size : 8 * head_size], theirs[4 * head_size : 8 * head_size])
            assert torch.equal(ours[8 * head_size :], theirs[8 * head_size :]), "the other heads stay mimetic"
    tokens = torch.randint(5, TOKENIZER_SIZE, (4, 128), generator=torch.Generator().manual_seed(0))
    model.set_attn_implementation("eager")
    with torch.no_grad():
        attentions = model(input_ids=tokens, output_attentions=True).attentions
    positions = torch.arange(40, 88)  # 40 tokens on either side
    windows = [(1, 3), (4, 7), (8, 16), (17, 33)]
    for layer, attention in enumerate(attentions):
        for head in range(8):
            side = 1 if head % 2 else -1
            share = [attention[:, head, positions, positions + side * offset].mean().item() for offset in range(34)]
            by_window = [sum(share[first : last + 1]) for first, last in windows]
            assert max(by_window) == by_window[head // 2] > 0.5, (layer, head, by_window)


def test_local_window_gain_scales_the_window_rows_only_and_a_lower_gain_starts_softer_windows():
    # Heads of 64 like the real job's; the gain multiplies the window heads' query and key rows.
    shape = ["model.hidden_size=768", "model.num_attention_heads=12", "model.intermediate_size=256"]
    shape += ["model.num_hidden_layers=2", "model.max_position_embeddings=130"]
    local = [*TINY, *shape, "train.attention_init=mimetic_local"]
    models = {
        gain: init_model(load_job(None, [*local, f"train.local_window_gain={gain}"]), TOKENIZER_SIZE)
        for gain in (1.0, 2.0)
    }
    windows = slice(0, 4 * 64)
    for soft, sharp in zip(models[1.0].roberta.encoder.layer, models[2.0].roberta.encoder.layer, strict=True):
        for part in ("query", "key"):
            ours, theirs = getattr(soft.attention.self, part).weight, getattr(sharp.attention.self, part).weight
            assert torch.equal(2 * ours[windows], theirs[windows])
            assert torch.equal(ours[windows.stop :], theirs[windows.stop :]), "the mimetic heads do not change"

    tokens = torch.randint(5, TOKENIZER_SIZE, (4, 128), generator=torch.Generator().manual_seed(0))
    positions = torch.arange(40, 88)
    share = {}
    for gain, model in models.items():
        model.set_attn_implementation("eager")
        with torch.no_grad():
            first = model(input_ids=tokens, output_attentions=True).attentions[0]
        # Head 0 looks left over the fastest band: its share on the 1-3 tokens before.
        share[gain] = sum(first[:, 0, positions, positions - back].mean().item() for back in (1, 2, 3))
    assert share[2.0] > 0.5 and share[1.0] < share[2.0] - 0.1, share
    with pytest.raises(JobConfigError, match="train.local_window_gain"):
        load_job(None, [*local, "train.local_window_gain=0"])


@pytest.mark.parametrize(
    ("overrides", "names"),
    [
        (["train.position_init=random"], "train.position_init sinusoidal"),
        (["model.num_attention_heads=2"], "model.num_attention_heads of at least train.local_window_heads"),
        (["train.local_window_heads=6"], r"at least train.local_window_heads \(6\)"),
        (["train.local_window_heads=3"], "train.local_window_heads must be even"),
    ],
)
def test_local_window_heads_need_the_sinusoidal_table_and_four_heads(overrides: list[str], names: str):
    with pytest.raises(JobConfigError, match=names):
        load_job(None, [*TINY, "model.num_attention_heads=4", "train.attention_init=mimetic_local", *overrides])
