"""bench: how fast a job trains and how good it gets, side by side with a baseline and variants.

Each configuration trains in a fresh process (so peak memory is its own) on the same prepared corpus
and tokenizer, for ``--steps`` steps or ``--seconds`` of training time (evaluations not counted),
evaluated every ``--eval-every`` steps or seconds on the same held-out text with the same fixed
masks, cut three ways: packed blocks, run_mlm's grouped lines and single lines. Throughput is the
steady state: the first step (allocation, kernel selection, compilation) is left out. Against the
``run_mlm`` (``run_clm``) baseline the record also says when each configuration reached the baseline's final
held-out loss. Results are printed as a table and written to ``bench/results/`` as JSON.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from kantai_batch.baseline import BASELINES, SCRIPTS, baseline_job
from kantai_batch.bench_worker import EVAL_CUTS
from kantai_batch.curve import time_to_reach
from kantai_batch.errors import JobConfigError, KantaiError
from kantai_batch.job import Job, override_job
from kantai_batch.manifest import write_json_atomic
from kantai_batch.objective import ACCURACY
from kantai_batch.pipeline import require_before_start
from kantai_batch.probes import format_quality
from kantai_batch.rundir import RunDir

log = logging.getLogger(__name__)


def variant_job(job: Job, spec: str) -> tuple[str, Job]:
    """``NAME:key=value,key=value`` (overrides as ``--set`` takes them) as a named configuration."""
    name, sep, overrides = spec.partition(":")
    name = name.strip()
    if not sep or not name or name in ("job", *BASELINES, *_RECORD_KEYS):
        raise JobConfigError(
            f"--variant {spec!r}: expected NAME:key=value[,key=value] with a NAME other than job, the baselines "
            f"and {', '.join(_RECORD_KEYS)}"
        )
    items = [item for item in overrides.split(",") if item.strip()]
    for item in items:
        key = item.partition("=")[0].strip()
        if key in _SHARED or key.split(".")[0] in _SHARED:
            # Prepared once for every configuration (corpus, tokenizer) or what all are scored by.
            raise JobConfigError(
                f"--variant {name}: {key} is the same for every configuration of a bench run; "
                "run another bench with --set instead"
            )
    variant = override_job(job, items, f"--variant {name}")
    if variant.model.max_position_embeddings < job.data.block_size + 2:
        raise JobConfigError(
            f"--variant {name}: model.max_position_embeddings {variant.model.max_position_embeddings} cannot read "
            f"the held-out blocks of {job.data.block_size} every configuration is scored on"
        )
    return name, variant


# What no variant may change: the inputs prepared once and what every configuration is scored by.
_SHARED = frozenset(("task", "corpus", "tokenizer", "eval.mlm_probability", "eval.seed", "data.eval_fraction"))
# Keys of the record's rows next to the configurations' names.
_RECORD_KEYS = ("baseline_loss", "baseline_seconds")


def bench(
    job: Job,
    run: RunDir,
    *,
    steps: int | None,
    seconds: float | None,
    baseline: str | None,
    out_dir: Path,
    eval_every: float | None = None,
    variants: tuple[str, ...] = (),
) -> dict[str, Any]:
    """Measure the job, the baseline and the variants; write the JSON record, return it.

    With ``--steps`` every configuration trains (and plans its schedule for) that many steps; with
    only ``--seconds`` the job, its variants and run_mlm or run_clm plan their schedule for that time
    (``train.max_seconds``) while the recipe keeps the notebook's plan, and each is stopped when its time is up.
    """
    configs = [("job", job)]
    if baseline:
        configs.append((baseline, baseline_job(job, baseline)))
    configs += [variant_job(job, spec) for spec in variants]
    names = [name for name, _ in configs]
    if len(set(names)) != len(names):
        raise JobConfigError(f"--variant: configuration names repeat: {', '.join(names)}")
    for _, config in configs:
        # A malformed probe file, a missing DeepSpeed config: refused now, not after the training.
        require_before_start(config, run, {"pretrain", "evaluate"}, leased=False)  # its worker takes no lease
    _prepare_inputs(job, run)
    header: dict[str, Any] = {
        "job": job.name,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": machine(),
        "corpus": job.corpus.source,
        "steps": steps,
        "seconds": seconds,
        "eval_every": eval_every,
        "baseline": baseline,
        "held_out": _held_out(job, run),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    path = out_dir / f"{job.name}-{header['machine']['device_tag']}-{stamp}.json"
    rows: list[dict[str, Any]] = []
    for name, config in configs:
        log.info("bench: training %s for %s", name, f"{seconds:.0f} s" if seconds else f"{steps} steps")
        if seconds and steps is None and (name != baseline or name in SCRIPTS):
            # Ours plans its schedule for the time it is given (train.max_seconds), and so do the scripts: a
            # skilled user given the time sets num_train_epochs to what fits it, rather than stopping after
            # 3 epochs on a fast machine or mid-schedule on a slow one. The recipe keeps the notebook's plan.
            fitted = {"max_seconds": seconds} | ({"epochs": None} if name == baseline else {})
            config = config.model_copy(update={"train": config.train.model_copy(update=fitted)})
        row = _in_fresh_process(
            name, config, run, steps, seconds, eval_every, baseline=name == baseline, eval_masks=job
        )
        rows.append({**row, "load_average_after": _load_average()})
        # Rewritten after every configuration: a long bench that is stopped keeps what it measured.
        record = {**header, "complete": len(rows) == len(configs), "results": rows, **compare(rows, baseline)}
        write_json_atomic(path, record)
    record["path"] = str(path)
    return record


def compare(rows: list[dict[str, Any]], baseline: str | None) -> dict[str, Any]:
    """Ratios against the baseline: throughput, and when each configuration reached its final loss."""
    base = next((row for row in rows if row["name"] == baseline), None)
    if base is None:
        return {}
    ours = rows[0]
    result: dict[str, Any] = {
        "speedup": {
            key: ours[key] / base[key] for key in ("steady_tokens_per_second", "real_tokens_per_second") if base[key]
        }
    }
    if baseline in SCRIPTS:
        reached: dict[str, Any] = {}
        for cut in EVAL_CUTS[:2]:
            target, spent = base[f"eval_loss_{cut}"], base["training_seconds"]
            reached[cut] = {"baseline_loss": target, "baseline_seconds": spent}
            for row in rows:
                if row is not base:
                    at = time_to_reach(row["curve"], f"{cut}_loss", target)
                    reached[cut][row["name"]] = {"seconds": at, "share": at / spent if at is not None else None}
        result["time_to_baseline_loss"] = reached
    return result


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
        "cuda": torch.version.cuda,
        # A device image brings its own: records of two machines may differ here as well.
        **{name: _version(name) for name in ("transformers", "accelerate", "datasets", "deepspeed")},
        "python": platform.python_version(),
    }


def _version(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _accuracy(row: dict[str, Any]) -> float:
    """Held-out accuracy on packed blocks: masked tokens for a masked LM, next tokens for a causal one."""
    return next(row[f"eval_{name}_packed"] for name in ACCURACY.values() if f"eval_{name}_packed" in row)


def format_table(record: dict[str, Any]) -> str:
    accuracy = "masked acc" if "eval_masked_accuracy_packed" in record["results"][0] else "next-token acc"
    columns = (
        ("config", lambda r: r["name"]),
        ("vocab", lambda r: f"{r['vocab_size']:,}"),
        ("data", lambda r: r["data_mode"]),
        ("head", lambda r: "masked" if r["sparse_prediction"] else "dense"),
        ("precision", lambda r: r["precision"]),
        ("attention", lambda r: r.get("attention", "-")),  # records before train.attention lack it
        ("dropout", lambda r: f"{r['dropout']:g}"),
        ("batch", lambda r: str(r["batch_size"])),
        ("lr", lambda r: f"{r['learning_rate']:g} {r['lr_scheduler']}"),
        ("tokens/s", lambda r: f"{r['steady_tokens_per_second']:,.0f}"),
        ("step s", lambda r: f"{r['step_time_s']:.2f}" if r["step_time_s"] else "-"),
        ("MFU", lambda r: f"{100 * r['steady_mfu']:.1f}%"),
        ("peak mem", lambda r: f"{r['peak_memory_bytes'] / 2**30:.2f} GiB"),
        ("steps", lambda r: str(r["global_step"])),
        ("train s", lambda r: f"{r['training_seconds']:.0f}"),
        ("loss blocks", lambda r: f"{r['eval_loss_packed']:.3f}"),
        ("loss grouped", lambda r: f"{r['eval_loss_grouped']:.3f}"),
        ("loss lines", lambda r: f"{r['eval_loss_lines']:.3f}"),
        (accuracy, lambda r: f"{100 * _accuracy(r):.1f}%"),
    )
    cells = [[header for header, _ in columns]] + [[cell(r) for _, cell in columns] for r in record["results"]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    lines = ["  ".join(value.rjust(width) for value, width in zip(row, widths, strict=True)) for row in cells]
    lines.insert(1, "  ".join("-" * width for width in widths))
    if "speedup" in record:
        lines.append(
            f"speedup over the {record['baseline']}: {record['speedup']['steady_tokens_per_second']:.2f}x real tokens/s"
        )
    for cut, reached in record.get("time_to_baseline_loss", {}).items():
        for name, at in reached.items():
            if isinstance(at, dict):
                when = (
                    f"{at['seconds']:.0f} s ({100 * at['share']:.0f}% of its time)" if at["seconds"] else "not reached"
                )
                lines.append(
                    f"{name} reached {record['baseline']}'s final {cut} loss {reached['baseline_loss']:.3f} "
                    f"(at {reached['baseline_seconds']:.0f} s): {when}"
                )
    for row in record["results"]:
        if row.get("stopped_by") == "diverged":
            lines.append(f"{row['name']}: diverged (NaN or infinite loss) by step {row['global_step']}")
        lines.extend(f"{row['name']}: {line}" for line in format_quality(row.get("quality") or {}))
    lines.append(
        f"machine: {record['machine']['device']}, torch {record['machine']['torch']}, "
        f"load average after the last configuration {record['results'][-1]['load_average_after']}"
    )
    return "\n".join(lines)


def _load_average() -> list[float] | None:
    # Other work on the machine slows every configuration; the record says how busy it was.
    try:
        return [round(value, 2) for value in os.getloadavg()]
    except OSError:
        return None


def _prepare_inputs(job: Job, run: RunDir) -> None:
    """The corpus and tokenizer the configurations share: the phases before pretrain, skipped as `run`
    skips them (complete, with the same fingerprint), so a changed tokenizer setting is retrained."""
    from kantai_batch.phases import before
    from kantai_batch.pipeline import run_pipeline

    run_pipeline(job, run, phases=before("pretrain"))


def _held_out(job: Job, run: RunDir) -> dict[str, Any]:
    """What the held-out losses are computed on: records with equal entries scored the same tokens
    and masks, so their losses compare across bench runs."""
    from kantai_batch.data import PACKING

    corpus, tokenizer = run.marker(run.corpus), run.marker(run.tokenizer)
    return {
        "text_sha256": corpus["files"]["eval.txt"]["sha256"],
        # Of its files' digests: the folder as its manifest lists it.
        "tokenizer_sha256": hashlib.sha256(json.dumps(tokenizer["files"], sort_keys=True).encode()).hexdigest(),
        "eval_seed": job.eval.seed,
        "mlm_probability": job.eval.mlm_probability if job.task == "mlm" else None,
        # How the cuts are made (the packed cut's </s> between paragraphs was scored before version 2),
        # and into what blocks: every configuration is scored on the bench job's.
        "packing": PACKING,
        "block_size": job.data.block_size,
    }


def _in_fresh_process(
    name: str,
    job: Job,
    run: RunDir,
    steps: int | None,
    seconds: float | None,
    eval_every: float | None,
    *,
    baseline: bool,
    eval_masks: Job,
) -> dict[str, Any]:
    """``bench_worker.measure`` in a new interpreter: its own peak memory, no state left by the previous config.

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
                    "eval_every": eval_every,
                    "grouped_training": baseline and name in SCRIPTS,
                    # Held-out masks are the same for every configuration, whatever masking rate or
                    # seed it trains with: the bench job's eval.mlm_probability and eval.seed.
                    "eval_masking": eval_masks.eval.mlm_probability,
                    "eval_seed": eval_masks.eval.seed,
                    # And cut into the bench job's blocks: a variant of another block size is scored
                    # on the same tokens.
                    "eval_block_size": eval_masks.data.block_size,
                    "level": logging.getLogger().getEffectiveLevel(),
                }
            )
        )
        command = [sys.executable, "-m", "kantai_batch.bench_worker", str(spec), str(out)]
        returncode = _run_worker(command)
        if returncode != 0 or not out.is_file():
            raise KantaiError(f"bench: training the {name} configuration failed (exit {returncode}; see above)")
        return json.loads(out.read_text())


