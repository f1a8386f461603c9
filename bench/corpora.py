"""Corpora as users have them: prepare and tokenize throughput, peak memory, pretrain's time to its first step.

For each size (``--sizes``, MB of text) it generates a corpus of many files, a third gzip, a third zstd,
in a scratch folder (default /tmp/kantai-bench-corpora, reused when already there), and runs each phase
as its own ``python -m kantai_batch`` process, one at a time:

- prepare (one process: it has no worker option) and train-tokenizer (not measured: a 1,000-token
  vocabulary on at most ``--tokenizer-mb`` of text, so that a large corpus does not wait on it);
- tokenize with ``--workers 1``, with ``--workers 2``, and as 2 parts (``--parts 2``, two processes
  at once, one worker each, the last one committing tokens/), each from a cleared datasets cache;
- pretrain of a tiny model (``tests/helpers.py``'s) for one step (``train.max_steps=1``) reading
  tokens/, against the old path: the same command from the commit before pretrain read tokens/
  (``--old-commit``, checked out into the scratch folder), whose pretrain tokenized both splits with
  datasets ``map`` at start-up. Each is timed from process start to exit, so it includes imports,
  model set-up, the one step and saving the tiny model.

Throughput is MB of decoded input text per second of wall time: for prepare the corpus files'
uncompressed bytes, for tokenize the bytes of corpus/train.txt and eval.txt. Peak memory is the
largest sum of RSS over the process and all its descendants, sampled every 0.1 s with psutil (a
worker that lives less than that can be missed). The machine's load average is recorded before and
after each size: other work on the machine slows every figure, so compare rows of one record.

    python bench/corpora.py [--sizes 100,1000] [--scratch /tmp/kantai-bench-corpora] [--out FILE]

MB here is 10^6 bytes.
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import json
import os
import platform
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import psutil

from kantai_batch.job import TINY_MODEL

ROOT = Path(__file__).resolve().parents[1]
MB = 1_000_000
# The commit before pretrain read RUN/tokens (7df60aa): its pretrain tokenized with datasets map.
OLD_COMMIT = "79c09b6"
TINY = (
    *TINY_MODEL,
    "train.per_device_batch_size=8",
    "train.max_steps=1",
    "train.save_steps=1000",
    "train.logging_steps=1",
    "train.precision=fp32",
)
FILE_MB = {100: 2.5, 1000: 10}
# The Trainer's log line of step 1 (train.logging_steps=1), old and new code alike.
FIRST_STEP = "{'loss': "
_SAMPLE_S = 0.1


# ---- the corpus ----------------------------------------------------------------------------------


def _words(rng: random.Random, count: int) -> list[str]:
    syllables = ["ka", "ri", "to", "sen", "mu", "pla", "ver", "dis", "an", "che", "lo", "tru", "ex", "quo", "ne"]
    words = {"".join(rng.choices(syllables, k=rng.randint(1, 4))) for _ in range(count * 2)}
    return sorted(words)[:count]


def generate(folder: Path, megabytes: int, seed: int = 0) -> dict:
    """Many files of paragraphs (Zipf-like word frequencies, some curly quotes and dashes); a third .gz, a third .zst.

    Deterministic for (megabytes, seed); a folder that holds a complete corpus already is kept.
    """
    import zstandard

    record_file = folder.with_suffix(".json")
    if record_file.is_file():
        return json.loads(record_file.read_text())
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    rng = random.Random(seed)
    vocabulary = _words(rng, 20_000)
    weights = [1 / (rank + 1) for rank in range(len(vocabulary))]
    per_file = int(FILE_MB.get(megabytes, max(1, megabytes / 40)) * MB)
    files, text_bytes, index = [], 0, 0
    started = time.perf_counter()
    while text_bytes < megabytes * MB:
        paragraphs, size = [], 0
        while size < per_file:
            words = rng.choices(vocabulary, weights, k=rng.randint(20, 160))
            words[0] = words[0].capitalize()
            if rng.random() < 0.2:
                words[rng.randrange(len(words))] = "\u2014 \u201cvernunft\u201d"
            lines, line = [], []
            for word in words:
                line.append(word)
                if len(line) == 12:
                    lines.append(" ".join(line))
                    line = []
            paragraph = "\n".join(lines + [" ".join(line)]).strip() + "."
            paragraphs.append(paragraph)
            size += len(paragraph.encode("utf-8")) + 2
        data = ("\n\n".join(paragraphs) + "\n").encode("utf-8")
        kind = ("txt", "txt.gz", "txt.zst")[index % 3]
        path = folder / f"part-{index:04d}.{kind}"
        if kind == "txt.gz":
            data_out = gzip.compress(data, compresslevel=1)
        elif kind == "txt.zst":
            data_out = zstandard.ZstdCompressor(level=3).compress(data)
        else:
            data_out = data
        path.write_bytes(data_out)
        files.append({"name": path.name, "text_bytes": len(data), "stored_bytes": len(data_out)})
        text_bytes += len(data)
        index += 1
    record = {
        "files": len(files),
        "text_bytes": text_bytes,
        "stored_bytes": sum(f["stored_bytes"] for f in files),
        "compressed_files": sum(1 for f in files if f["name"].endswith((".gz", ".zst"))),
        "generate_s": round(time.perf_counter() - started, 1),
    }
    record_file.write_text(json.dumps(record, indent=2) + "\n")
    return record


# ---- measuring one phase -------------------------------------------------------------------------


def _tree_rss(process: psutil.Process) -> int:
    total = 0
    for member in [process, *process.children(recursive=True)]:
        try:
            total += member.memory_info().rss
        except psutil.Error:
            pass
    return total


def measure(commands: list[list[str]], env: dict[str, str], log: Path, *, until: str | None = None) -> dict:
    """Run ``commands`` at once; wall time until the last exits and the peak of their summed tree RSS.

    With ``until``, the clock stops at the first output line holding that text, and the processes are
    killed there (pretrain's evaluation after its one step is not what is measured).
    """
    started = time.perf_counter()
    reached = threading.Event()
    with log.open("a", encoding="utf-8", errors="replace") as sink:
        sink.write(f"\n$ {' ; '.join(' '.join(c) for c in commands)}\n")
        sink.flush()
        running = [
            subprocess.Popen(c, cwd=env["BENCH_CWD"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             start_new_session=True)
            for c in commands
        ]  # fmt: skip
        readers = [threading.Thread(target=_copy, args=(p.stdout, sink, until, reached)) for p in running]
        for reader in readers:
            reader.start()
        handles = [psutil.Process(p.pid) for p in running]
        peak = 0
        while any(p.poll() is None for p in running) and not reached.is_set():
            peak = max(peak, sum(_tree_rss(h) for h in handles if h.is_running()))
            time.sleep(_SAMPLE_S)
        seconds = time.perf_counter() - started
        if reached.is_set():
            for process in running:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
        for process in running:
            process.wait()
        for reader in readers:
            reader.join()
    codes = [p.returncode for p in running]
    if until and not reached.is_set() or not until and any(codes):
        raise SystemExit(f"failed ({codes}): {commands}; see {log}")
    return {"seconds": round(seconds, 2), "peak_rss_mb": round(peak / MB, 1)}


def _copy(stream, sink, until: str | None, reached: threading.Event) -> None:
    for raw in iter(stream.readline, b""):
        line = raw.decode("utf-8", errors="replace")
        if until and until in line:
            reached.set()
        sink.write(line)
    sink.flush()


def kantai(*args: str) -> list[str]:
    overrides = [item for key in TINY for item in ("--set", key)]
    return [sys.executable, "-m", "kantai_batch", "--log-level", "warning", *args, *overrides]


def environment(scratch: Path, code: Path) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith(("KANTAI_", "JOB_COMPLETION"))}
    return {
        **env,
        "PYTHONPATH": str(code),
        "BENCH_CWD": str(scratch),
        "HF_HOME": str(scratch / "hf"),
        "HF_DATASETS_CACHE": str(scratch / "hf-datasets"),
        "HF_HUB_OFFLINE": "1",
        "KANTAI_TRACKING": "false",
        "KANTAI_CACHE_DIR": str(scratch / "cache"),
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONUNBUFFERED": "1",  # the first step is seen when it is printed
    }


def fresh_cache(env: dict[str, str]) -> None:
    """No run reuses another's datasets cache (the text as Arrow, map results)."""
    shutil.rmtree(env["HF_DATASETS_CACHE"], ignore_errors=True)


def old_checkout(scratch: Path, commit: str) -> Path:
    """The old commit's package, exported (git archive) into the scratch folder."""
    target = scratch / f"kantai-{commit}"
    if not (target / "kantai_batch").is_dir():
        target.mkdir(parents=True, exist_ok=True)
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", commit, "kantai_batch"], capture_output=True)
        if archive.returncode != 0:
            raise SystemExit(f"git archive {commit}: {archive.stderr.decode().strip()}")
        subprocess.run(["tar", "-x", "-C", str(target)], input=archive.stdout, check=True)
    return target


# ---- one size --------------------------------------------------------------------------------------


def bench_size(megabytes: int, scratch: Path, old: Path, tokenizer_mb: int, log: Path) -> dict:
    work = scratch / f"{megabytes}mb"
    corpus = generate(scratch / "corpora" / f"{megabytes}mb", megabytes)
    run = work / "run"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    env = environment(work, ROOT)
    load_before = os.getloadavg()
    rows: dict[str, dict] = {}
    source = str(scratch / "corpora" / f"{megabytes}mb")

    fresh_cache(env)
    rows["prepare"] = measure([kantai("prepare", "--run-dir", str(run), "--corpus", source)], env, log)
    split_bytes = (run / "corpus" / "train.txt").stat().st_size + (run / "corpus" / "eval.txt").stat().st_size
    rows["prepare"]["mb_per_s"] = round(corpus["text_bytes"] / MB / rows["prepare"]["seconds"], 2)
    budget = f"tokenizer.max_training_bytes={tokenizer_mb * MB}"
    rows["train-tokenizer"] = measure([kantai("train-tokenizer", "--run-dir", str(run), "--set", budget)], env, log)

    variants = {
        "tokenize, 1 worker": [kantai("tokenize", "--run-dir", str(run), "--workers", "1")],
        "tokenize, 2 workers": [kantai("tokenize", "--run-dir", str(run), "--workers", "2")],
        "tokenize, 2 parts": [
            kantai("tokenize", "--run-dir", str(run), "--workers", "1", "--parts", "2", "--part", str(part))
            for part in (0, 1)
        ],
    }
    reference = None
    for name, commands in variants.items():
        shutil.rmtree(run / "tokens", ignore_errors=True)
        fresh_cache(env)
        rows[name] = measure(commands, env, log)
        rows[name]["mb_per_s"] = round(split_bytes / MB / rows[name]["seconds"], 2)
        stats = json.loads((run / "tokens" / "tokens.json").read_text())["splits"]
        counts = {split: (stats[split]["samples"], stats[split]["tokens"]) for split in stats}
        reference = reference or counts
        if counts != reference:
            raise SystemExit(f"{name} made other samples than the first: {counts} vs {reference}")
    fresh_cache(env)
    rows["pretrain from tokens/"] = measure([kantai("pretrain", "--run-dir", str(run))], env, log, until=FIRST_STEP)
    # The old code path: the same command from the old commit, which tokenizes both splits at start-up.
    shutil.rmtree(run / "model", ignore_errors=True)
    shutil.rmtree(run / "checkpoints", ignore_errors=True)
    fresh_cache(env)
    rows["pretrain, old path (datasets map at start-up)"] = measure(
        [kantai("pretrain", "--run-dir", str(run))], environment(work, old), log, until=FIRST_STEP
    )
    load_after = os.getloadavg()
    shutil.rmtree(env["HF_DATASETS_CACHE"], ignore_errors=True)
    return {
        "megabytes": megabytes,
        "corpus": corpus,
        "split_bytes": split_bytes,
        "tokens": {split: {"samples": s, "tokens": t} for split, (s, t) in reference.items()},
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in load_after],
        "rows": rows,
    }


