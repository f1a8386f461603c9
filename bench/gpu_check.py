"""`make gpu-check`: the GPU figures in one command, sized for about 8 minutes on one H100.

1. The KantaiBERT model (6 x 768 x 12, the Kant tokenizer's 8,384-row vocabulary) trained in bf16 with
   `kantai-batch bench`, one configuration at a time, each printed (with its time) as it ends: block
   128 eager (the job) and compiled, a profile of the compiled steps, DeepSpeed ZeRO-2, block 512
   compiled; batches of 128k tokens (64k on a card under 40 GiB). A configuration that would end past
   `--budget-s` (judged by the longest so far) is skipped, and one that fails is reported while the
   rest still run.
2. A table of steady tokens/s and MFU against the card's bf16 dense peak; the bench records land in
   bench/results/ (and in $OUT when it is set, with the profile's trace and gpu-check.log).
3. The gpu-marked tests (bf16 under DeepSpeed ZeRO-2; training steps that never wait for the GPU), last
   and within what is left of the budget, so a test that hangs cannot eat the figures.

The machine cannot reach the internet, so the corpus is generated: Kantian sentences, enough for the
steps (throughput and MFU do not depend on what the text says). `--dry-run` runs the same plumbing
with a tiny model for 8 steps on any machine (no compile, no DeepSpeed), to check the script itself.

    python bench/gpu_check.py [--dry-run] [--steps 60] [--budget-s 480] [--out bench/results]
                              [--configs b128-compile ...] [--no-tests]
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
KANTAI_VOCAB = 8384  # the Kant tokenizer's size rounded up to 64, as model.vocab_size auto gives
TINY = ("model.num_hidden_layers=2", "model.hidden_size=64", "model.num_attention_heads=4",
        "model.intermediate_size=128", "tokenizer.vocab_size=1000")  # fmt: skip

_WORDS = {
    "subject": ["reason", "the understanding", "pure intuition", "experience", "the mind", "human thinking", "nature",
                "the transcendental unity of apperception", "every conception", "sensibility", "the soul"],
    "verb": ["involves", "determines", "transcends", "requires", "contains", "presupposes", "limits", "cognizes"],
    "object": ["human reason", "a priori cognition", "the conditions of experience", "space and time",
               "every object", "the categories", "the unconditioned", "synthetical judgements", "phenomena"],
}  # fmt: skip


def corpus(path: Path, paragraphs: int, seed: int = 0) -> Path:
    rng = random.Random(seed)
    with path.open("w", encoding="utf-8") as out:
        for _ in range(paragraphs):
            sentences = (
                f"{rng.choice(_WORDS['subject']).capitalize()} {rng.choice(_WORDS['verb'])} "
                f"{rng.choice(_WORDS['object'])}{rng.choice(['.', ';', ', and thus', '.'])}"
                for _ in range(rng.randint(4, 9))
            )
            out.write(" ".join(sentences) + "\n\n")
    return path


def batch_for(block: int, dry_run: bool) -> int:
    if dry_run:
        return 4
    import torch

    # 128k tokens took 25.6 GiB on an H200 (bf16, block 128 and 512): any 40 GiB+ card holds them.
    tokens = 131072 if torch.cuda.get_device_properties(0).total_memory > 40 * 2**30 else 65536
    return tokens // block


class Log:
    """Lines to stdout and, when the device machine's $OUT is set, to $OUT/gpu-check.log: the call returns only
    the tail of its output, which progress bars and warnings can push the figures out of."""

    def __init__(self, out: Path | None) -> None:
        self.file = (out / "gpu-check.log").open("a", encoding="utf-8") if out is not None else None
        self.start = time.monotonic()

    def __call__(self, line: str) -> None:
        print(line, flush=True)
        if self.file is not None:
            self.file.write(line + "\n")
            self.file.flush()

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.start


def quiet_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """No progress bars (datasets', the Trainer's tqdm): their lines would crowd the figures out of the tail."""
    return {**(env or os.environ), "HF_DATASETS_DISABLE_PROGRESS_BARS": "1", "TQDM_DISABLE": "1"}


def bench(run_dir: Path, source: Path, out: Path, steps: int, sets: list[str], env=None) -> dict | None:
    """One bench run's record; None when it failed (its exit code is printed)."""
    command = [sys.executable, "-m", "kantai_batch", "--log-level", "warning", "bench", "--run-dir", str(run_dir),
               "--corpus", str(source), "--steps", str(steps), "--out", str(out), "--json"]  # fmt: skip
    for item in sets:
        command += ["--set", item]
    done = subprocess.run(command, cwd=ROOT, env=quiet_env(env), stdout=subprocess.PIPE, text=True, check=False)
    if done.returncode != 0:
        print(f"gpu-check: bench failed (exit {done.returncode}): {' '.join(command)}", flush=True)
        return None
    return json.loads(done.stdout)


