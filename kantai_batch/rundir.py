"""The run dir: the one door through which phases reach a run's files, local or in S3.

It owns the layout (every folder and file a phase reads or writes), commits a phase's output
atomically (see ``manifest``), and the checkpoint operations: find the newest complete one, mark and
publish a new one, prune old ones. Phases ask it for paths and operations; none of them sees an
``S3Uri`` or learns another phase's file names.

A run dir in S3 (``s3://bucket/prefix``) works through a local mirror: a phase downloads the complete
folders it reads (checked against their manifests), works on local files, and commits its output
locally and then to S3, marker last. ``KANTAI_CACHE_DIR`` sets where mirrors live. There the remote
checkpoints are the truth, since a pod's disk is new after a preemption.
"""

from __future__ import annotations

import contextlib
import logging
import re
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kantai_batch import manifest, s3
from kantai_batch.errors import InputDataError, JobConfigError
from kantai_batch.manifest import is_complete
from kantai_batch.s3 import S3Uri, is_s3
from kantai_batch.sources import cache_dir

log = logging.getLogger(__name__)

# File names inside the phases' folders; writers put them in their scratch folder under these names.
TRAIN_TEXT = "train.txt"
EVAL_TEXT = "eval.txt"
TOKENS_STATS = "tokens.json"
PART_STATS = "part.json"
CORPUS_STATS = "stats.json"
TRAIN_SUMMARY = "train_summary.json"
JOB_FILE = "job.yaml"
EVAL_METRICS = "metrics.json"
MLFLOW_RUN = "mlflow_run.json"
# A remote run dir's training lease (``lease``), beside checkpoints/, whose keys setting aside and pruning remove.
PRETRAIN_LEASE = ".pretrain.lease"

_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


def identity(output: str, marker: dict[str, Any] | None, *, legacy: bool = False) -> dict[str, Any] | None:
    """What a committed folder holds, as its files' checksums: the corpus's without stats.json, which
    names the paths it was read from, so the same text under another path name redid every phase after
    prepare. ``legacy`` keeps stats.json, as the records made before 2026-12-07 did, so that their run
    dirs are not redone for it."""
    files = marker.get("files") if marker else None
    if output == "corpus" and files is not None and not legacy:
        files = {name: entry for name, entry in files.items() if name != CORPUS_STATS}
    return files


def checkpoint_step(path: Path | str) -> int:
    return int(_CHECKPOINT.match(Path(path).name).group(1))


