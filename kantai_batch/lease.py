"""One writer of a remote run dir's folder at a time, across machines: a lease object in the store.

The file lock (``manifest.only_writer``) holds on one machine's disk. Two machines training one
``s3://`` run dir (a job submitted twice, a manual run beside the scheduled one) would each resume,
set aside and prune the other's checkpoints, and two committing one folder would interleave their
uploads. So the training's main process, and every phase committing a folder, also holds a lease in
the store. Every write of it is conditional on what the writer last saw (its ETag): created only if
absent, renewed only if still this process's own write, taken over only from the very object seen
unrenewed for a whole term. So of machines racing for it exactly one wins, and a holder that was only
slow cannot overwrite its successor. A fresh nonce in each renewal changes the ETag: another writer
that sees it change knows the holder alive and fails with exit 4 naming it; a lease left by a pod
killed outright changes no more and is taken over after one term, so the retried pod waits instead
of failing. Clocks are never compared. A holder that finds its lease gone to another, or cannot renew
it for most of a term, marks it lost: ``Lease.require`` then stops the work before it writes again. A
holder that merely could not reach the store keeps renewing, conditionally on its own last write: once
one gets through, nobody took the lease over meanwhile, and it is the holder's again. ``require`` tries
such a renewal itself before refusing, so a store back just before a commit does not fail the phase.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import secrets
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

from kantai_batch import s3
from kantai_batch.environment import seconds
from kantai_batch.errors import JobConfigError, KantaiError, SourceUnavailableError
from kantai_batch.s3 import S3Uri

log = logging.getLogger(__name__)

TERM_ENV = "KANTAI_LEASE_S"
_DEFAULT_TERM_S = 60.0
# Renewals per term: a holder unrenewed for most of a term is taken for gone by a waiting writer.
_RENEWALS = 3


def lease_term() -> float:
    """Seconds a lease lasts unrenewed (``KANTAI_LEASE_S``, default 60)."""
    return seconds(TERM_ENV, _DEFAULT_TERM_S)


def require_term_within(wait_s: float, setting: str) -> None:
    """The other processes of a launch wait for the main one's lease within ``wait_s``: up to a term."""
    term = lease_term()
    if term * 2 > wait_s:
        raise JobConfigError(
            f"{TERM_ENV} {term:g} must be at most half of {setting} ({wait_s:g} s): the other processes of the "
            "launch wait for the lease within it"
        )


