"""bench against run_mlm (run_clm): the baseline's recipe, the loss curve, variants, time to the baseline's loss."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from helpers import ROOT, SUPPORT_JOB, SUPPORT_OVERRIDES, invoke, prepared_run, support_conversations, tiny, twcs_csv
from kantai_batch.baseline import grouped_lines
from kantai_batch.bench_worker import eval_cuts
from kantai_batch.curve import time_to_reach
from kantai_batch.job import load_job
from kantai_batch.manifest import file_sha256
from kantai_batch.rundir import RunDir


def test_grouped_lines_is_run_mlms_group_texts(tmp_path: Path, corpus_file: Path):
    run = prepared_run(tmp_path / "run", corpus_file)
    tokenizer = AutoTokenizer.from_pretrained(run / "tokenizer")
    text = run / "corpus" / "train.txt"
    blocks = grouped_lines(text, tokenizer, 32, what="train")
    lines = text.read_text(encoding="utf-8").splitlines()
    # As in run_mlm, each map batch of 1,000 lines is grouped on its own and drops its tail.
    expected = []
    for start in range(0, len(lines), 1000):
        stream = [token for line in lines[start : start + 1000] for token in tokenizer(line)["input_ids"]]
        expected += stream[: len(stream) // 32 * 32]
    assert all(len(ids) == 32 for ids in blocks["input_ids"])
    assert [token for ids in blocks["input_ids"] for token in ids] == expected
    # Every line keeps its own <s> ... </s>, blank lines included, as run_mlm tokenizes them.
    assert sum(ids.count(tokenizer.bos_token_id) for ids in blocks["input_ids"]) > len(blocks)
    assert all(len(mask) == 32 for mask in blocks["special_tokens_mask"])


def test_time_to_reach_interpolates_between_evaluations():
    points = [
        {"seconds": 10, "step": 1, "packed_loss": 8.0},
        {"seconds": 20, "step": 2, "packed_loss": 6.0},
        {"seconds": 30, "step": 3, "packed_loss": 5.0},
    ]
    assert time_to_reach(points, "packed_loss", 7.0) == pytest.approx(15.0)
    assert time_to_reach(points, "packed_loss", 8.5) == 10
    assert time_to_reach(points, "packed_loss", 4.0) is None


def _bench(out: Path, *args: str):
    """Run bench into ``out``; its printed table and the record it wrote."""
    result = invoke("bench", *args, "--out", str(out))
    (record_file,) = out.glob("*.json")
    return result, {**json.loads(record_file.read_text()), "path": str(record_file)}


def _assert_runs_like_the_script(baseline: dict, job: dict) -> None:
    """run_mlm.py / run_clm.py as a skilled user runs them: grouped lines, the Trainer's defaults."""
    assert (baseline["data_mode"], baseline["dropout"], baseline["batch_size"]) == ("grouped_lines", 0.1, 8)
    assert baseline["learning_rate"] == 5e-5 and baseline["train"]["weight_decay"] == 0.0
    assert baseline["vocab_size"] == job["vocab_size"]


