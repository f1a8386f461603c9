"""The sampling settings: one model validates the job's generate section, the options and the page's fields."""

from __future__ import annotations

import pytest

from helpers import invoke
from kantai_batch.errors import JobConfigError
from kantai_batch.job import GenerateSection, Sampling


@pytest.mark.parametrize(
    ("given", "message"),
    [
        ({"top_p": 3}, "top-p must be at most 1, got 3"),
        ({"top_p": 0}, "top-p must be above 0, got 0"),
        ({"max_new_tokens": 0}, "max-new-tokens must be at least 1, got 0"),
        ({"seed": -1}, "seed must be at least 0, got -1"),
        ({"seed": 2**32}, "seed must be below 4294967296, got 4294967296"),
        ({"temperature": "warm"}, "temperature must be a number, got 'warm'"),
        ({"top_k": "5.5"}, "top-k must be a whole number, got '5.5'"),
        ({"temperature": 0, "num_return_sequences": 2}, "greedy decoding (temperature 0) gives one answer"),
    ],
)
def test_bad_settings_are_one_line_naming_the_setting(given: dict, message: str):
    with pytest.raises(JobConfigError) as caught:
        GenerateSection().with_overrides(**given)
    assert message in str(caught.value) and "\n" not in str(caught.value)


def test_overrides_keep_unset_and_empty_settings():
    section = GenerateSection(temperature=0.5, seed=3)
    # The page sends its form's strings; an empty field keeps the job's value.
    sampling = section.with_overrides(max_new_tokens="7", top_p="0.5", seed="", top_k=None)
    assert type(sampling) is Sampling
    assert sampling.model_dump() == {
        "max_new_tokens": 7,
        "temperature": 0.5,
        "top_k": 50,
        "top_p": 0.5,
        "seed": 3,
        "num_return_sequences": 1,
    }


@pytest.mark.parametrize("command", ["generate", "chat"])
def test_commands_refuse_bad_options_before_loading_a_model(command: str, tmp_path):
    result = invoke(command, "--model", str(tmp_path / "no-model"), "--top-p", "3", expect=2)
    assert result.stderr.strip() == "kantai-batch: error: top-p must be at most 1, got 3.0"


def test_the_job_file_is_held_to_the_same_rules():
    result = invoke("inspect", "--set", "generate.temperature=0", "--set", "generate.num_return_sequences=2", expect=2)
    assert "generate: greedy decoding (temperature 0) gives one answer" in result.stderr
