"""Cost of a resume's fast-forward: from "skip the trained batches of this epoch" to the first batch.

Side by side in one run, for epochs of several sizes, resuming at the epoch's last batch (the worst
case): accelerate's ``skip_first_batches`` (what the Trainer does), which enumerates every skipped
batch of indices, against ``fast_forward``, which starts the epoch's order at the resume point. Both
build the epoch's permutation first, as any shuffled epoch start does; that part is timed alone too.
No sample is read: the dataset is a range of keys.

    python bench/resume_skip.py [--sizes 1000000 5119461 50000000] [--out bench/results/resume-skip.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

from accelerate import skip_first_batches
from accelerate.data_loader import BatchSamplerShard
from torch.utils.data import BatchSampler, DataLoader

from kantai_batch.order import EpochOrder, fast_forward


def _loader(size: int, batch: int, processes: int) -> DataLoader:
    order = EpochOrder(size, seed=0, multiple=batch * processes if processes > 1 else 1)
    batches = BatchSampler(order, batch, drop_last=False)
    if processes > 1:
        batches = BatchSamplerShard(batches, num_processes=processes, process_index=processes - 1)
    return DataLoader(range(len(order)), batch_sampler=batches, collate_fn=list)


def _first_batch_after(skip, size: int, batch: int, processes: int) -> tuple[float, list[int]]:
    loader = _loader(size, batch, processes)
    started = time.perf_counter()
    first = next(iter(skip(loader, len(loader) - 1)))
    return time.perf_counter() - started, first


def _permutation_only(size: int) -> float:
    started = time.perf_counter()
    next(iter(EpochOrder(size, seed=0)))
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_000_000, 5_119_461, 50_000_000])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--out", type=Path)
    options = parser.parse_args()
    rows = []
    for size in options.sizes:
        for processes in (1, 2):
            walked, walked_first = _first_batch_after(skip_first_batches, size, options.batch, processes)
            forwarded, forwarded_first = _first_batch_after(fast_forward, size, options.batch, processes)
            if walked_first != forwarded_first:
                raise SystemExit(f"{size:,} samples, {processes} processes: the two fast-forwards disagree")
            row = {
                "samples": size, "processes": processes, "batch": options.batch,
                "skipped_batches": len(_loader(size, options.batch, processes)) - 1,
                "permutation_s": round(_permutation_only(size), 3),
                "accelerate_walk_s": round(walked, 3), "fast_forward_s": round(forwarded, 3),
                "walk_over_fast_forward": round(walked / forwarded, 1),
            }  # fmt: skip
            rows.append(row)
            print(json.dumps(row))
    record = {
        "what": "resume fast-forward to an epoch's last batch: accelerate's walk vs EpochOrder.start_at",
        "machine": platform.processor() or platform.machine(),
        "rows": rows,
    }
    if options.out:
        options.out.write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
