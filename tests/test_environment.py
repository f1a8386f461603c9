"""Numbers the environment sets (KANTAI_*_S), checked in one place."""

from __future__ import annotations

import pytest

from kantai_batch.environment import seconds
from kantai_batch.errors import JobConfigError


@pytest.mark.parametrize(
    ("text", "zero", "expected"),
    [(None, False, 60.0), ("2.5", False, 2.5), ("0", True, 0.0), ("300", True, 300.0)],
)
def test_a_number_of_seconds_is_read_or_defaulted(monkeypatch, text, zero, expected):
    if text is not None:
        monkeypatch.setenv("KANTAI_WAIT_S", text)
    assert seconds("KANTAI_WAIT_S", 60.0, zero=zero) == expected


@pytest.mark.parametrize(
    ("text", "zero", "bound"),
    [("soon", False, "above 0"), ("0", False, "above 0"), ("-1", True, "at least 0"), ("inf", True, "at least 0"),
     ("nan", False, "above 0")],
)  # fmt: skip
def test_anything_but_a_finite_number_in_range_names_the_setting(monkeypatch, text, zero, bound):
    """`inf` was taken: a wait it bounds would never end."""
    monkeypatch.setenv("KANTAI_WAIT_S", text)
    with pytest.raises(JobConfigError, match=rf"^KANTAI_WAIT_S must be a number of seconds {bound}, got '{text}'$"):
        seconds("KANTAI_WAIT_S", 60.0, zero=zero)