def _run_worker(command: list[str], grace: float = 30.0) -> int:
    """The worker's exit code; a bench stopped meanwhile (SIGTERM, Ctrl-C, an error) stops the worker first.

    Otherwise a `kill` or `timeout` of bench would leave its worker training for the rest of its budget,
    and bench's scratch folder behind, since SIGTERM's default ends a process without cleaning up. The
    worker gets `grace` seconds to exit on SIGTERM before SIGKILL; further SIGTERMs and Ctrl-Cs in that
    time are ignored, since one that cut the stop short would orphan the worker all the same.
    """
    # The worker's stdout (the Trainer prints its metrics there) joins the logs on stderr.
    worker = subprocess.Popen(command, stdout=sys.__stderr__)
    saved: dict[int, Any] = {}
    if threading.current_thread() is threading.main_thread():  # where handlers can be installed
        # None: a handler installed outside Python, which cannot be put back from here.
        saved = {sig: h for sig in (signal.SIGTERM, signal.SIGINT) if (h := signal.getsignal(sig)) is not None}

        def on_sigterm(signum, frame):
            for sig in saved:  # before unwinding: a second signal must not land in the stop below
                signal.signal(sig, signal.SIG_IGN)
            raise SystemExit(128 + signum)

        if signal.SIGTERM in saved:
            signal.signal(signal.SIGTERM, on_sigterm)
    try:
        return worker.wait()
    finally:
        for sig in saved:
            signal.signal(sig, signal.SIG_IGN)
        try:
            if worker.poll() is None:
                worker.terminate()
                try:
                    worker.wait(timeout=grace)
                except subprocess.TimeoutExpired:
                    worker.kill()
                    worker.wait()
        finally:
            for sig, handler in saved.items():
                signal.signal(sig, handler)