class Lease:
    """A lease this process holds: renewed in the background until ``release``."""

    def __init__(self, folder: S3Uri, name: str, what: str, term: float, wait_s: float | None = None) -> None:
        self.folder, self.name, self.what, self.term = folder, name, what, term
        # How long this process may wait on another's lease (the launch's other processes wait for it).
        self.wait_s = wait_s
        self.uri = folder.child(name)
        self.token = secrets.token_hex(8)
        self.holder = f"process {os.getpid()} on {socket.gethostname()}"
        self.lost = threading.Event()
        # Another process's write found where ours was: lost for good, unlike a lease the clock marked lost.
        self._taken = threading.Event()
        # One renewal at a time: the renewer's, or one a writer tries itself (``require``) at most once a slot.
        self._renewing = threading.Lock()
        self._tried_at = -math.inf
        self._etag: str | None = None
        # When the write behind ``_etag`` was sent (the store took it after that): a waiting writer takes
        # the lease over a whole term after it, so this process must not count on it past most of a term.
        self._renewed_at = 0.0
        # The renewals sent since the last one answered, by nonce, and when: one the store took unheard is
        # found on a later try, and the lease was renewed when that one was sent, not when it is found.
        self._unanswered: dict[str, float] = {}
        self._stop = threading.Event()
        self._renewer = threading.Thread(target=self._renew_until_stopped, name="kantai-lease", daemon=True)

    def _overdue(self) -> bool:
        return time.monotonic() - self._renewed_at > self.term * (_RENEWALS - 1) / _RENEWALS

    def require(self) -> None:
        """Raise when the lease is no longer this process's: another machine may be writing now."""
        if not self.lost.is_set() and self._overdue():
            # The renewer may be stuck in a request that has not failed yet: the clock decides, not it.
            log.error("lease: %s unrenewed for most of its term; another machine may take it over", self.uri)
            self.lost.set()
        if self.lost.is_set() and not self._taken.is_set():
            # A store back just before a commit would otherwise fail the phase until the renewer's next tick.
            self._renew_now()
        if self.lost.is_set():
            raise SourceUnavailableError(
                f"{self.what}: this process lost its lease {self.uri} (renewals failed, or another machine holds "
                "it now); stopped without writing more: run it again once the other writer is done"
            )

    def _body(self, renewal: str | None = None) -> bytes:
        # A fresh nonce in each write: its ETag is what a waiting writer watches change.
        record: dict[str, Any] = {"holder": self.holder, "token": self.token, "term_s": self.term}
        return json.dumps({**record, "renewal": renewal or secrets.token_hex(4)}).encode("utf-8")

    def acquire(self) -> None:
        seen: str | None = None
        waited = self.term
        while True:
            self._renewed_at = time.monotonic()
            self._etag = s3.put_if(self.uri, self._body())
            if self._etag:
                break
            found = s3.read_with_etag(self.uri)
            if found is None:
                time.sleep(0.5)  # released since: try again
                continue
            record, etag = _parsed(found[0]), found[1]
            if record.get("token") == self.token:  # our own create, retried after its answer was lost
                self._etag = etag
                break
            holder = record.get("holder", "another process")
            if seen is None:
                seen = etag
                # The holder's own term, where it is the longer: a process told a shorter one (another
                # KANTAI_LEASE_S by hand) would take a live holder's lease between its renewals.
                waited = max(self.term, _term_of(record))
                if self.wait_s is not None and waited * 2 > self.wait_s:
                    raise SourceUnavailableError(
                        f"{self.what} is leased by {holder} for {waited:g} s ({self.uri}), longer than this "
                        f"launch's processes wait for each other ({self.wait_s:g} s): run it again once that "
                        "writer is done or its lease has lapsed"
                    )
                log.info("lease: %s is held by %s; waiting %gs to see whether it is renewed", self.uri, holder, waited)
                time.sleep(waited)
                continue
            if etag != seen:
                raise SourceUnavailableError(
                    f"{self.what} is being written by {holder} (its lease {self.uri} is renewed): wait for it to "
                    "finish (or stop it) and run this again"
                )
            # From the very object seen unrenewed: of two writers taking it over, one wins.
            self._renewed_at = time.monotonic()
            self._etag = s3.put_if(self.uri, self._body(), match=etag)
            if self._etag:
                log.warning("lease: %s was not renewed for %gs; its holder is gone, took it over", self.uri, waited)
                break
            seen = None
        self._renewer.start()

    def _renew_until_stopped(self) -> None:
        slot = self.term / _RENEWALS
        while not self._stop.wait(slot):
            # Held while judging a failure too: a writer's own renewal landing between the clock check and
            # marking the lease lost would be undone.
            with self._renewing:
                try:
                    if not self._renew_once(slot):
                        return
                except KantaiError as exc:  # the store out of reach for a moment: the next one may get through
                    log.warning("lease: could not renew %s: %s", self.uri, exc)
                    if self._overdue() and not self.lost.is_set():
                        log.error(
                            "lease: %s unrenewed for most of its term; another machine may take it over", self.uri
                        )
                        self.lost.set()
                    # Renewals go on: a store back within the term finds our write unchanged and the lease ours
                    # (a phase's hours of work are not lost to a minute's outage); ``require`` refuses meanwhile.

    def _renew_now(self) -> None:
        """One renewal by a writer that found the lease lost by the clock; the writing threads of an upload
        share it (one try a slot), so a store still away costs them one bounded request, not one each."""
        slot = self.term / _RENEWALS
        # A renewal in flight (the renewer's, or another writing thread's) is waited for, up to a slot: the
        # store back during its retry, it finds the lease ours again, and refusing before it answers failed
        # the phase. One that outlasts the slot is the store still away: refused, as before.
        if not self._renewing.acquire(timeout=slot):
            return
        try:
            if not self.lost.is_set() or self._taken.is_set() or time.monotonic() - self._tried_at < slot:
                return
            self._tried_at = time.monotonic()
            self._renew_once(slot)
        except KantaiError as exc:
            log.warning("lease: could not renew %s: %s", self.uri, exc)
        finally:
            self._renewing.release()

    def _renew_once(self, slot: float) -> bool:
        """Renew the lease where it is still this process's last write; False once it is another's."""
        # Each request gives up within its slot: one stalled in its 60 s timeouts would outlast the term.
        etag, renewal = self._send(slot, match=self._etag)
        if etag is None and (own := self._own_write(slot)) is not None:
            # A renewal the store took whose answer was lost: this one (the connection dropped as it came
            # back, and the client's retry found the ETag changed, by our own write), or an earlier one that
            # failed as far as we knew. Still ours.
            etag, renewal = own
        # Not our last write any more: deleted, or another's. Once marked lost, a missing lease may be one
        # another writer took over and released meanwhile: not ours to create again.
        if etag is None and not self._stop.is_set() and not self.lost.is_set():
            etag, renewal = self._send(slot)  # deleted (by hand, a lifecycle rule)
        if etag is not None:  # kept even when stopping: the release deletes only this write
            # Counted from when the write found was sent: from now, an earlier one's would let us write on
            # for up to a slot after another machine may take the lease over. Not among them: acquire's.
            self._etag, self._renewed_at = etag, self._unanswered.get(renewal or "", self._renewed_at)
            self._unanswered.clear()
            if self.lost.is_set() and not self._overdue():
                # Our own last write was still there: no other machine took the lease over while the store
                # was out of reach (taking it over replaces that write), so it is ours again. One found that
                # was sent most of a term ago is not: the next renewal, conditional on it, makes it so.
                log.warning("lease: renewed %s again once the store answered; nobody took it", self.uri)
                self.lost.clear()
            return True
        if not self._stop.is_set():
            log.error("lease: %s is another process's now", self.uri)
            self._taken.set()
            self.lost.set()
        return False

    def _send(self, slot: float, match: str | None = None) -> tuple[str | None, str]:
        """One renewal write (conditional on ``match``, else on the lease being absent): its ETag, its nonce."""
        renewal = secrets.token_hex(4)
        self._unanswered[renewal] = time.monotonic()  # the store takes it after this
        return s3.put_if(self.uri, self._body(renewal), match=match, within_s=slot), renewal

    def _own_write(self, within_s: float) -> tuple[str, str | None] | None:
        """The ETag and renewal nonce of the lease object where it is this process's own write (its token)."""
        found = s3.read_with_etag(self.uri, within_s=within_s)
        if found is not None and (record := _parsed(found[0])).get("token") == self.token:
            return found[1], record.get("renewal")
        return None

    def release(self) -> None:
        self._stop.set()
        if self._renewer.is_alive():
            self._renewer.join(timeout=self.term / _RENEWALS)
        if self.lost.is_set() or self._etag is None:
            return
        try:
            # Renewed until just now, so no other writer can have taken it over between the read and the delete.
            # Bounded like a renewal: a store that stops answering held the finished phase for its whole outage.
            found = s3.read_with_etag(self.uri, within_s=self.term / _RENEWALS)
            if found is not None and found[1] == self._etag:
                s3.delete_keys(self.folder, [self.name], within_s=self.term / _RENEWALS)
        except KantaiError as exc:  # left behind, it is taken over after a term
            log.warning("lease: could not release %s: %s", self.uri, exc)


def _term_of(record: dict[str, Any]) -> float:
    """The term a lease's holder renews it within (0 where the record does not say); at most a day, so
    a damaged record cannot hold a waiter for ever."""
    term = record.get("term_s")
    return min(float(term), 86_400.0) if isinstance(term, (int, float)) and math.isfinite(term) and term > 0 else 0.0


def _parsed(body: bytes) -> dict[str, Any]:
    try:
        record = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return {}  # damaged: no holder renews it into shape, so it is taken over after a term
    return record if isinstance(record, dict) else {}


@contextlib.contextmanager
def held(folder: S3Uri, name: str, what: str, wait_s: float | None = None) -> Iterator[Lease]:
    """Hold the lease ``name`` below ``folder`` while the block runs; ``what`` names the work it guards.
    ``wait_s``: how long the caller may wait on another's lease; a holder's term over half of it is
    refused at once rather than waited out past it."""
    lease = Lease(folder, name, what, lease_term(), wait_s)
    lease.acquire()
    try:
        yield lease
    finally:
        lease.release()
