"""One training of a remote run dir at a time, across machines: a lease object in the store.

The file lock (``manifest.only_writer``) holds on one machine's disk. Two machines training one
``s3://`` run dir (a job submitted twice, a manual run beside the scheduled one) would each resume,
set aside and prune the other's checkpoints. So the training's main process also holds a lease in
the store: an object created only if absent (a conditional write), renewed by a background thread
every third of its term, deleted when the training ends. Another writer that finds the lease renewed
fails with exit 4 naming its holder. A lease left by a pod that was killed outright is renewed no more
and is taken over once a whole term has passed unrenewed, so the retried pod waits one term at most
instead of failing. The holders' clocks are never compared: only whether the object changed.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

from kantai_batch import s3
from kantai_batch.errors import JobConfigError, KantaiError, SourceUnavailableError
from kantai_batch.s3 import S3Uri

log = logging.getLogger(__name__)

TERM_ENV = "KANTAI_LEASE_S"
_DEFAULT_TERM_S = 60.0


def lease_term() -> float:
    """Seconds a lease lasts unrenewed (``KANTAI_LEASE_S``, default 60)."""
    text = os.environ.get(TERM_ENV, str(_DEFAULT_TERM_S))
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not value > 0:
        raise JobConfigError(f"{TERM_ENV} must be a number of seconds above 0, got {text!r}")
    return value


@contextlib.contextmanager
def held(folder: S3Uri, name: str, what: str) -> Iterator[None]:
    """Hold the lease ``name`` below ``folder`` while the block runs; ``what`` names the work it guards."""
    term = lease_term()
    uri = folder.child(name)
    mine = {"holder": f"process {os.getpid()} on {socket.gethostname()}", "token": secrets.token_hex(8)}
    _acquire(folder, name, mine, term, what)
    stop = threading.Event()
    renewer = threading.Thread(target=_renew, args=(uri, mine, term, stop), name="kantai-lease", daemon=True)
    renewer.start()
    try:
        yield
    finally:
        stop.set()
        renewer.join()
        _release(folder, name, mine)


def _record(mine: dict[str, str], term: float) -> dict[str, Any]:
    # A fresh nonce each renewal: what a waiting writer compares to see the holder alive.
    return {**mine, "term_s": term, "renewal": secrets.token_hex(4)}


def _acquire(folder: S3Uri, name: str, mine: dict[str, str], term: float, what: str) -> None:
    uri = folder.child(name)
    seen: Any = None
    while True:
        if s3.create_if_absent(uri, json.dumps(_record(mine, term)).encode("utf-8")):
            return
        found = _read(uri)
        if found is None:
            continue  # released since: try again
        holder = found.get("holder", "another process") if isinstance(found, dict) else "another process"
        if seen is not None:
            if found != seen:
                raise SourceUnavailableError(
                    f"{what} is being written by {holder} (its lease {uri} is renewed): wait for it to finish "
                    "(or stop it) and run this again"
                )
            log.warning("lease: %s was not renewed for %gs; its holder is gone, taking it over", uri, term)
            with contextlib.suppress(KantaiError):
                s3.delete_keys(folder, [name])
            seen = None
            continue
        seen = found
        log.info("lease: %s is held by %s; waiting %gs to see whether it is renewed", uri, holder, term)
        time.sleep(term)


def _read(uri: S3Uri) -> Any:
    try:
        return s3.read_json_if_exists(uri)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return "damaged"  # no holder renews it into shape: taken over after a term, as a stale one


def _renew(uri: S3Uri, mine: dict[str, str], term: float, stop: threading.Event) -> None:
    while not stop.wait(term / 3):
        try:
            found = _read(uri)
            if not isinstance(found, dict) or found.get("token") != mine["token"]:
                # Unrenewed for a term (the store out of reach): another writer may have taken it over.
                log.error("lease: %s is no longer this process's (held by %s)", uri, found)
                return
            s3.put_json(uri, _record(mine, term))
        except KantaiError as exc:  # the store out of reach for a moment: the next renewal may get through
            log.warning("lease: could not renew %s: %s", uri, exc)


def _release(folder: S3Uri, name: str, mine: dict[str, str]) -> None:
    try:
        found = _read(folder.child(name))
        if isinstance(found, dict) and found.get("token") == mine["token"]:
            s3.delete_keys(folder, [name])
    except KantaiError as exc:  # left behind, it is taken over after a term
        log.warning("lease: could not release %s: %s", folder.child(name), exc)
