"""Trainer checkpoints: marked complete, mirrored to a remote run dir, pruned, found again on restart.

Each ``checkpoint-N`` gets a ``_COMPLETE`` marker once the Trainer has written all of it. With a
remote (S3) run dir the checkpoint is then uploaded by a background thread, marker last, so training
goes on while it uploads; only the next save, the end of training or a preemption waits for it. Old
checkpoints are pruned locally and remotely after the new one is safely complete, never before: a
kill at any moment leaves the newest complete checkpoint intact.

An upload that still fails after the S3 client's bounded retries (see ``s3``) stops training at the
next step with a one-line error naming the checkpoint (exit 4 for an outage, so a scheduler retries
the pod): that checkpoint has no marker in S3, nothing older was pruned, and the next ``pretrain``
resumes from the newest complete one. A store that comes back within the retries goes unnoticed.

Pruning happens here rather than through the Trainer's ``save_total_limit`` because the Trainer
deletes old checkpoints before this marker exists on the new one: a kill in between would leave no
complete checkpoint when the limit is 1.
"""

from __future__ import annotations

import logging
import re
import shutil
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from transformers import TrainerCallback

from kantai_batch import s3
from kantai_batch.distributed import barrier
from kantai_batch.errors import KantaiError
from kantai_batch.s3 import S3Uri
from kantai_batch.storage import MARKER, is_complete, mirror, write_marker

log = logging.getLogger(__name__)

_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


def checkpoint_step(path: Path | str) -> int:
    return int(_CHECKPOINT.match(Path(path).name).group(1))


def checkpoints_in(folder: Path) -> list[Path]:
    """The checkpoint folders in ``folder``, oldest first."""
    if not folder.is_dir():
        return []
    return sorted((p for p in folder.iterdir() if p.is_dir() and _CHECKPOINT.match(p.name)), key=checkpoint_step)


def newest_complete_checkpoint(folder: Path, *, remote: S3Uri | None, prune_incomplete: bool) -> Path | None:
    """The newest checkpoint whose marker exists, as a local folder; incomplete ones are leftovers.

    With a remote run dir the remote checkpoints are the truth (the pod's disk is new after a
    preemption): the newest complete one is downloaded unless an identical local copy exists.
    """
    found = checkpoints_in(folder)
    if prune_incomplete:
        for partial in (p for p in found if not is_complete(p)):
            log.warning("pretrain: removing incomplete checkpoint %s (its save did not finish)", partial)
            shutil.rmtree(partial, ignore_errors=True)
    if remote is None:
        complete = [p for p in found if is_complete(p)]
        return complete[-1] if complete else None
    names = sorted((n for n in s3.list_folders(remote) if _CHECKPOINT.match(n)), key=checkpoint_step, reverse=True)
    for name in names:
        manifest = s3.read_json_if_exists(remote.child(name).child(MARKER))
        if manifest is None:
            continue  # a checkpoint whose upload was cut short
        log.info("pretrain: newest complete checkpoint is %s", remote.child(name))
        return mirror(remote.child(name), folder / name, manifest)
    return None


class CheckpointMarkerCallback(TrainerCallback):
    """Marks each checkpoint complete, mirrors it to the remote run dir, prunes beyond ``keep``."""

    def __init__(self, keep: int, remote: S3Uri | None = None, clock: Callable[[], float] | None = None) -> None:
        self.keep = keep
        self.remote = remote
        # A time budget's seconds spent, kept in each marker so a resumed run counts them.
        self.clock = clock
        self._uploads = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint-upload")
        self._pending: Future | None = None

    def on_save(self, args, state, control, **kwargs):
        # Under DeepSpeed every process writes its own shard of the optimizer state into the
        # checkpoint, and the Trainer does not wait for them all before this callback.
        barrier()
        if not state.is_world_process_zero:
            return control
        folder = Path(args.output_dir)
        checkpoint = folder / f"checkpoint-{state.global_step}"
        clock = {"train_seconds": self.clock()} if self.clock else {}
        write_marker(checkpoint, global_step=state.global_step, **clock)
        if self.remote is None:
            self._prune(folder)
            return control
        # One upload at a time: the previous one must be done (and its errors seen) first.
        self.wait()
        self._pending = self._uploads.submit(self._upload, folder, checkpoint)
        return control

    def on_step_end(self, args, state, control, **kwargs):
        # A failed upload stops training now rather than at the next save, save_steps later.
        if self._pending is not None and self._pending.done():
            self.wait()
        return control

    def on_train_end(self, args, state, control, **kwargs):
        self.wait()
        return control

    def wait(self) -> None:
        """Block until the checkpoint being uploaded is committed remotely; re-raise its failure."""
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending.result()

    def _upload(self, folder: Path, checkpoint: Path) -> None:
        target = self.remote.child(checkpoint.name)
        try:
            s3.upload_folder(checkpoint, target)
        except KantaiError as exc:
            # Same class, so the exit code still says whether a retry can help (an outage: 4).
            raise type(exc)(
                f"checkpoint {target} was not committed ({exc}); the newest complete checkpoint in {self.remote} "
                "stays, and the next pretrain resumes from it"
            ) from None
        self._prune(folder)

    def _prune(self, folder: Path) -> None:
        complete = [p for p in checkpoints_in(folder) if is_complete(p)]
        for old in complete[: -self.keep]:
            shutil.rmtree(old, ignore_errors=True)
        if self.remote is not None:
            names = sorted((n for n in s3.list_folders(self.remote) if _CHECKPOINT.match(n)), key=checkpoint_step)
            for name in names[: -self.keep]:
                s3.delete_folder(self.remote.child(name))
