"""tokenize split over several pods (a Kubernetes Indexed Job) or processes: each makes its part, one commits.

Part i of n holds the train samples of its rows (``data.part_rows``: whole runs of the paragraphs that
are packed together, so its blocks are the ones a single process cuts from them); part 0 also holds
the whole eval split, which is small beside the train split. Each part is a
committed folder of its own, ``RUN/tokens-parts/part-<i>-of-<n>/`` (marker last, like any phase's
folder), so no pod writes where another does, and a rerun of a failed index redoes only its part.

A pod that, after committing its part, finds all n parts made from the same inputs claims that set
of parts: it creates a key named after their manifests, if absent (an S3 conditional write, or an
exclusive create on a local disk), and only the one pod that created it goes on. That pod commits
``RUN/tokens/`` from the parts — their samples concatenated in order, saved as the single-process
tokenize saves them — and removes the parts. Each commit of a part carries a new attempt id, so the
set a rerun completes has a new name: a claimant that died before committing blocks nothing.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from kantai_batch.data import build_split
from kantai_batch.errors import InputDataError, JobConfigError, SourceUnavailableError
from kantai_batch.fingerprint import fingerprint_of
from kantai_batch.job import Job
from kantai_batch.manifest import write_json_atomic
from kantai_batch.rundir import PART_STATS, RunDir
from kantai_batch.token_splits import token_count, write_splits

log = logging.getLogger(__name__)


def tokenize_part(job: Job, run: RunDir, tokenizer, *, index: int, count: int, workers: int | None) -> Path | None:
    """Make and commit part ``index`` of ``count``; commit ``RUN/tokens/`` if this completed the set.

    Returns the tokens folder when this process committed it, else None.
    """
    inputs = fingerprint_of(job, "tokenize", run, as_read=True)
    _refuse_other_counts(run, inputs, count)
    stats: dict[str, dict[str, int]] = {}
    marker = {"inputs_sha256": inputs, "part": index, "parts": count, "attempt": uuid.uuid4().hex}
    with run.committed(run.tokens_part(index, count), **marker) as out:
        made = {
            "train": build_split(
                run.train_text,
                job,
                tokenizer,
                fix_masks=False,
                what=f"train split, part {index} of {count}",
                workers=workers,
                part=(index, count),
            )
        }
        if index == 0:
            fix_masks = job.task == "mlm"
            made["eval"] = build_split(run.eval_text, job, tokenizer, fix_masks=fix_masks, what="eval split")
        for split, samples in made.items():
            if len(samples):  # a part of more pods than the corpus has runs of rows may have none
                samples.save_to_disk(str(out / split))
            stats[split] = {"samples": len(samples), "tokens": token_count(samples) if len(samples) else 0}
        write_json_atomic(out / PART_STATS, {"splits": stats})
    log.info(
        "tokenize: part %d of %d committed to %s (%s train samples)",
        index,
        count,
        run.uri(run.tokens_part(index, count)),
        f"{stats['train']['samples']:,}",
    )
    parts = _complete_parts(run, inputs, count)
    if len(parts) < count:
        if _committed_from(run, inputs):
            # A retried pod of a set committed (and cleared) meanwhile: its part would stay for good.
            run.discard(run.tokens_part(index, count))
            log.info("tokenize: tokens/ is committed from these inputs already; part %d of %d removed", index, count)
            return None
        log.info("tokenize: %d of %d parts are in; the process that completes them commits tokens/", len(parts), count)
        return None
    if not run.claim(run.tokens_parts / f"_COMMIT-{_set_name(parts)}", _claim_note()):
        log.info("tokenize: all %d parts are in and another process is committing tokens/ from them", count)
        return None
    return _commit(job, run, tokenizer, inputs, count, workers, claimed=parts)


def _committed_from(run: RunDir, inputs: str) -> bool:
    return (run.marker(run.tokens) or {}).get("inputs_sha256") == inputs


def _refuse_other_counts(run: RunDir, inputs: str, count: int) -> None:
    """Parts of these inputs in another number would never complete this set: a submission of another size.
    Where tokens/ is committed from these inputs already, they are a finished set's leftovers: removed."""
    committed = None
    for name, marker in run.committed_subfolders(run.tokens_parts).items():
        if marker.get("inputs_sha256") == inputs and marker.get("parts") != count:
            committed = _committed_from(run, inputs) if committed is None else committed
            if committed:
                run.discard(run.tokens_parts / name)
                continue
            raise JobConfigError(
                f"tokenize: {run.uri(run.tokens_parts)} holds {name}, a part of these inputs in {marker['parts']} "
                f"parts, not {count}: run {marker['parts']} parts, or delete that folder to start over"
            )


def _complete_parts(run: RunDir, inputs: str, count: int) -> dict[int, dict[str, Any]]:
    """The committed parts of this set (these inputs, ``count`` parts) by index, with their manifests."""
    found = {}
    for marker in run.committed_subfolders(run.tokens_parts).values():
        if marker.get("inputs_sha256") == inputs and marker.get("parts") == count:
            found[marker["part"]] = marker
    return found


def _set_name(parts: dict[int, dict[str, Any]]) -> str:
    attempts = [parts[index]["attempt"] for index in sorted(parts)]
    return hashlib.sha256(json.dumps(attempts).encode()).hexdigest()[:32]


def _claim_note() -> str:
    """Who claimed a set of parts, for a person reading the staging folder."""
    when = datetime.now(timezone.utc).isoformat(timespec="seconds")
    return json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "at": when}) + "\n"


def _commit(
    job: Job,
    run: RunDir,
    tokenizer,
    inputs: str,
    count: int,
    workers: int | None,
    *,
    claimed: dict[int, dict[str, Any]],
) -> Path:
    """Commit ``RUN/tokens/`` from the complete parts (``claimed``: the set claimed, by index), then remove them."""
    from datasets import concatenate_datasets, load_from_disk

    try:
        folders = [run.require(run.tokens_part(i, count), f"part {i} of {count}", "tokenize") for i in range(count)]
    except InputDataError as exc:
        # Only a part re-committed since it was listed (a rerun of its index) goes missing here; that
        # rerun completes a new set and commits it, so this is not the input error that fails the Job.
        raise SourceUnavailableError(f"tokenize: a part changed while tokens/ was committed from it: {exc}") from None
    for index, folder in enumerate(folders):
        # The folder at a part's path now may be another job's (part folders are named by index and count
        # alone): only the claimed set's samples may be committed under its fingerprint.
        if (run.marker_as_read(folder) or {}).get("files") != claimed[index].get("files"):
            raise SourceUnavailableError(
                f"tokenize: part {index} of {count} ({run.uri(folder)}) was replaced since the set was claimed "
                "(another tokenize of this run dir); run this part again"
            )
    train = [load_from_disk(str(folder / "train")) for folder in folders if (folder / "train").is_dir()]
    if not train:
        raise InputDataError(
            f"train split {run.uri(run.train_text)} is too small for one block of data.block_size "
            f"{job.data.block_size}: use a larger corpus or a smaller data.block_size"
        )
    samples = {"train": concatenate_datasets(train), "eval": load_from_disk(str(folders[0] / "eval"))}
    with run.committed(run.tokens, inputs_sha256=inputs) as out:
        write_splits(out, samples, job, run, tokenizer, workers=workers, inputs=inputs)
    log.info("tokenize: committed %s from %d parts", run.uri(run.tokens), count)
    run.discard(run.tokens_parts)
    return run.tokens