def single_process_env() -> dict[str, str]:
    """DeepSpeed initializes a process group even for one process: give it a rendezvous of one."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    ranks = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1"}
    return {**os.environ, **ranks, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}


CONFIGS = ("b128", "b128-compile", "b512", "b512-compile", "zero2", "profile")
# b512 eager is left out by default: at the median step it gave what b128 eager did (H200, 2026-11-27),
# and the time goes to profiling the best configuration instead.
DEFAULT_CONFIGS = ("b128-compile", "profile", "zero2", "b512-compile")
PROFILE_STEPS = 5


def configurations(args: argparse.Namespace) -> dict[str, list[str]]:
    """Each configuration's settings (`--set`s), b128 (the job, eager) first: the others read as ratios to it."""
    b128 = [f"train.per_device_batch_size={batch_for(128, args.dry_run)}"]
    b512 = ["data.block_size=512", f"train.per_device_batch_size={batch_for(512, args.dry_run)}"]
    compiled = ["train.torch_compile=true"]
    every = {
        "b128": b128,
        "b128-compile": [*b128, *compiled],
        "b512": b512,
        "b512-compile": [*b512, *compiled],
        "zero2": [*b128, f"train.deepspeed={ROOT / 'jobs/deepspeed/zero2.json'}"],
        # Where b128-compile's step time goes (the profiler slows the steps it records: a row of its own).
        "profile": [*b128, *compiled, f"train.profile_steps={PROFILE_STEPS}"],
    }
    if args.dry_run:
        every["profile"] = [*b128, "train.profile_steps=1"]
    wanted = ["b128", *(c for c in args.configs if c != "b128")]
    # Each bench run makes the run dir's tokens for its own block size: one block size after the other
    # tokenizes the corpus once for each, not again at every switch.
    wanted.sort(key=lambda c: c.startswith("b512"))
    return {c: every[c] for c in wanted if not (args.dry_run and (c.endswith("compile") or c == "zero2"))}


def measure(args: argparse.Namespace, scratch: Path, out: Path | None, log: Log) -> tuple[list[dict], list[str]]:
    """One bench run per configuration, each kept (and printed) as it ends: a call cut short by the
    device's time limit still returns what it measured. A configuration that would end past
    ``--budget-s`` (judged by the longest so far) is skipped; one that fails is reported and the rest
    still run. Returns the records and the names that failed."""
    # Enough text that the steps stay within one epoch at 128k tokens a batch (about 8M tokens): an
    # epoch's first batch waits for the dataloader workers to start over, which is not the steady state.
    # A small eval split: the held-out cuts are tokenized for every block size and are not what is timed.
    source = corpus(scratch / "kantian.txt", 300 if args.dry_run else 200_000)
    shape = list(TINY) if args.dry_run else [f"model.vocab_size={KANTAI_VOCAB}", "data.eval_fraction=0.01"]
    common = [*shape, "train.precision=auto" if args.dry_run else "train.precision=bf16"]
    records, failed, longest = [], [], 0.0
    for name, sets in configurations(args).items():
        if records and log.elapsed + longest > args.budget_s:
            log(f"gpu-check: {name} skipped at {log.elapsed:.0f} s: the longest configuration took {longest:.0f} s, "
                f"past the {args.budget_s:.0f} s budget")  # fmt: skip
            continue
        began = time.monotonic()
        env = single_process_env() if name == "zero2" else None
        record = bench(scratch / "run", source, args.out, args.steps, [*common, *sets], env=env)
        took = time.monotonic() - began
        longest = max(longest, took)
        if record is None:
            failed.append(name)
            log(f"gpu-check: {name} failed after {took:.0f} s (at {log.elapsed:.0f} s); going on")
            continue
        record["config"] = name
        records.append(record)
        log(f"{table([record]).splitlines()[1]}   ({took:.0f} s, at {log.elapsed:.0f} s)")
        if out is not None:
            keep([record], out)
    return records, failed