@pytest.mark.slow
def test_bench_against_run_mlm_with_a_variant(tmp_path: Path, corpus_file: Path):
    out = tmp_path / "results"
    probes = tmp_path / "probes.txt"
    probes.write_text("Pure <mask> is the faculty of principles. -> reason\nIt begins with <mask>. -> experience\n")
    result, record = _bench(
        out, "--run-dir", str(tmp_path / "run"), "--corpus", str(corpus_file), *tiny(f"eval.probes={probes}"),
        "--steps", "4", "--eval-every", "2", "--baseline", "run_mlm",
        "--variant", "wsd:train.lr_scheduler=warmup_stable_decay,train.mlm_probability=0.5",
    )  # fmt: skip
    job, run_mlm, wsd = record["results"]
    assert (job["name"], run_mlm["name"], wsd["name"]) == ("job", "run_mlm", "wsd")
    _assert_runs_like_the_script(run_mlm, job)
    assert run_mlm["sparse_prediction"] is False and job["vocab_size"] < 1024
    assert (run_mlm["train"]["position_init"], job["train"]["position_init"]) == ("random", "sinusoidal")
    assert (wsd["lr_scheduler"], wsd["mlm_probability"]) == ("warmup_stable_decay", 0.5)
    for row in record["results"]:
        assert [point["step"] for point in row["curve"]] == [2, 4]
        assert row["curve"][-1]["packed_loss"] == pytest.approx(row["eval_loss_packed"], rel=1e-5)
        assert row["eval_loss_grouped"] > 0 and row["eval_loss_lines"] > 0 and row["training_seconds"] > 0
        # What people read after the budget: the recipe's sentence and the probes, for every configuration.
        assert len(row["quality"]["fill_mask"]["predicted"]) == 5
        assert row["quality"]["probes"]["probes"] == 2 and len(row["quality"]["probes"]["results"]) == 2
        assert f"{row['name']}: fill-mask 'Human thinking involves human <mask>.': " in result.stdout
    # Held-out masks are the same for all, whatever rate a configuration trains with.
    reached = record["time_to_baseline_loss"]["packed"]
    assert reached["baseline_loss"] == run_mlm["eval_loss_packed"]
    assert set(reached) == {"baseline_loss", "baseline_seconds", "job", "wsd"}
    assert "reached run_mlm's final packed loss" in result.stdout


@pytest.mark.slow
def test_a_diverging_configuration_stops_and_says_so(tmp_path: Path, corpus_file: Path):
    result, record = _bench(
        tmp_path / "results", "--run-dir", str(tmp_path / "run"), "--corpus", str(corpus_file), *tiny(),
        "--steps", "6", "--variant", "too_fast:train.learning_rate=1e30",
    )  # fmt: skip
    job, too_fast = record["results"]
    assert (job["stopped_by"], job["global_step"]) == ("max_steps", 6)
    assert too_fast["stopped_by"] == "diverged" and too_fast["global_step"] < 6
    assert f"too_fast: diverged (NaN or infinite loss) by step {too_fast['global_step']}" in result.stdout


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="finds the worker in Linux's /proc")
def test_a_stopped_bench_stops_its_worker_and_leaves_no_scratch(tmp_path: Path, corpus_file: Path):
    scratch, log = tmp_path / "tmp", tmp_path / "bench.log"
    scratch.mkdir()
    command = [sys.executable, "-m", "kantai_batch", "bench", "--run-dir", str(tmp_path / "run"),
               "--corpus", str(corpus_file), *tiny("train.max_steps=null"), "--seconds", "600",
               "--out", str(tmp_path / "results")]  # fmt: skip
    # torch's compile cache is torch's, kept across runs by design (importing torch._dynamo, which the
    # Trainer does, makes it under TMPDIR): elsewhere, so the scratch holds only what bench made.
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TMPDIR": str(scratch),
           "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor")}  # fmt: skip
    with log.open("w") as stderr:  # a file, not a pipe nobody reads while the worker logs
        bench = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=stderr)
    children = Path(f"/proc/{bench.pid}/task/{bench.pid}/children")
    deadline = time.monotonic() + 240
    while not (workers := children.read_text().split()):
        assert bench.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.2)
    (worker,) = map(int, workers)
    # Into its training: the worker has made its own scratch folder beside bench's.
    while len(list(scratch.glob("kantai-bench-*"))) < 2:
        assert bench.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.2)
    time.sleep(1)
    bench.send_signal(signal.SIGTERM)
    try:
        assert bench.wait(timeout=60) == 128 + signal.SIGTERM, log.read_text()[-3000:]
        with pytest.raises(ProcessLookupError):  # stopped and reaped, not left training for 10 minutes
            os.kill(worker, 0)
    finally:
        with contextlib.suppress(ProcessLookupError):  # a failed run of this test leaves no orphan either
            os.kill(worker, signal.SIGKILL)
    assert not list(scratch.iterdir()), "bench's scratch folder is removed"
    assert not list(tmp_path.glob("results/*")), "no record of a bench that did not finish"


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="finds the worker in Linux's /proc")
def test_a_second_sigterm_while_bench_stops_its_worker_does_not_orphan_it(tmp_path: Path):
    ready = tmp_path / "ready"
    # A worker slow to stop: it ignores SIGTERM, so bench has to wait out its grace and then kill it.
    stubborn = (f"import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
                f"open({str(ready)!r}, 'w').close(); time.sleep(120)")  # fmt: skip
    driver = (f"import sys; from kantai_batch.bench import _run_worker; "
              f"sys.exit(_run_worker([sys.executable, '-c', {stubborn!r}], grace=4))")  # fmt: skip
    bench = subprocess.Popen([sys.executable, "-c", driver], env={**os.environ, "PYTHONPATH": str(ROOT)})
    deadline = time.monotonic() + 60
    while not ready.exists():
        assert bench.poll() is None and time.monotonic() < deadline
        time.sleep(0.1)
    (worker,) = map(int, Path(f"/proc/{bench.pid}/task/{bench.pid}/children").read_text().split())
    try:
        bench.send_signal(signal.SIGTERM)
        time.sleep(1)  # bench is now in the grace it gives the worker
        bench.send_signal(signal.SIGTERM)
        assert bench.wait(timeout=30) == 128 + signal.SIGTERM, "the second SIGTERM cut bench's stop short"
        with pytest.raises(ProcessLookupError):
            os.kill(worker, 0)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(worker, signal.SIGKILL)
        bench.kill()


