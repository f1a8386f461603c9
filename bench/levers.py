"""The time-to-quality lever screen behind README's recipe table: fixed steps, one lever at a time.

Loss at equal steps does not depend on how busy the CPU is, so the screen compares configurations
at a fixed step count; the levers that change step time (batch size, masking rate, compile) are
timed side by side in one bench run. Stage 1 picks the peak learning rate (with RoBERTa's AdamW
settings and a warm-up); stage 2 varies one lever at a time around the winner. Every stage is one
`kantai-batch bench` record under bench/results/levers/.

    python bench/levers.py --corpus ../shared/data/kant.txt --run-dir runs/levers [--set KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from kantai_batch.baseline import TRAINER_DEFAULTS
from kantai_batch.bench import bench
from kantai_batch.errors import KantaiError
from kantai_batch.job import load_job, override_job
from kantai_batch.rundir import RunDir

ROBERTA = "train.adam_beta2=0.98,train.adam_epsilon=1e-6,train.weight_decay=0.01,train.warmup_ratio=0.1"
RATES = ("1e-4", "3e-4", "1e-3")


def stage_two(best: str, masking: float) -> list[str]:
    """The levers around the winner, whose masking rate is ``masking``: the mask lever is the other one
    of RoBERTa's 15% and the job's 30%, so it changes something whatever the job's default."""
    around = f"{ROBERTA},train.learning_rate={best}"
    other = 0.15 if masking != 0.15 else 0.3
    return [
        f"wsd:{around},train.lr_scheduler=warmup_stable_decay,train.decay_ratio=0.2",
        f"mask{round(other * 100)}:{around},train.mlm_probability={other}",
        f"cosine:{around},train.lr_scheduler=cosine",
        f"noclip:{around},train.max_grad_norm=0",
    ]


def final_loss(record: dict, name: str) -> float:
    return next(row["eval_loss_packed"] for row in record["results"] if row["name"] == name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", required=True)
    parser.add_argument("--run-dir", default="runs/levers")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--eval-every", type=float, default=20)
    parser.add_argument("--rates", default=",".join(RATES), help="Peak learning rates of stage 1, best first.")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--out", type=Path, default=Path("bench/results/levers"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    job = load_job(None, args.overrides, corpus=args.corpus)
    run = RunDir.from_uri(args.run_dir)
    common = dict(steps=args.steps, seconds=None, baseline=None, out_dir=args.out, eval_every=args.eval_every)
    candidates = args.rates.split(",")
    # Stage 1's first row is the job with the Trainer's optimizer and schedule (the old defaults).
    reference = job.model_copy(update={"train": job.train.model_copy(update=TRAINER_DEFAULTS)})
    rates = [f"lr{rate}:{ROBERTA},train.learning_rate={rate}" for rate in candidates]
    first = bench(reference, run, variants=tuple(rates), **common)
    best = min(candidates, key=lambda rate: final_loss(first, f"lr{rate}"))
    print(json.dumps({"stage": 1, "record": first["path"], "best_learning_rate": best}), flush=True)
    # Stage 2's own first row is the winner with the linear schedule, then one lever changed at a time.
    winner = override_job(job, [*ROBERTA.split(","), f"train.learning_rate={best}"], "winner")
    second = bench(winner, run, variants=tuple(stage_two(best, winner.train.mlm_probability)), **common)
    print(json.dumps({"stage": 2, "record": second["path"]}), flush=True)


if __name__ == "__main__":
    try:
        main()
    except KantaiError as exc:  # a bad --set or --rates: one line and the error's exit code, as the CLI
        print(f"levers: {exc}", file=sys.stderr)
        raise SystemExit(exc.exit_code) from None
