"""Quality probes people can read: does the model put an acceptable word in a sentence's ``<mask>``?

A probe file has one probe per line, ``TEXT -> ANSWER, ANSWER, ...``: TEXT has exactly one mask
token, the answers are the words that count as right. Blank lines and lines starting with ``#`` are
skipped. A probe's rank is that of its best answer among all the model's predictions (compared
without case); it is hit at k when that rank is k or better. An answer is the word as it stands at
the mask: after a space, the byte-level token that starts with one (``Ġreason``), not the same
letters inside a word, which would fill the sentence as "human·reason" glued to what precedes.
"""

from __future__ import annotations

import logging
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kantai_batch.errors import InputDataError, JobConfigError

SEPARATOR = "->"
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Probe:
    text: str
    answers: tuple[str, ...]
    line: int


PROBES_SHA256 = "probes_sha256"
"""The committed evaluation's marker key: the checksum of the probe file it scored."""


def probe_record(path: str | Path | None) -> dict[str, str]:
    """What an evaluation records of the probe file it scored, for ``probes_change``."""
    from kantai_batch.manifest import file_sha256

    return {PROBES_SHA256: file_sha256(Path(path))} if path else {}


def probes_change(job, run, marker: dict[str, Any]) -> str | None:
    """How the job's probe file differs from the one the committed evaluation scored, or None: the job
    names a path, and a probe added to the file left ``run`` showing the old scores."""
    recorded = marker.get(PROBES_SHA256)
    if recorded is None or not job.eval.probes:  # no probes, or scored before their checksum was kept
        return None
    try:
        now = probe_record(job.eval.probes)[PROBES_SHA256]
    except OSError:
        return None  # gone: the evaluation's own read says so
    return None if now == recorded else f"probe file {job.eval.probes} changed"


