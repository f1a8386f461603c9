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
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from transformers import TrainerCallback

from kantai_batch.distributed import barrier, gather_to_main
from kantai_batch.errors import KantaiError
from kantai_batch.rundir import RunDir

log = logging.getLogger(__name__)

# In a checkpoint's marker: the time budget (its seconds) that ended training at this step.
LAST_STEP = "last_step"


class CheckpointMarkerCallback(TrainerCallback):
    """Marks each checkpoint complete, publishes it to a remote run dir, prunes beyond ``keep``."""

    def __init__(
        self,
        run: RunDir,
        keep: int,
        clock: Callable[[], float] | None = None,
        lineage_sha256: str | None = None,
        last: Callable[[], float | None] | None = None,
        still_ours: Callable[[], None] | None = None,
    ) -> None:
        self.run = run
        # Raises when the run dir's training lease was lost: another machine may be writing it now.
        self.still_ours = still_ours
        # The budget (seconds) that ended training at the checkpoint being saved, if one did.
        self.last = last
        self.keep = keep
        # What the checkpoints are steps of: a later training of another lineage does not resume them.
        self.lineage = {"lineage_sha256": lineage_sha256} if lineage_sha256 else {}
        # A time budget's seconds spent, kept in each marker so a resumed run counts them.
        self.clock = clock
        self._uploads = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint-upload")
        self._pending: Future | None = None

    def on_save(self, args, state, control, **kwargs):
        # Under DeepSpeed every process writes its own shard of the optimizer state into the
        # checkpoint, and the Trainer does not wait for them all before this callback.
        barrier()
        rng_states = self._rng_states(args, state)
        if not state.is_world_process_zero:
            return control
        if self.still_ours is not None:
            self.still_ours()  # before sealing, publishing or pruning anything
        clock = {"train_seconds": self.clock()} if self.clock else {}
        ended_by = self.last() if self.last is not None else None
        if ended_by is not None:
            clock[LAST_STEP] = ended_by
        saved = self.run.checkpoint(state.global_step)
        for name, data in rng_states.items():
            if not (saved / name).exists():
                (saved / name).write_bytes(data)
        # The processes the steps were shared by: a step's samples depend on them (see train.pretrain).
        checkpoint = self.run.seal_checkpoint(state.global_step, **clock, **self.lineage, processes=args.world_size)
        if not self.run.is_remote:
            self.run.prune_checkpoints(self.keep)
            return control
        # One upload at a time: the previous one must be done (and its errors seen) first.
        self.wait()
        self._pending = self._uploads.submit(self._publish, checkpoint)
        return control

    def _rng_states(self, args, state) -> dict[str, bytes]:
        """On the main process, the RNG state files the other nodes' processes wrote to their own disks.

        Each process saves its RNG state into its node's copy of the checkpoint, and only the main
        process publishes one: over several nodes with an S3 run dir the others' states never reached
        the store, and their dropout after a resume differed from the uninterrupted run's. A few KB each.
        """
        if not self.run.is_remote or args.world_size == 1:
            return {}
        name = f"rng_state_{args.process_index}.pth"
        own = self.run.checkpoint(state.global_step) / name
        gathered = gather_to_main((name, own.read_bytes() if own.is_file() else None))
        return {name: data for name, data in gathered or [] if data is not None}

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

    def _publish(self, checkpoint: Path) -> None:
        try:
            self.run.publish(checkpoint, still_ours=self.still_ours)
        except KantaiError as exc:
            # Same class, so the exit code still says whether a retry can help (an outage: 4).
            raise type(exc)(
                f"checkpoint {self.run.uri(checkpoint)} was not committed ({exc}); the newest complete checkpoint in "
                f"{self.run.uri(self.run.checkpoints)} stays, and the next pretrain resumes from it"
            ) from None
        if self.still_ours is not None:
            self.still_ours()  # the upload may have outlasted the lease: pruning would remove another's checkpoints
        self.run.prune_checkpoints(self.keep)
