"""Cost of the per-step stop agreement: one all_reduce (MAX) of 4 float64 values on the host (gloo), as
StopAgreement does.

Run with two or more processes and compare with a training step of the job (``mean_step_time_s`` in
``train_summary.json``, or ``kantai-batch bench``):

    torchrun --nproc_per_node 2 bench/stop_agreement.py [--out bench/results/stop-agreement.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch
import torch.distributed as dist

from kantai_batch.stopping import agree_max


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--out", type=Path)
    options = parser.parse_args()
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    values = [0.0, 0.0, 1.0, 0.25]
    for _ in range(50):
        agree_max(values)
    dist.barrier()
    started = time.perf_counter()
    for _ in range(options.calls):
        agree_max(values)
    per_call = (time.perf_counter() - started) / options.calls
    if dist.get_rank() == 0:
        record = {
            "what": "stop agreement: all_reduce MAX of 4 float64 per optimizer step",
            "backend": "gloo (the agreement's own group)",
            "training_backend": dist.get_backend(),
            "world_size": dist.get_world_size(),
            "seconds_per_call": per_call,
            "machine": platform.processor() or platform.machine(),
            "cpus": torch.get_num_threads(),
        }
        print(json.dumps(record, indent=2))
        if options.out:
            options.out.write_text(json.dumps(record, indent=2) + "\n")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
