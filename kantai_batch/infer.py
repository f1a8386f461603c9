"""fill-mask: the recipe's FillMaskPipeline step on a saved model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kantai_batch.errors import InputDataError
from kantai_batch.model import load_lm, load_lm_tokenizer, load_model_config, usable_positions


def fill_mask(model_dir: Path, text: str, top_k: int = 5) -> list[list[dict[str, Any]]]:
    """The ``top_k`` predictions for every mask in ``text``: one list of candidates per mask."""
    from transformers import pipeline

    tokenizer = load_lm_tokenizer(model_dir, "mlm", "fill-mask")
    if tokenizer.mask_token not in text:
        raise InputDataError(f"text {text!r} has no {tokenizer.mask_token} token to fill")
    # The pipeline neither truncates nor bounds k: both would fail deep inside torch, after the weights load.
    config = load_model_config(model_dir)
    tokens, longest = len(tokenizer(text)["input_ids"]), usable_positions(config)
    if tokens > longest:
        raise InputDataError(f"the text is {tokens} tokens; model {model_dir} reads at most {longest}")
    if top_k > config.vocab_size:
        raise InputDataError(f"top-k {top_k} is more than model {model_dir}'s {config.vocab_size} tokens")
    fill = pipeline("fill-mask", model=load_lm(model_dir, "mlm"), tokenizer=tokenizer)
    results = fill(text, top_k=top_k)
    # The pipeline returns a flat list for one mask and a list per mask for several.
    per_mask = results if results and isinstance(results[0], list) else [results]
    return [
        [{"token_str": c["token_str"], "score": float(c["score"]), "sequence": c["sequence"]} for c in candidates]
        for candidates in per_mask
    ]