@dataclass(frozen=True)
class RunDir:
    """The folders one run's phases read and write; the same layout for every job.

    ``root`` is where phases read and write files: the run dir itself, or for a remote run dir
    (``remote`` set) its local mirror.
    """

    root: Path
    remote: S3Uri | None = None
    # The manifests of the committed folders this process read (``require``): what a writer's fingerprint,
    # lineage and tokens.json must name. The store may hold another by the time it computes them (a
    # second machine re-committed the folder after this one mirrored it).
    _read: dict[Path, dict[str, Any]] = field(default_factory=dict, compare=False, hash=False, repr=False)

    @classmethod
    def from_uri(cls, uri: str) -> RunDir:
        if is_s3(uri):
            remote = S3Uri.parse(uri)
            return cls(cache_dir() / "runs" / remote.bucket / remote.key, remote)
        if "://" in uri or uri.lower().startswith("s3:"):
            # s3:/bucket (one slash) is a valid local path: the run would have landed in the pod's disk.
            raise JobConfigError(f"run dir {uri}: unsupported URI (use a local folder or s3://bucket/prefix)")
        root = Path(uri).expanduser()
        if root.exists() and not root.is_dir():
            raise JobConfigError(f"run dir {uri} is not a folder")
        return cls(root)

    # -- layout ---------------------------------------------------------------------------------

    @property
    def corpus(self) -> Path:
        return self.root / "corpus"

    @property
    def train_text(self) -> Path:
        return self.corpus / TRAIN_TEXT

    @property
    def eval_text(self) -> Path:
        return self.corpus / EVAL_TEXT

    @property
    def corpus_stats(self) -> Path:
        return self.corpus / CORPUS_STATS

    @property
    def tokenizer(self) -> Path:
        return self.root / "tokenizer"

    @property
    def tokens(self) -> Path:
        """Both splits' samples, tokenized once: ``train/`` and ``eval/`` (Arrow shards) and ``tokens.json``."""
        return self.root / "tokens"

    @property
    def tokens_stats(self) -> Path:
        return self.tokens / TOKENS_STATS

    @property
    def tokens_parts(self) -> Path:
        """tokenize's staging when several pods make the tokens: one committed folder per part, removed
        once ``tokens/`` is committed from them."""
        return self.root / "tokens-parts"

    def tokens_part(self, index: int, count: int) -> Path:
        """Part ``index`` of ``count``: ``train/`` (its rows' samples), ``eval/`` (part 0 only), ``part.json``."""
        return self.tokens_parts / f"part-{index:05d}-of-{count:05d}"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def mlflow_run(self) -> Path:
        """The MLflow run a resumed pretrain continues (bookkeeping beside the checkpoints)."""
        return self.checkpoints / MLFLOW_RUN

    @property
    def profile(self) -> Path:
        """``train.profile_steps``' traces, one per process (local only: they are for reading, not resuming)."""
        return self.root / "profile"

    @property
    def model(self) -> Path:
        return self.root / "model"

    @property
    def train_summary(self) -> Path:
        return self.model / TRAIN_SUMMARY

    @property
    def eval(self) -> Path:
        return self.root / "eval"

    @property
    def eval_metrics(self) -> Path:
        return self.eval / EVAL_METRICS

    # -- committed folders ----------------------------------------------------------------------

    @property
    def is_remote(self) -> bool:
        return self.remote is not None

    def uri(self, path: Path) -> str:
        """Where ``path`` of this run really lives, for messages and lineage."""
        remote = self._remote_of(path)
        return str(path) if remote is None else str(remote)

    def is_complete(self, folder: Path) -> bool:
        remote = self._remote_of(folder)
        return s3.exists(remote.child(manifest.MARKER)) if remote else is_complete(folder)

    def marker(self, folder: Path) -> dict[str, Any] | None:
        """The manifest of a complete folder, or None."""
        remote = self._remote_of(folder)
        if remote:
            return manifest.remote_marker(remote)
        return manifest.read_marker(folder) if is_complete(folder) else None

    def require(self, folder: Path, what: str, phase: str) -> Path:
        """A complete local copy of ``folder`` (downloaded from the remote run dir when needed)."""
        remote = self._remote_of(folder)
        found = self.marker(folder)
        if found is None:
            raise InputDataError(
                f"{what} {remote or folder} is missing or incomplete: run `kantai-batch {phase}` first"
            )
        if remote is None:
            manifest.require_listed(folder, found)
            self._read[folder] = found
            return folder
        local = manifest.mirror(remote, folder, found)
        self._read[folder] = manifest.read_marker(local)  # what was downloaded, which may be newer than found
        return local

    def marker_as_read(self, folder: Path) -> dict[str, Any] | None:
        """The manifest of ``folder`` as this process read it (``require``); else as committed now."""
        return self._read[folder] if folder in self._read else self.marker(folder)

    @contextlib.contextmanager
    def training_lease(self, wait_s: float, setting: str) -> Iterator[Any]:
        """For a remote run dir, its training's lease in the store (``lease.Lease``): the machine's file
        lock keeps a second training off this disk only. None for a local one. The launch's other
        processes wait for it within ``wait_s`` (the job's ``setting``)."""
        if self.remote is None:
            yield None
            return
        from kantai_batch import lease

        lease.require_term_within(wait_s, setting)
        with lease.held(self.remote, PRETRAIN_LEASE, self.uri(self.checkpoints), wait_s) as held:
            yield held

    @contextlib.contextmanager
    def committed(self, folder: Path, *, lease_wait_s: float | None = None, **marker_extra: Any) -> Iterator[Path]:
        """A scratch folder that becomes ``folder`` (marker last, here and remotely) if the block succeeds.

        For a remote run dir the writer also holds a lease on the folder in the store (``.<name>.lease``
        beside it), as pretrain does on its checkpoints: the file lock holds on this machine only, and two
        machines committing one folder at once interleave their uploads (a marker over the other's files,
        or pointing at a staging folder the other removed). ``lease_wait_s``: how long other processes
        wait for this one (a launch's collective timeout); a lease left with a term too long for it is
        refused at once rather than waited out past it."""
        remote = self._remote_of(folder)
        with contextlib.ExitStack() as writing:
            # This machine's lock first: a second writer here is refused at once, not after a term's wait
            # to see the lease renewed.
            writing.enter_context(manifest.only_writer(folder))
            held = None
            if remote is not None:
                from kantai_batch import lease

                parent = self._remote_of(folder.parent)
                held = writing.enter_context(lease.held(parent, f".{folder.name}.lease", str(remote), lease_wait_s))
            with manifest.committed_locked(folder, **marker_extra) as scratch:
                yield scratch
            self._read.pop(folder, None)  # replaced by this process: what it read there is gone
            if held is not None:
                held.require()  # not renewed for most of a term: another machine may be committing it now
            self.publish(folder, still_ours=held.require if held is not None else None)

    def committed_subfolders(self, folder: Path) -> dict[str, dict[str, Any]]:
        """The complete folders directly below ``folder`` (remotely, for a remote run dir), with their manifests."""
        remote = self._remote_of(folder)
        if remote:
            markers = {name: manifest.remote_marker(remote.child(name)) for name in s3.list_folders(remote)}
            return {name: found for name, found in sorted(markers.items()) if found is not None}
        if not folder.is_dir():
            return {}
        return {p.name: manifest.read_marker(p) for p in sorted(folder.iterdir()) if p.is_dir() and is_complete(p)}

    def claim(self, path: Path, note: str) -> bool:
        """Create the file ``path`` holding ``note`` unless it exists (remotely, for a remote run dir), as one
        atomic step: of processes claiming the same path at once, exactly one gets True."""
        remote = self._remote_of(path)
        if remote:
            return s3.put_if(remote, note.encode("utf-8")) is not None
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            with path.open("x", encoding="utf-8") as handle:
                handle.write(note)
        except FileExistsError:
            return False
        return True

    def discard(self, folder: Path) -> None:
        """Remove ``folder`` and everything below it, here and remotely (a marker first, like any removal)."""
        remote = self._remote_of(folder)
        if remote:
            manifest.delete(remote)
        manifest.remove(folder)

    def publish(self, folder: Path, still_ours: Callable[[], None] | None = None) -> None:
        """Commit a locally complete folder to the remote run dir; nothing to do for a local one.
        ``still_ours`` (the writer's lease check) runs before each write of the upload."""
        remote = self._remote_of(folder)
        if remote:
            manifest.upload(folder, remote, still_ours)

    def pull_file(self, path: Path) -> None:
        """Refresh a single file from the remote run dir: bookkeeping, or a small file of a committed folder
        read without the rest (such as the corpus's stats.json, which lineage reads where only tokens are)."""
        remote = self._remote_of(path)
        if remote is None:
            return
        folder = self._remote_of(path.parent)
        committed = manifest.remote_marker(folder)
        if committed is not None and path.name in committed.get("files", {}):
            # The marker says where its files are: mid re-commit they are staged beside the usual keys.
            remote = manifest.location(folder, committed, path.name)
        if s3.exists(remote):
            s3.download_file(remote, path)

    def push_file(self, path: Path) -> None:
        remote = self._remote_of(path)
        if remote is not None:
            s3.upload_file(path, remote)

    def _remote_of(self, path: Path) -> S3Uri | None:
        if self.remote is None:
            return None
        relative = path.relative_to(self.root).as_posix()
        return self.remote if relative == "." else self.remote.child(relative)

    # -- checkpoints ----------------------------------------------------------------------------

    def checkpoint(self, step: int) -> Path:
        return self.checkpoints / f"checkpoint-{step}"

    def newest_checkpoint(self, *, tidy: bool) -> Path | None:
        """The newest checkpoint whose marker exists, as a local folder; ``tidy`` removes local leftovers.

        With a remote run dir the remote checkpoints are the truth: the newest complete one is
        downloaded unless an identical local copy exists.
        """
        found = self._local_checkpoints()
        if tidy:
            for partial in (p for p in found if not is_complete(p)):
                log.warning("pretrain: removing incomplete checkpoint %s (its save did not finish)", partial)
                shutil.rmtree(partial, ignore_errors=True)
        if self.remote is None:
            complete = [p for p in found if is_complete(p)]
            return complete[-1] if complete else None
        for name in reversed(self._remote_checkpoint_names()):
            local = self.checkpoints / name
            remote = self._remote_of(local)
            committed = manifest.remote_marker(remote)
            if committed is None:
                continue  # a checkpoint whose upload was cut short
            log.info("pretrain: newest complete checkpoint is %s", remote)
            return manifest.mirror(remote, local, committed)
        return None

    def seal_checkpoint(self, step: int, **marker_extra: Any) -> Path:
        """Mark ``checkpoint-<step>`` complete on this disk, once the Trainer has written all of it."""
        folder = self.checkpoint(step)
        manifest.write_marker(folder, global_step=step, **marker_extra)
        return folder

    def prune_checkpoints(self, keep: int) -> None:
        """Remove all but the newest ``keep`` complete checkpoints, here and remotely."""
        complete = [p for p in self._local_checkpoints() if is_complete(p)]
        for old in complete[:-keep]:
            manifest.remove(old)
        if self.remote is not None:
            names = self._remote_checkpoint_names()
            complete = [n for n in names if manifest.remote_marker(self._remote_of(self.checkpoints / n)) is not None]
            if not complete:
                return
            # Only complete checkpoints count towards ``keep``: uploads cut short above the resumed
            # step would otherwise crowd out the ones a retry resumes from. A cut-short upload older
            # than a complete checkpoint is never needed; a newer one is left for its step's next save.
            newest = checkpoint_step(complete[-1])
            for name in names:
                if name in complete[:-keep] or (name not in complete and checkpoint_step(name) < newest):
                    manifest.delete(self._remote_of(self.checkpoints / name))

    def discard_checkpoints(self, *, remote: bool) -> None:
        """Remove every checkpoint on this disk and, with ``remote``, in the remote run dir."""
        for old in self._local_checkpoints():
            manifest.remove(old)
        if remote and self.remote is not None:
            for name in self._remote_checkpoint_names():
                manifest.delete(self._remote_of(self.checkpoints / name))

    def set_aside_checkpoints(self, name: str, *, remote: bool) -> Path:
        """Move every complete checkpoint into ``checkpoints/<name>/`` (with ``remote``, in the remote run
        dir too), where resuming and pruning do not look; drop incomplete ones. Returns the folder."""
        aside = self.checkpoints / name
        for old in self._local_checkpoints():
            if is_complete(old):
                aside.mkdir(parents=True, exist_ok=True)
                manifest.remove(aside / old.name)  # the same training's same step, set aside before
                old.rename(aside / old.name)
            else:
                shutil.rmtree(old, ignore_errors=True)
        if remote and self.remote is not None:
            for old in self._remote_checkpoint_names():
                source = self._remote_of(self.checkpoints / old)
                committed = manifest.remote_marker(source)
                if committed is not None:
                    manifest.copy(source, self._remote_of(aside / old), committed)
                manifest.delete(source)
        return aside

    def _local_checkpoints(self) -> list[Path]:
        """The checkpoint folders on this disk, oldest first."""
        if not self.checkpoints.is_dir():
            return []
        found = (p for p in self.checkpoints.iterdir() if p.is_dir() and _CHECKPOINT.match(p.name))
        return sorted(found, key=checkpoint_step)

    def _remote_checkpoint_names(self) -> list[str]:
        names = s3.list_folders(self._remote_of(self.checkpoints))
        return sorted((n for n in names if _CHECKPOINT.match(n)), key=checkpoint_step)