def table(records: list[dict]) -> str:
    lines = [f"{'config':>13} {'block':>5} {'batch':>5} {'compile':>7} {'tokens/s':>10} {'MFU':>6} {'peak GiB':>8} "
             f"{'train s':>7} {'warm-up s':>9} {'parallelism':>18}"]  # fmt: skip
    for record in records:
        for row in record["results"]:
            lines.append(
                f"{record['config']:>13} {row['block_size']:>5} {row['batch_size']:>5} {str(row['torch_compile']):>7} "
                f"{row['steady_tokens_per_second']:>10,.0f} {100 * row['steady_mfu']:>5.1f}% "
                f"{row['peak_memory_bytes'] / 2**30:>8.1f} {row['train_runtime_s']:>7.0f} "
                f"{row.get('warmup_seconds', 0.0):>9.1f} {row['parallelism']:>18}"
            )
    device = records[0]["machine"]["device"]
    first = records[0]["results"][0]
    peak = f"{first['peak_flops'] / 1e12:.2f} TFLOP/s"
    where = "on a GPU its dense data-sheet figure, on a CPU a measured matmul"
    records_at = ", ".join(r["path"] for r in records)
    lines.append(f"MFU against the {first['precision']} peak of {device}, {peak} ({where}); records: {records_at}")
    for record in records:
        lines += [line for row in record["results"] if row.get("profile") for line in profiled(record["config"], row)]
    return "\n".join(lines)


def profiled(config: str, row: dict) -> list[str]:
    profile = row["profile"]
    head = (
        f"{config}: {profile['steps']} steps profiled, {profile['wall_ms_per_step']:.1f} ms a step, "
        f"{profile['total_ms_per_step']:.1f} ms of it {profile['clock']} time, "
        f"{100 * profile['matmul_share']:.1f}% of that in matmuls"
    )
    ops = profile["top_ops"][:15]
    return [
        head,
        *(
            f"  {100 * op['share']:5.1f}% {op['ms_per_step']:8.2f} ms {op['calls']:>6} calls  {op['name'][:90]}"
            for op in ops
        ),
    ]


def keep(records: list[dict], out: Path) -> None:
    """The records and the profiled steps' traces (gzipped) into the device machine's $OUT."""
    for record in records:
        shutil.copy(record["path"], out)
        for row in record["results"]:
            if row.get("profile"):
                trace = Path(row["profile"]["trace"])
                with trace.open("rb") as src, gzip.open(out / f"{record['config']}-{trace.name}.gz", "wb") as dst:
                    shutil.copyfileobj(src, dst)


def gpu_tests(log: Log, left: float, out: Path | None) -> bool:
    """The gpu-marked tests in what is left of the budget; their whole output to $OUT/gpu-tests.log."""
    if left < 60:
        log(f"gpu-check: gpu tests skipped: {max(left, 0):.0f} s of the budget left")
        return True
    tests = [sys.executable, "-m", "pytest", "-m", "gpu", "-s", "-q", "-p", "no:cacheprovider", "tests/test_gpu.py"]
    try:
        done = subprocess.run(tests, cwd=ROOT, env=quiet_env(), timeout=left, capture_output=True, text=True)
    except subprocess.TimeoutExpired:
        log(f"gpu-check: gpu tests stopped after {left:.0f} s, at the budget")
        return False
    if out is not None:
        (out / "gpu-tests.log").write_text(done.stdout + done.stderr, encoding="utf-8")
    lines = done.stdout.strip().splitlines()
    log(f"gpu-check: gpu tests exit {done.returncode} (at {log.elapsed:.0f} s): {lines[-1] if lines else 'no output'}")
    return done.returncode == 0