def table(record: dict) -> str:
    lines = []
    for size in record["sizes"]:
        rows = size["rows"]
        lines.append(
            f"\n{size['megabytes']} MB: {size['corpus']['files']} files ({size['corpus']['compressed_files']} "
            f"compressed), {size['split_bytes'] / MB:.0f} MB of split text, "
            f"{size['tokens']['train']['samples']:,} train samples; load average "
            f"{size['load_average_before'][0]} before, {size['load_average_after'][0]} after\n"
        )
        lines.append("| step | wall s | MB/s | peak RSS MB |")
        lines.append("| --- | --- | --- | --- |")
        for name, row in rows.items():
            lines.append(f"| {name} | {row['seconds']} | {row.get('mb_per_s', '')} | {row['peak_rss_mb']} |")
        one = rows["tokenize, 1 worker"]["seconds"]
        new = rows["pretrain from tokens/"]["seconds"]
        old = rows["pretrain, old path (datasets map at start-up)"]["seconds"]
        lines.append(
            f"\ntokenize 1 worker / 2 workers: {one / rows['tokenize, 2 workers']['seconds']:.2f}x, "
            f"1 worker / 2 parts: {one / rows['tokenize, 2 parts']['seconds']:.2f}x; pretrain to one step, "
            f"old / from tokens: {old / new:.2f}x; old / (tokenize 1 worker + pretrain from tokens): "
            f"{old / (one + new):.2f}x"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="100,1000", help="Corpus sizes in MB of text, comma-separated.")
    parser.add_argument("--scratch", type=Path, default=Path("/tmp/kantai-bench-corpora"))
    parser.add_argument("--tokenizer-mb", type=int, default=20, help="tokenizer.max_training_bytes, in MB.")
    parser.add_argument("--old-commit", default=OLD_COMMIT)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    args.scratch.mkdir(parents=True, exist_ok=True)
    old = old_checkout(args.scratch, args.old_commit)
    log = args.scratch / "bench.log"
    started = datetime.now(timezone.utc)
    record = {
        "started": started.isoformat(timespec="seconds"),
        "host": {"cpus": os.cpu_count(), "machine": platform.machine(), "python": platform.python_version()},
        "commit": subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True
        ).stdout.strip(),
        "old_commit": args.old_commit,
        "job_overrides": list(TINY),
        "tokenizer_max_training_mb": args.tokenizer_mb,
        "sizes": [],
    }
    out = args.out or ROOT / "bench" / "results" / f"corpora-{started:%Y%m%d}.json"
    for megabytes in (int(size) for size in args.sizes.split(",")):
        record["sizes"].append(bench_size(megabytes, args.scratch, old, args.tokenizer_mb, log))
        out.write_text(json.dumps(record, indent=2) + "\n")  # what finished survives a later size's failure
        print(table({"sizes": record["sizes"][-1:]}), flush=True)
    record["finished"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"\nrecord: {out}")


if __name__ == "__main__":
    main()
