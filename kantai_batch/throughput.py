"""Training throughput as the Trainer runs: real tokens/s, samples/s, step time, MFU, peak memory.

"Real" tokens are the non-padding ones (counted by the collator on the host, ``objective.REAL_TOKENS``,
and summed over all ranks into the Trainer's ``num_input_tokens_seen``): padding is work the model
does for nothing, so it does not count. MFU (model
FLOPs utilization) is the training FLOPs those tokens need, per second, over the peak of the devices
doing it (``hardware.peak_flops``).
"""

from __future__ import annotations

import resource
import statistics
import sys
import time
from typing import Any

from transformers import TrainerCallback

# A step taking more than this many median steps is warm-up (compilation, allocation), not steady state.
WARMUP_STEP = 10


class ThroughputCallback(TrainerCallback):
    """Times the steps, gives each training log line its rates, keeps the session's totals for the summary.

    A resumed run counts only its own session. The steady-state figures leave out the first step and
    any step over ``WARMUP_STEP`` median steps (allocations, kernel selection, compilation; their
    count and time are reported) and measure from one step's end to the next, data loading included,
    so a starved dataloader shows.

    On a GPU a step's end is an event on the device's stream, not the host's clock: nothing is read
    back between log lines, so the host runs steps ahead and its clock times how fast it queues them,
    then charges the wait for all of them to the step of the log line, which the warm-up rule would
    drop. The events are read once the device has passed them (``query``), so timing never waits.
    """

    def __init__(self, flops_per_token: float, peak_flops: float, world_size: int, events=None) -> None:
        self.flops_per_token = flops_per_token
        self.peak_flops = peak_flops * world_size
        self.tokens = 0
        self.samples = 0
        self.elapsed = 0.0
        self._step_times: list[float] = []
        self._step_tokens: list[int] = []
        self._last_step: tuple[float, int] | None = None
        self._start_time = time.perf_counter()
        self._start_tokens = 0
        self._start_step = 0
        self._window = (0.0, 0)
        # Evaluations during training: their time is not training time (bench evaluates every few
        # seconds; counted, it made real tokens/s a twentieth of the steady rate).
        self._evaluating = 0.0
        self._step_end: float | None = None
        # A factory of timing events on the device (torch.cuda.Event on a GPU); None times on the host.
        self._event = events if events is not None else _cuda_events()
        self._pending: list[tuple[Any, int] | None] = []  # events not yet passed; None: a break (eval, save)
        self._last_event: tuple[Any, int] | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        self._start_time = self._step_end = time.perf_counter()
        self._evaluating = 0.0
        self._start_tokens = state.num_input_tokens_seen
        self._start_step = state.global_step
        self._window = (self._start_time, state.num_input_tokens_seen)
        return control

    def on_step_end(self, args, state, control, **kwargs):
        now = time.perf_counter()
        self._step_end = now
        if self._event is not None:
            event = self._event()
            event.record()
            self._pending.append((event, state.num_input_tokens_seen))
            self._read_events(wait=False)
            return control
        if self._last_step is not None:
            then, tokens_then = self._last_step
            self._step_times.append(now - then)
            self._step_tokens.append(state.num_input_tokens_seen - tokens_then)
        self._last_step = (now, state.num_input_tokens_seen)
        return control

    def on_evaluate(self, args, state, control, **kwargs):
        # Evaluation is not a training step; the next step's time starts after it.
        self._last_step = None
        self._pending.append(None)
        now = time.perf_counter()
        if self._step_end is not None:
            self._evaluating += now - self._step_end
        self._step_end = now  # several eval sets after one step: each from where the last ended
        return control

    def on_save(self, args, state, control, **kwargs):
        self._last_step = None
        self._pending.append(None)
        return control

    def _read_events(self, *, wait: bool) -> None:
        """Step times from the events the device has passed (all of them with ``wait``)."""
        if wait and self._pending:
            import torch

            if torch.cuda.is_available():
                torch.cuda.synchronize()
        while self._pending and (wait or self._pending[0] is None or self._pending[0][0].query()):
            head = self._pending.pop(0)
            if head is not None and self._last_event is not None:
                (then, tokens_then), (event, tokens) = self._last_event, head
                self._step_times.append(then.elapsed_time(event) / 1000)
                self._step_tokens.append(tokens - tokens_then)
            self._last_event = head

    def rates(self, state) -> dict[str, float]:
        """Real tokens/s and MFU since the previous call: the fields ``PretrainTrainer.log`` adds to a loss line."""
        now = time.perf_counter()
        since, tokens_then = self._window
        self._window = (now, state.num_input_tokens_seen)
        if now <= since:
            return {}
        rate = (state.num_input_tokens_seen - tokens_then) / (now - since)
        return {"real_tokens_per_second": round(rate, 1), "mfu": round(self.mfu(rate), 4)}

    def on_train_end(self, args, state, control, **kwargs):
        self._read_events(wait=True)
        self.elapsed = time.perf_counter() - self._start_time - self._evaluating
        self.tokens = state.num_input_tokens_seen - self._start_tokens
        steps = state.global_step - self._start_step
        self.samples = steps * args.per_device_train_batch_size * args.world_size
        return control

    def mfu(self, tokens_per_second: float) -> float:
        return tokens_per_second * self.flops_per_token / self.peak_flops if self.peak_flops else 0.0

    def summary(self) -> dict[str, float]:
        self._read_events(wait=True)
        tokens_per_second = self.tokens / self.elapsed if self.elapsed > 0 else 0.0
        median = statistics.median(self._step_times) if self._step_times else 0.0
        # Steps that take many times the median are compilations (torch.compile compiles again when a
        # shape changes, well after the first step), not a steady state; a starved dataloader's waits
        # are a few step times and stay in.
        warmup = [(t, n) for t, n in zip(self._step_times, self._step_tokens, strict=True) if t > WARMUP_STEP * median]
        steady_time = sum(self._step_times) - sum(t for t, _ in warmup)
        steady_tokens = sum(self._step_tokens) - sum(n for _, n in warmup)
        steady = steady_tokens / steady_time if steady_time > 0 else tokens_per_second
        return {
            "real_tokens_trained": self.tokens,
            "real_tokens_per_second": tokens_per_second,
            "samples_per_second": self.samples / self.elapsed if self.elapsed > 0 else 0.0,
            "step_time_s": median if self._step_times else None,
            "warmup_steps": len(warmup),
            "warmup_seconds": sum(t for t, _ in warmup),
            "steady_tokens_per_second": steady,
            "mfu": self.mfu(tokens_per_second),
            "steady_mfu": self.mfu(steady),
            "flops_per_token": self.flops_per_token,
            "peak_flops": self.peak_flops,
            "peak_memory_bytes": peak_memory_bytes(),
        }


def _cuda_events():
    """torch.cuda.Event with timing, where there is a GPU; None on a CPU."""
    import torch

    if not torch.cuda.is_available():
        return None
    return lambda: torch.cuda.Event(enable_timing=True)


def peak_memory_bytes() -> int:
    """Peak accelerator memory allocated by torch, or on a CPU the process's peak resident size."""
    import torch

    if torch.cuda.is_available():
        return int(torch.cuda.max_memory_allocated())
    try:
        # Linux's rusage keeps the high-water mark a forked process inherits from its parent (a launcher
        # or a bench with torch loaded) across exec; VmHWM is this process's own.
        with open("/proc/self/status", encoding="ascii") as status:
            return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmHWM:"))
    except (OSError, StopIteration, ValueError, IndexError):
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # ru_maxrss is kilobytes on Linux and bytes on macOS.
    return int(peak if sys.platform == "darwin" else peak * 1024)