@pytest.mark.slow
def test_with_seconds_run_mlm_fills_the_time_like_the_job(tmp_path: Path, corpus_file: Path):
    out = tmp_path / "results"
    invoke(
        "bench", "--run-dir", str(tmp_path / "run"), "--corpus", str(corpus_file), *tiny("train.max_steps=null"),
        "--seconds", "4", "--baseline", "run_mlm", "--out", str(out),
    )  # fmt: skip
    (record_file,) = out.glob("kantaibert-*.json")
    job, run_mlm = json.loads(record_file.read_text())["results"]
    for row in (job, run_mlm):
        assert row["train"]["max_seconds"] == 4 and row["train"]["epochs"] is None
        # run_mlm's own plan, 3 epochs of the tiny corpus, takes about 1 s here: the budget ended it, not its
        # epochs. A loaded machine moves the end either way, by more than a median step: a plan checked over
        # 10 steps it slowed ends the schedule early with no check left to undo it, and a last step it slowed
        # ends late (3.41 s and 4.77 s of 4 s on 2 loaded cores, with 0.03 s steps).
        assert row["stopped_by"] == "max_seconds", row["stopped_by"]
        assert 3 <= row["training_seconds"] <= 6


@pytest.mark.slow
def test_bench_a_causal_lm_against_run_clm(tmp_path: Path):
    out = tmp_path / "results"
    source = twcs_csv(tmp_path / "twcs.csv", support_conversations(200))
    result, record = _bench(
        out, "--job", SUPPORT_JOB, "--run-dir", str(tmp_path / "run"), "--corpus", str(source),
        *tiny(*SUPPORT_OVERRIDES), "--steps", "4", "--eval-every", "2", "--baseline", "run_clm",
        "--variant", "local:train.position_init=sinusoidal,train.attention_init=mimetic_local",
    )  # fmt: skip
    assert Path(record["path"]).name.startswith("customer-support-")
    job, run_clm, local = record["results"]
    assert (job["name"], run_clm["name"], local["name"]) == ("job", "run_clm", "local")
    _assert_runs_like_the_script(run_clm, job)
    assert local["train"]["attention_init"] == "mimetic_local"
    # run_clm's default learning rate (5e-5) learns nothing in 4 steps: its accuracy may well be 0.
    assert job["eval_next_token_accuracy_packed"] > 0
    for row in record["results"]:
        assert 0 <= row["eval_next_token_accuracy_packed"] < 1 and "eval_masked_accuracy_packed" not in row
        assert all(row[f"eval_loss_{cut}"] > 0 for cut in ("packed", "grouped", "lines"))
        assert [point["step"] for point in row["curve"]] == [2, 4]
        # What people read: the reply to the job's prompt, sampled with the job's seed.
        generated = row["quality"]["generate"]
        assert generated["prompt"] == "my package was supposed to arrive yesterday and it still has not shown up"
        assert generated["continuation"] and f"{row['name']}: generate {generated['prompt']!r}: " in result.stdout
    assert set(record["time_to_baseline_loss"]["grouped"]) == {"baseline_loss", "baseline_seconds", "job", "local"}
    assert "next-token acc" in result.stdout and "reached run_clm's final packed loss" in result.stdout


