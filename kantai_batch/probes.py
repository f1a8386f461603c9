"""Quality probes people can read: does the model put an acceptable word in a sentence's ``<mask>``?

A probe file has one probe per line, ``TEXT -> ANSWER, ANSWER, ...``: TEXT has exactly one mask
token, the answers are the words that count as right. Blank lines and lines starting with ``#`` are
skipped. A probe is hit at k when one of its answers is among the model's top k predictions (compared
without case and surrounding spaces).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kantai_batch.errors import InputDataError, SourceUnavailableError

SEPARATOR = "->"


@dataclass(frozen=True)
class Probe:
    text: str
    answers: tuple[str, ...]
    line: int


def read_probes(path: str | Path, mask_token: str = "<mask>") -> list[Probe]:
    """Parse a probe file; a malformed line is an error naming the file and the line."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise SourceUnavailableError(f"probe file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise InputDataError(f"probe file {path} cannot be read: {exc}") from None
    probes = []
    for number, line in enumerate(lines, start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        text, sep, answers = line.rpartition(SEPARATOR)
        words = tuple(word.strip().lower() for word in answers.split(",") if word.strip())
        where = f"probe file {path}, line {number}"
        if not sep or not words:
            raise InputDataError(f"{where}: expected 'TEXT {SEPARATOR} ANSWER[, ANSWER...]', got {line.strip()!r}")
        if text.count(mask_token) != 1:
            raise InputDataError(f"{where}: the text needs exactly one {mask_token}, got {text.count(mask_token)}")
        probes.append(Probe(text.strip(), words, number))
    if not probes:
        raise InputDataError(f"probe file {path} has no probes")
    return probes


def score_probes(fill, probes: list[Probe], top_k: int) -> dict[str, Any]:
    """Top-1 and top-k hits of a fill-mask pipeline on the probes, with each probe's predictions."""
    rows = []
    for probe in probes:
        # One text with one mask gives a flat list of candidates (a batch of one would not).
        candidates = fill(probe.text, top_k=top_k)
        predicted = [candidate["token_str"].strip().lower() for candidate in candidates]
        rank = next((i + 1 for i, word in enumerate(predicted) if word in probe.answers), None)
        rows.append({"text": probe.text, "answers": list(probe.answers), "predicted": predicted, "rank": rank})
    count = len(rows)
    return {
        "probes": count,
        "top_k": top_k,
        "top1_hits": sum(1 for row in rows if row["rank"] == 1),
        "topk_hits": sum(1 for row in rows if row["rank"] is not None),
        "results": rows,
    }


def quality_report(model, tokenizer, job, probes: list[Probe] | None) -> dict[str, Any]:
    """The recipe's fill-mask sentence and, when there are probes, their hits."""
    from transformers import pipeline

    fill = pipeline("fill-mask", model=model, tokenizer=tokenizer)
    top_k = job.infer.top_k
    sentence = fill(job.infer.fill_mask_text, top_k=top_k)
    report: dict[str, Any] = {
        "fill_mask": {
            "text": job.infer.fill_mask_text,
            "predicted": [candidate["token_str"].strip() for candidate in sentence],
        }
    }
    if probes:
        report["probes"] = score_probes(fill, probes, top_k)
    return report


def format_quality(report: dict[str, Any]) -> list[str]:
    if not report:
        return []
    lines = [f"fill-mask {report['fill_mask']['text']!r}: {', '.join(report['fill_mask']['predicted'])}"]
    probes = report.get("probes")
    if probes:
        lines.append(
            f"probes: {probes['top1_hits']}/{probes['probes']} right at top 1, "
            f"{probes['topk_hits']}/{probes['probes']} in the top {probes['top_k']}"
        )
    return lines
