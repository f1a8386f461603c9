"""Several processes of one training (``torchrun``): which one is the main process, their barriers, and
the values they reduce on the host."""

from __future__ import annotations

import atexit
import contextlib
import os
import sys
import threading
from collections.abc import Iterator
from typing import Any, NoReturn

# Whether this process destroyed a process group it had joined (see exit_process).
_left_group = False


def distributed_state(collective_timeout_s: float | None = None):
    """accelerate's process state when launched as several processes, else None.

    The first call initializes the process group, so the CLI makes it with the job's
    ``train.collective_timeout_s`` before any phase runs; later calls return the same state.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    from datetime import timedelta

    from accelerate import PartialState

    from kantai_batch.hardware import has_accelerator

    # Initializes the process group (gloo on CPU, nccl on GPU) that the Trainer then reuses. The
    # state is a singleton whose first construction wins, so it must say `cpu` exactly as the
    # Trainer's arguments do (use_cpu without an accelerator): without it, accelerate sees one process.
    options = {"timeout": timedelta(seconds=collective_timeout_s)} if collective_timeout_s else {}
    return PartialState(cpu=not has_accelerator(), **options)


def leave_process_group() -> None:
    """Destroy the process group before the interpreter exits, as torch asks.

    That frees a group nothing else holds; one that a DDP model still holds from C++ lives on, and
    the rank's exit (``exit_process``) is what keeps its threads from aborting a finished rank.
    """
    global _left_group
    # Only a process that loaded torch can have a group; prepare and the others that never need
    # torch must not pay for importing it (seconds, and 200 MB of memory) on their way out.
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
        _left_group = True


def joined_process_group() -> bool:
    """Whether this process is, or was, a rank of a process group."""
    dist = sys.modules.get("torch.distributed")
    return _left_group or (dist is not None and dist.is_available() and dist.is_initialized())


def exit_process(code: int) -> NoReturn:
    """End a rank with ``code`` after Python's exit handlers, without the interpreter's C++ teardown.

    A DDP model keeps the gloo process group alive from C++, where destroy_process_group cannot
    release it, so its threads outlive the interpreter; tearing the interpreter down with them running
    aborted finished ranks now and then (SIGABRT, "terminate called without an active exception",
    after every file was written), and exit code 134 then hid a success, or the real exit code,
    from the launcher and the pod's failure policy. What teardown would still do for us is done
    here: non-daemon threads joined, atexit handlers (MLflow's, logging's flush) run, streams flushed.
    """
    threading._shutdown()  # what the interpreter's own exit does first: join the non-daemon threads
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)


def is_main_process() -> bool:
    state = distributed_state()
    return state is None or state.is_main_process


# How long the other processes wait while one does the run's data work (preparing and tokenizing a
# corpus, downloading tokens or a checkpoint): hours for a large corpus, far past any collective's
# timeout. A process that fails ends its launch (torchrun stops the rest), so this bounds only a hang.
_DATA_WAIT = 7 * 24 * 3600


@contextlib.contextmanager
def main_first(*, local: bool = False) -> Iterator[None]:
    """The main process (with ``local``, each node's first) runs the block first, the others after it.

    The others wait on the host, in a gloo group of its own whose timeout is ``_DATA_WAIT``, not
    ``train.collective_timeout_s``: that bounds a collective of the training (a lost rank), and a
    corpus tokenized or a checkpoint downloaded while the rest wait takes longer than it.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        yield
        return
    state = distributed_state()
    first = state.is_local_main_process if local else state.is_main_process
    group = _group("data", _DATA_WAIT)
    if not first:
        dist.barrier(group=group)
    yield
    if first:
        dist.barrier(group=group)


def local_main_first():
    """Each node's first process goes first (e.g. mirrors inputs to the node's disk), the others after it."""
    return main_first(local=True)


def node_count() -> int:
    """How many machines the training's processes run on: the processes that are their node's first."""
    state = distributed_state()
    if state is None:
        return 1
    from accelerate.utils import gather_object

    return sum(gather_object([state.local_process_index == 0]))


def barrier() -> None:
    """Wait for every process of the training; nothing to wait for in a single process."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def gather_to_main(value: Any) -> list[Any] | None:
    """Every process's ``value``, in rank order, on the main process (None on the others; ``[value]`` in
    a single process), through the host group: small Python objects, never the GPU."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [value]
    gathered = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(value, gathered, dst=0, group=_host_group(None))
    return gathered


def host_all_reduce(values: list[float], op: str, *, timeout_s: float | None = None) -> list[float]:
    """Each value's ``op`` ("max" or "sum") over every process of the training (the values themselves in one).

    The values stay on the host, reduced in a gloo group of their own: through NCCL they would be
    copied to the GPU and back, and each copy waits for every kernel queued before it.
    """
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return values
    shared = torch.tensor(values, dtype=torch.float64)
    reduce_op = {"max": dist.ReduceOp.MAX, "sum": dist.ReduceOp.SUM}[op]
    dist.all_reduce(shared, op=reduce_op, group=_host_group(timeout_s))
    return shared.tolist()


# The host groups, by name: (the training's group they were made in, the group), held so no id is reused.
_groups: dict[str, tuple] = {}


def _host_group(timeout_s: float | None):
    return _group("host", timeout_s)


def _group(name: str, timeout_s: float | None):
    # Made by the first call after the training's group is, which every process reaches at the same
    # point (new_group is a collective).
    from datetime import timedelta

    import torch.distributed as dist

    made = _groups.get(name)
    if made is None or made[0] is not dist.group.WORLD:
        timeout = timedelta(seconds=timeout_s) if timeout_s else None
        _groups[name] = (dist.group.WORLD, dist.new_group(backend="gloo", timeout=timeout))
    return _groups[name][1]


def deepspeed_config(path: str) -> dict:
    """The DeepSpeed config a job names (``train.deepspeed``), read and checked before any process starts on it."""
    import importlib.util
    import json
    from pathlib import Path

    from kantai_batch.errors import JobConfigError

    if importlib.util.find_spec("deepspeed") is None:
        raise JobConfigError(
            f"train.deepspeed {path} needs the deepspeed package: pip install 'kantai-batch[deepspeed]'"
        )
    file = Path(path)
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise JobConfigError(f"train.deepspeed {path} does not exist (relative paths start at {Path.cwd()})") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise JobConfigError(f"train.deepspeed {path} cannot be read: {exc}") from None
    except json.JSONDecodeError as exc:
        raise JobConfigError(f"train.deepspeed {path} is not valid JSON: {exc}") from None
    zero = config.get("zero_optimization", {}) if isinstance(config, dict) else None
    stage = zero.get("stage", 0) if isinstance(zero, dict) else None
    if type(stage) is not int or stage not in (0, 1, 2, 3):  # not True, which equals 1
        raise JobConfigError(f"train.deepspeed {path} must be a JSON object with zero_optimization.stage 0-3")
    return config