def test_a_causal_lm_is_scored_on_the_words_of_unmasked_text(tmp_path: Path, corpus_file: Path):
    run = RunDir.from_uri(str(prepared_run(tmp_path / "run", corpus_file, "task=clm")))
    tokenizer = AutoTokenizer.from_pretrained(run.tokenizer)
    text = run.eval_text.read_text()
    for task in ("mlm", "clm"):
        job = load_job(None, tiny(f"task={task}")[1::2])
        cuts = eval_cuts(job, tokenizer, run, 0.15, 42, job.data.block_size)
        assert set(cuts) == {"packed", "grouped", "lines"}
        for cut, samples in cuts.items():
            masks = sum(row.count(tokenizer.mask_token_id) for row in samples["input_ids"])
            if task == "mlm":
                assert masks > 0 and "labels" in samples.column_names, cut
            else:
                # Nothing masked; every word is a label, the special tokens (placed by the data format) are not.
                assert masks == 0, cut
                special = set(tokenizer.all_special_ids)
                for ids, labels in zip(samples["input_ids"], samples["labels"], strict=True):
                    assert labels == [-100 if token in special else token for token in ids], cut
                assert any(token in special for ids in samples["input_ids"] for token in ids), cut
                assert tokenizer.decode(samples["input_ids"][0], skip_special_tokens=True).split()[0] in text


@pytest.mark.parametrize(
    ("job", "baseline", "fits"),
    [(SUPPORT_JOB, "run_mlm", "run_clm"), (SUPPORT_JOB, "recipe", "run_clm"), (None, "run_clm", "recipe or run_mlm")],
)
def test_a_baseline_for_the_other_task_is_a_config_error(tmp_path: Path, job: str | None, baseline: str, fits: str):
    result = invoke(
        "bench", *(["--job", job] if job else []), "--run-dir", str(tmp_path / "run"), "--baseline", baseline, expect=2
    )
    assert f"--baseline {baseline} trains task" in result.stderr and f"use --baseline {fits}" in result.stderr
    assert not (tmp_path / "run").exists(), "nothing is prepared before the configurations are valid"


def test_bad_variant_is_a_config_error(tmp_path: Path, corpus_file: Path):
    result = invoke(
        "bench", "--run-dir", str(tmp_path / "run"), "--corpus", str(corpus_file),
        "--variant", "fast:train.learning_rte=1", expect=2,
    )  # fmt: skip
    assert "--variant fast: train.learning_rte: unknown key" in result.stderr
    assert not (tmp_path / "run").exists(), "nothing is prepared before the configurations are valid"
    # What is prepared once, or scores every configuration, would be silently the job's in a variant.
    for variant, message in (
        ("tok:tokenizer.vocab_size=500", "--variant tok: tokenizer.vocab_size is the same for every configuration"),
        ("c:task=clm", "--variant c: task is the same for every configuration"),
        ("src:corpus.source=elsewhere.txt", "--variant src: corpus.source is the same"),
        ("m:eval.seed=3", "--variant m: eval.seed is the same"),
        ("baseline_seconds:train.seed=1", "with a NAME other than job, the baselines and baseline_loss"),
        ("short:model.max_position_embeddings=66,data.block_size=64", "cannot read the held-out blocks of 128"),
    ):
        refused = invoke("bench", "--run-dir", str(tmp_path / "run"), "--variant", variant, expect=2)
        assert message in refused.stderr and len(refused.stderr.strip().splitlines()) == 1, refused.stderr
    assert not (tmp_path / "run").exists()


