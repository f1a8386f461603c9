"""`train.profile_steps`: where a training step's time goes, from torch.profiler.

MFU says how much of the device's peak the model's matmuls get, not what takes the rest. Profiling a
few steps after the warm-up (allocation, kernel selection, compilation) answers that: the ops that
took the most device time (CPU time on a CPU), the share of it in matrix multiplications, and a trace
to open in Perfetto (https://ui.perfetto.dev) or chrome://tracing.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch.profiler import ProfilerAction, ProfilerActivity, profile, schedule
from transformers import TrainerCallback

log = logging.getLogger(__name__)

# Steps run before profiling starts: the first steps allocate, select kernels and (torch.compile)
# compile once per new shape, which is not where a long run spends its time.
SKIP_STEPS = 5
TOP_OPS = 25
# The ops whose time is matrix multiplication; a kernel's device time counts as its launching op's.
MATMUL_OPS = frozenset(
    {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::_addmm_activation", "aten::matmul"}
)


class ProfilerCallback(TrainerCallback):
    """Profiles ``steps`` training steps after ``SKIP_STEPS`` and keeps their op table for the summary.

    Every process profiles its own steps and writes ``trace-rank{N}.json`` to ``directory``. A run
    shorter than the profiled window keeps what it recorded; one that never reached it reports nothing.
    """

    def __init__(self, directory: Path, steps: int, rank: int = 0) -> None:
        self.directory = directory
        self.steps = steps
        self.rank = rank
        self.report: dict[str, Any] | None = None
        self._profiler: profile | None = None
        self._profiled = 0

    def on_train_begin(self, args, state, control, **kwargs):
        activities = [ProfilerActivity.CPU]
        if torch.cuda.is_available():
            activities.append(ProfilerActivity.CUDA)
        self._profiler = profile(
            activities=activities,
            schedule=schedule(wait=SKIP_STEPS - 1, warmup=1, active=self.steps, repeat=1),
            on_trace_ready=self._write,
        )
        self._profiler.start()
        return control

    def on_step_end(self, args, state, control, **kwargs):
        if self._profiler is not None:
            self._profiled += self._profiler.current_action in (ProfilerAction.RECORD, ProfilerAction.RECORD_AND_SAVE)
            self._profiler.step()
        return control

    def on_train_end(self, args, state, control, **kwargs):
        if self._profiler is not None:
            self._profiler.stop()
            self._profiler = None
        return control

    def _write(self, profiler: profile) -> None:
        if not self._profiled:
            return  # training ended within the skipped steps: what was recorded is no training step
        events = profiler.key_averages()
        on_device = any(e.self_device_time_total > 0 for e in events)
        self.directory.mkdir(parents=True, exist_ok=True)
        trace = self.directory / f"trace-rank{self.rank}.json"
        profiler.export_chrome_trace(str(trace))
        self.report = op_report(events, on_device=on_device, steps=self._profiled)
        self.report["trace"] = str(trace)
        log.info(
            "profile: %d steps after the first %d, %.1f ms a step, %.1f ms of it %s time, %.0f%% of that in matmuls; "
            "top: %s; trace %s",
            self.report["steps"],
            SKIP_STEPS,
            self.report["wall_ms_per_step"],
            self.report["total_ms_per_step"],
            self.report["clock"],
            100 * self.report["matmul_share"],
            ", ".join(f"{op['name']} {100 * op['share']:.0f}%" for op in self.report["top_ops"][:5]),
            trace,
        )


def op_report(events, *, on_device: bool, steps: int) -> dict[str, Any]:
    """The profiled steps' time by op: on a device its kernels by device time, on a CPU the ops by CPU
    time. An op's kernels count as its own device time, which is how matmul time is found on a device."""
    from torch.autograd import DeviceType

    if on_device:
        timed = [(e, e.self_device_time_total) for e in events if e.device_type != DeviceType.CPU]
        matmul = sum(
            e.self_device_time_total for e in events if e.device_type == DeviceType.CPU and e.key in MATMUL_OPS
        )
    else:
        timed = [(e, e.self_cpu_time_total) for e in events]
        matmul = sum(us for e, us in timed if e.key in MATMUL_OPS)
    timed = sorted(((e, us) for e, us in timed if us > 0), key=lambda pair: pair[1], reverse=True)
    total = sum(us for _, us in timed)
    # Each profiled step is one ProfilerStep#N span, step end to step end: its wall time, data included.
    wall = sum(e.cpu_time_total for e in events if e.key.startswith("ProfilerStep"))
    steps = max(steps, 1)
    return {
        "steps": steps,
        "clock": "device" if on_device else "cpu",
        "wall_ms_per_step": wall / 1e3 / steps,
        "total_ms_per_step": total / 1e3 / steps,
        "matmul_share": matmul / total if total else 0.0,
        "top_ops": [
            {"name": e.key, "calls": e.count, "ms_per_step": us / 1e3 / steps, "share": us / total}
            for e, us in timed[:TOP_OPS]
        ],
    }
