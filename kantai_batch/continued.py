"""Continued pretraining (``train.init_from``): start from a trained model's weights and its tokenizer.

A model that follows a growing corpus is trained on from the one in use rather than from random
weights. Its token ids must keep their meaning, so train-tokenizer copies the model's tokenizer instead
of training one, and pretrain loads the model's weights into the job's architecture.

``train.init_from`` naming a registry alias that does not exist yet (``models:/NAME@champion`` before
the first version is promoted) trains from scratch: that is how the first scheduled retraining starts.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from kantai_batch import manifest
from kantai_batch.errors import JobConfigError
from kantai_batch.job import Job
from kantai_batch.s3 import S3Uri, is_s3

log = logging.getLogger(__name__)


def init_identity(job: Job) -> Any:
    """What the job starts from, for fingerprints: a registered version, a folder's manifest, or None.

    Never downloads: every rank of a launch computes fingerprints at once.
    """
    uri = job.train.init_from
    if not uri:
        return None
    from kantai_batch.registry import is_registry_uri, resolve_version

    if is_registry_uri(uri):
        resolved = resolve_version(uri)
        return None if resolved is None else {"registered": resolved[0], "version": resolved[1]}
    if is_s3(uri):
        found = manifest.remote_marker(S3Uri.parse(uri))
        return {"files": found.get("files")} if found else {"missing": uri}
    folder = Path(uri).expanduser()
    if manifest.is_complete(folder):
        return {"files": manifest.read_marker(folder).get("files")}
    files = sorted(p for p in folder.rglob("*") if p.is_file()) if folder.is_dir() else []
    return {"files": {p.relative_to(folder).as_posix(): manifest.file_sha256(p) for p in files}}


def init_model_dir(job: Job) -> Path | None:
    """A local copy of ``train.init_from``; None when unset or when it names an alias not set yet."""
    uri = job.train.init_from
    if not uri:
        return None
    from kantai_batch.model import load_model_config
    from kantai_batch.registry import cached_pull, is_registry_uri, model_exists, registered_name, resolve_version
    from kantai_batch.sources import cache_dir, local_model

    if is_registry_uri(uri):
        resolved = resolve_version(uri)
        if resolved is None:
            name = registered_name(uri)
            if model_exists(name):
                # A mistyped alias, or versions registered without it: not the first retraining it looks like.
                log.warning("train.init_from %s: %s has versions but not this one; training from scratch", uri, name)
            else:
                log.info("train.init_from %s: no such version yet, training from scratch", uri)
            return None
        folder = cached_pull(f"models:/{resolved[0]}/{resolved[1]}", cache_dir())
    else:
        folder = local_model(uri)
    load_model_config(folder)  # a folder that is not a model fails here, naming it
    return folder


def copy_tokenizer(job: Job, run, source: Path, fingerprint: str) -> Path:
    """Commit ``source``'s tokenizer as the run's (its marker recording ``fingerprint``), after checking
    that the job's tokenizer settings allow it."""
    from kantai_batch.model import load_model_tokenizer

    tokenizer = load_model_tokenizer(source)
    require_compatible_tokenizer(job, tokenizer)
    with run.committed(run.tokenizer, inputs_sha256=fingerprint, copied_from=job.train.init_from) as out:
        tokenizer.save_pretrained(str(out))
    log.info(
        "tokenizer: copied from %s (%s tokens), so token ids keep their meaning; not trained",
        job.train.init_from,
        f"{len(tokenizer):,}",
    )
    return run.tokenizer


def require_compatible_tokenizer(job: Job, tokenizer) -> None:
    """The job's tokenizer settings that the copied tokenizer cannot honour, as one config error."""
    problems = []
    wanted = tuple(job.tokenizer.special_tokens)
    have = (
        tokenizer.bos_token,
        tokenizer.pad_token,
        tokenizer.eos_token,
        tokenizer.unk_token,
        tokenizer.mask_token,
    )
    if wanted != have:
        problems.append(f"tokenizer.special_tokens {list(wanted)} but the model's are {list(have)}")
    if len(tokenizer) > job.tokenizer.vocab_size:
        problems.append(f"tokenizer.vocab_size {job.tokenizer.vocab_size} but the model's has {len(tokenizer)} tokens")
    conversation = job.corpus.format == "twcs" and job.corpus.conversation
    if conversation and job.corpus.separator not in tokenizer.all_special_tokens:
        problems.append(f"corpus.separator {job.corpus.separator} is not a special token of the model's")
    if problems:
        raise JobConfigError(
            f"train.init_from {job.train.init_from}: its tokenizer conflicts with the job ({'; '.join(problems)}); "
            "change the job or set train.init_from to null to train from scratch"
        )


def continued_model(job: Job, source: Path, tokenizer):
    """The model at ``source`` loaded into the job's architecture (its dropout settings included)."""
    from kantai_batch.data import tokenizer_digest
    from kantai_batch.model import (
        ARCHITECTURE_KEYS,
        load_model_config,
        load_model_tokenizer,
        load_weights,
        resolved_vocab_size,
        roberta_config,
    )
    from kantai_batch.objective import model_class

    if tokenizer_digest(load_model_tokenizer(source)) != tokenizer_digest(tokenizer):
        raise JobConfigError(
            f"train.init_from {job.train.init_from}: the run's tokenizer is not the model's; "
            "run `kantai-batch train-tokenizer` again, which copies it"
        )
    wanted = roberta_config(job, resolved_vocab_size(job, len(tokenizer)))
    saved = load_model_config(source).to_dict()
    keys = (*ARCHITECTURE_KEYS, "is_decoder")
    changed = [
        f"{key} {saved.get(key)} -> {getattr(wanted, key)}"
        for key in keys
        if saved.get(key, False) != getattr(wanted, key)
    ]
    if changed:
        raise JobConfigError(
            f"train.init_from {job.train.init_from} has another architecture than the job ({', '.join(changed)}); "
            "change the job's model section or set train.init_from to null to train from scratch"
        )
    return load_weights(model_class(job.task), source, config=wanted)