_SCRATCH_ENTRIES = {"kantian.txt", "run"}  # what ``measure`` writes into the scratch


def _at_least_two(text: str) -> int:
    """Steps a configuration times: the first is left out of the steady rate, so two at the least."""
    value = int(text)
    if value < 2:
        raise argparse.ArgumentTypeError(f"must be at least 2, got {value}")
    return value


def below_floor(pyproject: Path = ROOT / "pyproject.toml") -> list[str]:
    """A line for each installed package older than the package's declared lower bound: the device image
    brings its own transformers and accelerate, and the package is not pip-installed there to check them
    (an older Trainer skips the hooks the figures depend on, such as sdpa's unmasked batches)."""
    from importlib.metadata import PackageNotFoundError, version

    import tomllib
    from packaging.requirements import Requirement

    lines = []
    for spec in tomllib.loads(pyproject.read_text(encoding="utf-8"))["project"]["dependencies"]:
        requirement = Requirement(spec)
        try:
            found = version(requirement.name)
        except PackageNotFoundError:
            continue  # not imported by the check (mlflow, boto3): left out of the wheels on purpose
        if not requirement.specifier.contains(found, prereleases=True):
            lines.append(
                f"gpu-check: warning: {requirement.name} {found} here, the package needs {requirement.specifier}"
            )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="Tiny model, 8 steps, any machine.")
    parser.add_argument(
        "--steps", type=_at_least_two, default=None, help="Steps per configuration [60; 8 with --dry-run]."
    )
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument(
        "--configs",
        nargs="+",
        choices=CONFIGS,
        default=list(DEFAULT_CONFIGS),
        help=f"What to measure beside b128 [{' '.join(DEFAULT_CONFIGS)}].",
    )
    parser.add_argument("--no-tests", action="store_true", help="Leave out the gpu-marked tests.")
    parser.add_argument(
        "--budget-s",
        type=float,
        default=480,
        help="Seconds the whole check aims at: configurations that would end past it are skipped, and the "
        "gpu tests run after the figures only if time is left [480].",
    )
    parser.add_argument("--scratch", type=Path, default=Path("/tmp/kantai-gpu-check"))
    args = parser.parse_args()
    # The scratch is replaced whole: only one holding what this script makes there, or nothing.
    if args.scratch.exists() and not {p.name for p in args.scratch.iterdir()} <= _SCRATCH_ENTRIES:
        parser.error(f"--scratch {args.scratch} holds files this script did not make; name a new or empty folder")
    # A dry run's 8 steps reach past the profiler's first 5, so its plumbing runs too.
    args.steps = args.steps or (8 if args.dry_run else 60)
    args.out = args.out.resolve()
    if not args.dry_run:
        import torch

        if not torch.cuda.is_available():
            raise SystemExit("gpu-check: no CUDA device here; --dry-run checks the script on any machine")
    out = Path(os.environ["OUT"]) if os.environ.get("OUT") else None
    log = Log(out)
    shutil.rmtree(args.scratch, ignore_errors=True)
    args.scratch.mkdir(parents=True)
    for line in below_floor():
        log(line)
    # The figures first: they are what the device minutes are for, and a test that hangs must not eat them.
    records, failed = measure(args, args.scratch, out, log)
    if records:
        log(table(records))
    if not args.dry_run and not args.no_tests and not gpu_tests(log, args.budget_s - log.elapsed, out):
        failed.append("gpu tests")
    if failed:
        raise SystemExit(f"gpu-check: failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
