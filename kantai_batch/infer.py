"""fill-mask: the recipe's FillMaskPipeline step on a saved model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kantai_batch.errors import InputDataError
from kantai_batch.model import load_lm, load_lm_tokenizer


def fill_mask(model_dir: Path, text: str, top_k: int = 5) -> list[list[dict[str, Any]]]:
    """The ``top_k`` predictions for every mask in ``text``: one list of candidates per mask."""
    from transformers import pipeline

    tokenizer = load_lm_tokenizer(model_dir, "mlm", "fill-mask")
    if tokenizer.mask_token not in text:
        raise InputDataError(f"text {text!r} has no {tokenizer.mask_token} token to fill")
    fill = pipeline("fill-mask", model=load_lm(model_dir, "mlm"), tokenizer=tokenizer)
    results = fill(text, top_k=top_k)
    # The pipeline returns a flat list for one mask and a list per mask for several.
    per_mask = results if results and isinstance(results[0], list) else [results]
    return [
        [{"token_str": c["token_str"], "score": float(c["score"]), "sequence": c["sequence"]} for c in candidates]
        for candidates in per_mask
    ]