def read_probes(path: str | Path, mask_token: str = "<mask>") -> list[Probe]:
    """Parse a probe file; a malformed line is an error naming the file and the line."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        # The job names it, and a retry finds it missing again: a job's error, not an unreachable source.
        raise JobConfigError(
            f"eval.probes: probe file {path} does not exist (relative paths start at {Path.cwd()})"
        ) from None
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


def require_fitting(tokenizer, positions: int, job, probes: list[Probe] | None) -> None:
    """Every text the quality report gives the model fits in its ``positions``: checked before the
    evaluation, which a text too long would otherwise end with a traceback."""
    texts = [("infer.fill_mask_text", job.infer.fill_mask_text)]
    texts += [(f"probe file {job.eval.probes}, line {probe.line}", probe.text) for probe in probes or []]
    for where, text in texts:
        tokens = len(tokenizer(text)["input_ids"])
        if tokens > positions:
            raise InputDataError(f"{where}: the text is {tokens} tokens; the model reads at most {positions}")


def score_probes(model, tokenizer, probes: list[Probe], top_k: int, source: str = "probes") -> dict[str, Any]:
    """Each probe's rank of its best acceptable answer in the whole vocabulary, and the hits at 1 and k.

    The rank moves long before a right answer reaches the top k, so it shows a model learning
    concepts while the hits still read 0. An answer that is no single token of this tokenizer can
    never be predicted: it is named in a warning and in the probe's ``unscorable``, and a probe with
    no other answer counts as missed.
    """
    import torch

    # token_str as the fill-mask pipeline gives it: each id decoded alone, its leading space kept.
    spelled = [word.lower() for word in tokenizer.batch_decode([[i] for i in range(len(tokenizer))])]
    words = [word.strip() for word in spelled]
    ids_of: dict[str, list[int]] = {}
    for token_id, word in enumerate(spelled):
        ids_of.setdefault(word, []).append(token_id)
    rows, vocabulary = [], 0
    for probe in probes:
        lead = " " if probe.text.split(tokenizer.mask_token)[0][-1:].isspace() else ""
        forms = {answer: _spellings(answer, lead) for answer in probe.answers}
        unscorable = [answer for answer, spellings in forms.items() if not any(s in ids_of for s in spellings)]
        if unscorable:
            log.warning(
                "%s, line %d: %s no single token of this tokenizer%s, so never predicted",
                source, probe.line, ", ".join(repr(lead + answer) for answer in unscorable),
                " (as a word after a space)" if lead else "",
            )  # fmt: skip
        encoded = tokenizer(probe.text, return_tensors="pt").to(model.device)
        with torch.no_grad():
            logits = model(**encoded).logits[0]
        position = int((encoded["input_ids"][0] == tokenizer.mask_token_id).nonzero()[0, 0])
        scores = logits[position].float()
        vocabulary = scores.numel()  # the model's rows, padding rows included: the pipeline ranks them too
        predicted = [words[i] if i < len(words) else "" for i in scores.topk(top_k).indices.tolist()]
        answer_ids = [token_id for spellings in forms.values() for s in spellings for token_id in ids_of.get(s, [])]
        rank = int((scores > scores[answer_ids].max()).sum()) + 1 if answer_ids else None
        row = {"text": probe.text, "answers": list(probe.answers), "predicted": predicted, "rank": rank}
        rows.append({**row, "unscorable": unscorable} if unscorable else row)
    ranks = sorted(row["rank"] for row in rows if row["rank"] is not None)
    return {
        "probes": len(rows),
        "top_k": top_k,
        "top1_hits": sum(1 for row in rows if row["rank"] == 1),
        "topk_hits": sum(1 for row in rows if row["rank"] is not None and row["rank"] <= top_k),
        # A probe none of whose answers is a token of the vocabulary has no rank and is left out.
        "median_rank": float(statistics.median(ranks)) if ranks else None,
        "unscorable_probes": sum(1 for row in rows if row["rank"] is None),
        "vocabulary": vocabulary,
        "results": rows,
    }


def _spellings(answer: str, lead: str) -> tuple[str, ...]:
    # Punctuation attaches to what precedes it ("determines."); a word stands apart.
    return (lead + answer,) if not lead or any(c.isalnum() for c in answer) else (lead + answer, answer)


def quality_report(model, tokenizer, job, probes: list[Probe] | None) -> dict[str, Any]:
    """The recipe's fill-mask sentence and, when there are probes, their hits and ranks."""
    from transformers import pipeline

    fill = pipeline("fill-mask", model=model, tokenizer=tokenizer)
    # A tiny model may have fewer tokens than infer.top_k: all of them, rather than a failure after the evaluation.
    top_k = min(job.infer.top_k, model.config.vocab_size)
    sentence = fill(job.infer.fill_mask_text, top_k=top_k)
    report: dict[str, Any] = {
        "fill_mask": {
            "text": job.infer.fill_mask_text,
            "predicted": [candidate["token_str"].strip() for candidate in sentence],
        }
    }
    if probes:
        report["probes"] = score_probes(model, tokenizer, probes, top_k, f"probe file {job.eval.probes}")
    return report


def format_quality(report: dict[str, Any]) -> list[str]:
    if not report:
        return []
    if "generate" in report:
        return [f"generate {report['generate']['prompt']!r}: {report['generate']['continuation']!r}"]
    lines = [f"fill-mask {report['fill_mask']['text']!r}: {', '.join(report['fill_mask']['predicted'])}"]
    probes = report.get("probes")
    if probes:
        lines.append(
            f"probes: {probes['top1_hits']}/{probes['probes']} right at top 1, "
            f"{probes['topk_hits']}/{probes['probes']} in the top {probes['top_k']}"
            + _median_rank(probes)
            + _unscorable(probes)
        )
    return lines


def _median_rank(probes: dict[str, Any]) -> str:
    median = probes.get("median_rank")  # absent from metrics written before ranks were kept
    if median is None:
        return ""
    return f", median rank of a right answer {median:,g} of {probes['vocabulary']:,}"


def _unscorable(probes: dict[str, Any]) -> str:
    count = probes.get("unscorable_probes")  # absent from metrics written before it was counted
    return f"; {count} with no answer in this vocabulary" if count else ""
