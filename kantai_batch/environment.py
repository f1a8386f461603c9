"""Settings the pods' environment gives as numbers (``KANTAI_*_S``): read and checked in one place."""

from __future__ import annotations

import math
import os

from kantai_batch.errors import JobConfigError


def seconds(name: str, default: float, *, zero: bool = False) -> float:
    """The finite number of seconds ``name`` sets (``default`` when unset): above 0, or at least 0 with
    ``zero``. Infinity is refused: it would wait forever where the setting bounds a wait."""
    text = os.environ.get(name)
    if text is None:
        return default
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value < 0 or (value == 0 and not zero):
        bound = "at least 0" if zero else "above 0"
        raise JobConfigError(f"{name} must be a number of seconds {bound}, got {text!r}")
    return value
