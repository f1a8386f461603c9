"""bench: how fast a job trains on this machine, side by side with the notebook recipe.

Each configuration trains in a fresh process (so peak memory is its own) on the same prepared corpus
and tokenizer, for ``--steps`` steps or ``--seconds`` of wall-clock time, then both models are
evaluated on the same held-out text, cut both ways (packed blocks and single lines) with the same
fixed masks. Throughput is the steady state: the first step (allocation, kernel selection,
compilation) is left out. Results are printed as a table and written to ``bench/results/`` as JSON.
"""

from __future__ import annotations

import json
import logging
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from kantai_batch.errors import KantaiError
from kantai_batch.job import Job
from kantai_batch.storage import RunDir, write_json_atomic

log = logging.getLogger(__name__)

# The notebook's KantaiBERT: a 52,000-row vocabulary whatever the tokenizer learned, one padded
# sample per line, the LM head on every position, fp32, RoBERTa's default dropout.
RECIPE = {
    "model": {"vocab_size": 52_000, "hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.1},
    "data": {"mode": "line_by_line"},
    "train": {"sparse_prediction": False, "precision": "fp32", "torch_compile": False},
}
BASELINES = ("recipe",)


def recipe_job(job: Job) -> Job:
    """The job with the recipe's choices for everything this project changed for speed."""
    raw = job.model_dump(mode="json")
    for section, values in RECIPE.items():
        raw[section].update(values)
    return Job.model_validate(raw)


def bench(
    job: Job, run: RunDir, *, steps: int, seconds: float | None, baseline: str | None, out_dir: Path
) -> dict[str, Any]:
    """Measure the job (and the baseline), write the JSON record, return it."""
    _prepare_inputs(job, run)
    configs = [("job", job)]
    if baseline == "recipe":
        configs.append(("recipe", recipe_job(job)))
    rows = []
    for name, config in configs:
        log.info("bench: training %s for %s", name, f"{seconds:.0f} s" if seconds else f"{steps} steps")
        row = _in_fresh_process(name, config, run, steps, seconds)
        rows.append(row)
    record: dict[str, Any] = {
        "job": job.name,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": machine(),
        "corpus": job.corpus.source,
        "steps": steps,
        "seconds": seconds,
        "results": rows,
    }
    if len(rows) == 2:
        ours, base = rows
        record["speedup"] = {
            "steady_tokens_per_second": ours["steady_tokens_per_second"] / base["steady_tokens_per_second"],
            "real_tokens_per_second": ours["real_tokens_per_second"] / base["real_tokens_per_second"],
        }
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    path = out_dir / f"{job.name}-{record['machine']['device_tag']}-{stamp}.json"
    write_json_atomic(path, record)
    record["path"] = str(path)
    return record


def machine() -> dict[str, Any]:
    import torch

    from kantai_batch.hardware import cpu_supports_bf16

    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    return {
        "device": gpu or _cpu_name(),
        "device_tag": (gpu or "cpu").lower().replace(" ", "-"),
        "gpus": torch.cuda.device_count(),
        "cpu_threads": torch.get_num_threads(),
        "cpu_bf16": cpu_supports_bf16(),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def format_table(record: dict[str, Any]) -> str:
    columns = (
        ("config", lambda r: r["name"]),
        ("vocab", lambda r: f"{r['vocab_size']:,}"),
        ("data", lambda r: r["data_mode"]),
        ("head", lambda r: "masked" if r["sparse_prediction"] else "dense"),
        ("precision", lambda r: r["precision"]),
        ("dropout", lambda r: f"{r['dropout']:g}"),
        ("tokens/s", lambda r: f"{r['steady_tokens_per_second']:,.0f}"),
        ("step s", lambda r: f"{r['step_time_s']:.2f}" if r["step_time_s"] else "-"),
        ("samples/s", lambda r: f"{r['samples_per_second']:.1f}"),
        ("MFU", lambda r: f"{100 * r['steady_mfu']:.1f}%"),
        ("peak mem", lambda r: f"{r['peak_memory_bytes'] / 2**30:.2f} GiB"),
        ("steps", lambda r: str(r["global_step"])),
        ("eval loss blocks", lambda r: f"{r['eval_loss_packed']:.3f}"),
        ("eval loss lines", lambda r: f"{r['eval_loss_lines']:.3f}"),
    )
    cells = [[header for header, _ in columns]] + [[cell(r) for _, cell in columns] for r in record["results"]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    lines = ["  ".join(value.rjust(width) for value, width in zip(row, widths, strict=True)) for row in cells]
    lines.insert(1, "  ".join("-" * width for width in widths))
    if "speedup" in record:
        lines.append(f"speedup over the recipe: {record['speedup']['steady_tokens_per_second']:.2f}x real tokens/s")
    lines.append(f"machine: {record['machine']['device']}, torch {record['machine']['torch']}")
    return "\n".join(lines)


def _prepare_inputs(job: Job, run: RunDir) -> None:
    """The corpus and tokenizer the configurations share, reused when the run dir has them."""
    from kantai_batch.corpus import prepare
    from kantai_batch.tokenizer import train_tokenizer

    if not run.is_complete(run.corpus):
        prepare(job, run)
    if not run.is_complete(run.tokenizer):
        train_tokenizer(job, run)


def _in_fresh_process(name: str, job: Job, run: RunDir, steps: int, seconds: float | None) -> dict[str, Any]:
    """``_measure`` in a new interpreter: its own peak memory, no state left by the previous config.

    A plain subprocess rather than a multiprocessing pool: transformers' seeded collators refuse to
    run in a multiprocessing child that is not a DataLoader worker.
    """
    with tempfile.TemporaryDirectory(prefix="kantai-bench-") as scratch:
        spec, out = Path(scratch) / "spec.json", Path(scratch) / "result.json"
        spec.write_text(
            json.dumps(
                {
                    "name": name,
                    "job": job.model_dump(mode="json"),
                    "run_root": str(run.root),
                    "steps": steps,
                    "seconds": seconds,
                    "level": logging.getLogger().getEffectiveLevel(),
                }
            )
        )
        # The worker's stdout (the Trainer prints its metrics there) joins the logs on stderr.
        command = [sys.executable, "-m", "kantai_batch.bench", str(spec), str(out)]
        done = subprocess.run(command, stdout=sys.__stderr__, check=False)
        if done.returncode != 0 or not out.is_file():
            raise KantaiError(f"bench: training the {name} configuration failed (exit {done.returncode}; see above)")
        return json.loads(out.read_text())


def _measure(
    name: str, job: dict[str, Any], run_root: str, steps: int, seconds: float | None, level: int
) -> dict[str, Any]:
    """Train one configuration and evaluate it; runs in its own interpreter."""
    from transformers import TrainerCallback

    from kantai_batch.data import build_split
    from kantai_batch.model import init_model
    from kantai_batch.tokenizer import load_tokenizer
    from kantai_batch.train import build_trainer, training_arguments

    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    job = Job.model_validate(job)
    run = RunDir.from_uri(run_root)
    run.require(run.corpus, "corpus", "prepare")
    tokenizer = load_tokenizer(run.require(run.tokenizer, "tokenizer", "train-tokenizer"))
    model = init_model(job, len(tokenizer))

    class TimeLimit(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            if seconds and time.perf_counter() - self.start >= seconds:
                control.should_training_stop = True
            return control

    with tempfile.TemporaryDirectory(prefix="kantai-bench-") as scratch:
        args = training_arguments(
            job,
            Path(scratch),
            track=False,
            max_steps=steps,
            save_strategy="no",
            eval_strategy="no",
            logging_steps=max(1, steps // 10),
            disable_tqdm=True,
        )
        session = build_trainer(job, model, tokenizer, args, run.corpus, callbacks=[TimeLimit()])
        result = session.trainer.train()
        evaluations = {}
        for mode in ("packed", "line_by_line"):
            cut = job.model_copy(update={"data": job.data.model_copy(update={"mode": mode})})
            samples = build_split(run.corpus / "eval.txt", cut, tokenizer, fix_masks=True, what=f"eval ({mode})")
            evaluations[mode] = session.trainer.evaluate(samples)["eval_loss"]
    return {
        "name": name,
        "global_step": session.trainer.state.global_step,
        "train_loss": result.training_loss,
        "train_runtime_s": result.metrics["train_runtime"],
        "data_mode": job.data.mode,
        "dropout": job.model.hidden_dropout_prob,
        "batch_size": job.train.per_device_batch_size,
        "block_size": job.data.block_size,
        "eval_loss_packed": evaluations["packed"],
        "eval_loss_lines": evaluations["line_by_line"],
        **session.summary(),
    }


if __name__ == "__main__":
    # The worker side of _in_fresh_process: python -m kantai_batch.bench SPEC.json RESULT.json
    _spec = json.loads(Path(sys.argv[1]).read_text())
    write_json_atomic(Path(sys.argv[2]), _measure(**_spec))