def test_a_malformed_probe_file_fails_before_any_training(tmp_path: Path, corpus_file: Path):
    probes = tmp_path / "probes.txt"
    probes.write_text("a probe without its mask -> reason\n")
    result = invoke(
        "bench", "--run-dir", str(tmp_path / "run"), "--corpus", str(corpus_file), *tiny(f"eval.probes={probes}"),
        expect=3,
    )  # fmt: skip
    assert str(probes) in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists(), "nothing is prepared before the probe file is read"


def test_bench_reads_probes_by_the_jobs_mask_token_and_checks_named_files_first(tmp_path: Path, corpus_file: Path):
    """The probe file was read for `<mask>` whatever the job's mask token: a valid `[MASK]` file was refused."""
    probes = tmp_path / "probes.txt"
    probes.write_text("Reason determines [MASK] cognition. -> our\n")
    tokens = "tokenizer.special_tokens=['<s>', '<pad>', '</s>', '<unk>', '[MASK]']"
    missing = tmp_path / "zero2.json"
    result = invoke(
        "bench", "--run-dir", str(tmp_path / "run"), "--corpus", str(corpus_file),
        *tiny(f"eval.probes={probes}", tokens, "infer.fill_mask_text=Human thinking involves human [MASK].",
              f"train.deepspeed={missing}"), expect=2,
    )  # fmt: skip
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"kantai-batch: error: train.deepspeed {missing} does not exist"), last
    assert not (tmp_path / "run").exists(), "nothing is prepared before the job's files are read"


def test_bench_of_an_s3_run_dir_is_not_held_to_the_lease_its_worker_never_takes(tmp_path: Path, monkeypatch):
    """`run`'s check that the lease term fits train.collective_timeout_s refused a bench, whose single
    worker process holds no lease."""
    from kantai_batch import bench
    from kantai_batch.job import load_job
    from kantai_batch.rundir import RunDir

    class Reached(Exception):
        pass

    def prepared(job, run):
        raise Reached

    monkeypatch.setenv("KANTAI_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("KANTAI_LEASE_S", "120")
    monkeypatch.setattr(bench, "_prepare_inputs", prepared)
    job = load_job(None, ["train.collective_timeout_s=200"], corpus=str(tmp_path / "unused.txt"))
    with pytest.raises(Reached):
        bench.bench(job, RunDir.from_uri("s3://kantai/runs/bench"), steps=1, seconds=None, baseline=None,
                    out_dir=tmp_path / "out")  # fmt: skip


@pytest.mark.slow
def test_bench_retrains_a_tokenizer_whose_settings_changed(tmp_path: Path, corpus_file: Path):
    run_dir, out = tmp_path / "run", tmp_path / "results"
    common = ("bench", "--run-dir", str(run_dir), "--corpus", str(corpus_file), "--steps", "2", "--out", str(out))

    def bench(*overrides: str) -> dict:
        invoke(*common, *tiny(*overrides))
        (path,) = out.glob("*.json")
        record = json.loads(path.read_text())
        path.unlink()
        return record

    first = bench()
    second = bench("tokenizer.vocab_size=300")
    tokenizer = AutoTokenizer.from_pretrained(run_dir / "tokenizer")
    # The model's vocabulary is the tokenizer's, rounded up for tensor cores.
    assert len(tokenizer) <= 300 and second["results"][0]["vocab_size"] < first["results"][0]["vocab_size"]
    # The record names what its held-out losses were scored on: the same text, another tokenizer.
    assert first["held_out"]["text_sha256"] == file_sha256(run_dir / "corpus" / "eval.txt")
    assert first["held_out"]["text_sha256"] == second["held_out"]["text_sha256"]
    assert first["held_out"]["tokenizer_sha256"] != second["held_out"]["tokenizer_sha256"]
    # Another training seed is scored on the same held-out tokens and masks; another eval.seed is not.
    reseeded = bench("tokenizer.vocab_size=300", "train.seed=7")
    assert reseeded["held_out"] == second["held_out"] and reseeded["results"][0]["seed"] == 7
    resplit = bench("tokenizer.vocab_size=300", "eval.seed=7")
    assert resplit["held_out"]["text_sha256"] != second["held_out"]["text_sha256"]
