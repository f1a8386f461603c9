from __future__ import annotations

import itertools
import json
import logging
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import mlflow
import pytest
from transformers import RobertaForMaskedLM, pipeline

from helpers import ROOT, SUPPORT_JOB, SUPPORT_OVERRIDES, invoke, mlflow_server_process, prepared_run, stop_group, tiny
from kantai_batch.manifest import MARKER
from kantai_batch.phases import phase as phase_row

pytestmark = pytest.mark.slow


def _summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "model" / "train_summary.json").read_text())


@pytest.mark.floors
def test_run_commits_every_phase(trained_run: Path):
    for phase in ("corpus", "tokenizer", "model", "eval"):
        assert (trained_run / phase / MARKER).is_file(), phase
    assert not list(trained_run.glob(".*partial*")), "no scratch folders are left behind"


@pytest.mark.floors
def test_summary_reports_the_training(trained_run: Path):
    summary = _summary(trained_run)
    assert summary["global_step"] == 40
    assert summary["resumed_from_step"] == 0
    assert summary["world_size"] == 1
    assert summary["real_tokens_trained"] == 40 * 8 * 32, "packed blocks have no padding"
    assert 0 < summary["real_tokens_per_second"] < summary["real_tokens_trained"] / 0.01
    assert 0 < summary["train_loss"] < 10 and 0 < summary["eval_loss"] < 10
    assert summary["train_runtime_s"] > 0


def test_the_attention_kernel_trains_but_is_not_saved_with_the_model(trained_run: Path):
    from kantai_batch.hardware import resolve_attention

    summary = _summary(trained_run)
    assert summary["attention"] == resolve_attention("auto", summary["precision"])
    # A model trained with eager attention on a CPU must not force eager on whoever loads it on a GPU.
    config = (trained_run / "model" / "config.json").read_text()
    assert "attn_implementation" not in config
    assert RobertaForMaskedLM.from_pretrained(trained_run / "model").config._attn_implementation == "sdpa"


@pytest.mark.floors
def test_model_loads_in_the_stock_fill_mask_pipeline(trained_run: Path):
    model_dir = trained_run / "model"
    assert (model_dir / "model.safetensors").is_file()
    fill = pipeline("fill-mask", model=str(model_dir))
    assert isinstance(fill.model, RobertaForMaskedLM)
    predictions = fill("Human thinking involves human <mask>.", top_k=3)
    assert len(predictions) == 3 and all(p["sequence"].startswith("Human thinking involves human") for p in predictions)


def test_run_ends_with_the_fill_mask_predictions(trained_run: Path):
    stdout = (trained_run.parent / "run_stdout.txt").read_text()
    assert stdout.startswith("Human thinking involves human <mask>.\n")
    assert stdout.count("Human thinking involves human") == 6, "the text, then top 5"


def test_tiny_model_learns_the_corpus(trained_run: Path):
    # 40 steps at lr 1e-3 on a corpus of a few repeated phrases: far below an untrained model's
    # ln(448) = 6.1 (vocab auto: 424 tokens rounded up to 448) and the uniform guess ln(424) = 6.05.
    assert _summary(trained_run)["eval_loss"] < 5.5


def test_checkpoints_are_marked_and_limited(trained_run: Path):
    checkpoints = sorted(p.name for p in (trained_run / "checkpoints").glob("checkpoint-*"))
    assert checkpoints == ["checkpoint-30", "checkpoint-40"], "save_total_limit keeps two"
    assert all((trained_run / "checkpoints" / name / MARKER).is_file() for name in checkpoints)


@pytest.mark.floors
def test_mlflow_has_params_loss_curve_eval_metrics_and_model(trained_run: Path):
    run_id = _summary(trained_run)["mlflow_run_id"]
    client = mlflow.MlflowClient()
    run = client.get_run(run_id)
    assert run.data.params["job.model.hidden_size"] == "64"
    losses = client.get_metric_history(run_id, "loss")
    assert [m.step for m in losses] == list(range(5, 41, 5))
    assert "eval_loss" in run.data.metrics
    artifacts = {a.path for a in client.list_artifacts(run_id, "model")}
    assert {"model/config.json", "model/model.safetensors", "model/train_summary.json"} <= artifacts


def test_a_resumed_run_logs_each_step_once_and_no_param_again_also_told_to_go_on(tmp_path: Path, corpus_file: Path):
    """Resumed from checkpoint-20 after the run had logged through step 30: steps 21-30 are trained again,
    and MLflow holds one value per step, not two curves; the continued run's params (output_dir among
    them, spelled otherwise here) are not logged again, which MLflow refuses as a change."""
    run_dir = prepared_run(tmp_path / "run", corpus_file)
    job = tiny("train.max_steps=30", "train.save_steps=10", "train.logging_steps=5", "train.save_total_limit=5")
    invoke("pretrain", "--run-dir", str(run_dir), *job)
    run_id = _summary(run_dir)["mlflow_run_id"]
    shutil.rmtree(run_dir / "model")
    shutil.rmtree(run_dir / "checkpoints" / "checkpoint-30")
    result = invoke("pretrain", "--run-dir", str(tmp_path / ".." / tmp_path.name / "run"), *job)
    assert _summary(run_dir)["resumed_from_step"] == 20 and _summary(run_dir)["mlflow_run_id"] == run_id
    assert "Changing param values is not allowed" not in result.stderr
    client = mlflow.MlflowClient()
    logged = list(range(5, 31, 5))
    for series, steps in (("loss", logged), ("learning_rate", logged), ("eval_loss", [30])):
        assert sorted(m.step for m in client.get_metric_history(run_id, series)) == steps, series
    assert client.get_run(run_id).info.status == "FINISHED"
    # Told to go on for longer: the same training (its checkpoints' lineage), so the same run and curve,
    # with job.yaml the job it trains by now.
    longer = [arg.replace("train.max_steps=30", "train.max_steps=40") for arg in job]
    invoke("pretrain", "--run-dir", str(run_dir), *longer)
    assert (_summary(run_dir)["resumed_from_step"], _summary(run_dir)["mlflow_run_id"]) == (30, run_id)
    assert sorted(m.step for m in client.get_metric_history(run_id, "loss")) == list(range(5, 41, 5))
    assert "max_steps: 40" in mlflow.artifacts.load_text(f"runs:/{run_id}/job.yaml")
    params, tags = client.get_run(run_id).data.params, client.get_run(run_id).data.tags
    assert params["job.train.max_steps"] == "30", "the first session's, which MLflow keeps"
    assert {k: v for k, v in tags.items() if k.startswith("kantai.now.")} == {"kantai.now.job.train.max_steps": "40"}


def test_a_param_a_later_session_changed_back_loses_its_now_tag(tmp_path: Path):
    from kantai_batch.tracking import _tag_changed_params

    mlflow.set_experiment("now-tags")
    sources = [f"s3://corpora/kant/book-{i:04d}.txt" for i in range(400)]  # a param MLflow keeps the head of
    with mlflow.start_run() as first:
        mlflow.log_params({"job.train.max_steps": 30, "job.train.seed": 1, "job.corpus.source": sources})
    for session, expected in (
        ({"job.train.max_steps": 40, "job.train.seed": 1}, {"kantai.now.job.train.max_steps": "40"}),
        ({"job.train.max_steps": 30, "job.train.seed": 2}, {"kantai.now.job.train.seed": "2"}),
    ):
        session["job.corpus.source"] = sources
        with mlflow.start_run(run_id=first.info.run_id) as active:
            _tag_changed_params(active, session)
        tags = mlflow.MlflowClient().get_run(first.info.run_id).data.tags
        assert {k: v for k, v in tags.items() if k.startswith("kantai.now.")} == expected


def test_a_resumed_training_saves_and_logs_at_the_intervals_its_job_gives_now(tmp_path: Path, corpus_file: Path):
    """The Trainer restores the checkpoint's intervals with its state: a resumed training given a shorter
    train.save_steps saved nothing until its end, only warning that the values differed."""
    run_dir = prepared_run(tmp_path / "run", corpus_file)
    first = ("train.max_steps=4", "train.save_steps=4", "train.logging_steps=4", "train.save_total_limit=10")
    invoke("pretrain", "--run-dir", str(run_dir), "--no-tracking", *tiny(*first))
    longer = ("train.max_steps=10", "train.save_steps=2", "train.logging_steps=2", "train.save_total_limit=10")
    invoke("pretrain", "--run-dir", str(run_dir), "--no-tracking", *tiny(*longer))
    assert _summary(run_dir)["resumed_from_step"] == 4
    saved = sorted(int(p.name.split("-")[1]) for p in (run_dir / "checkpoints").glob("checkpoint-*"))
    assert saved == [4, 6, 8, 10]
    state = json.loads((run_dir / "checkpoints" / "checkpoint-10" / "trainer_state.json").read_text())
    assert [entry["step"] for entry in state["log_history"] if "loss" in entry] == [4, 6, 8, 10]


def test_rerun_skips_complete_phases(trained_run: Path, corpus_file: Path):
    before = {p: p.stat().st_mtime_ns for p in trained_run.rglob("*") if p.is_file()}
    result = invoke("run", "--run-dir", str(trained_run), "--corpus", str(corpus_file), *tiny())
    assert result.stdout.startswith("Human thinking involves human <mask>.")
    after = {p: p.stat().st_mtime_ns for p in trained_run.rglob("*") if p.is_file()}
    assert after == before


@pytest.mark.floors
def test_evaluate_reproduces_the_training_eval_and_writes_metrics(trained_run: Path):
    result = invoke("evaluate", "--run-dir", str(trained_run), "--json", *tiny())
    metrics = json.loads(result.stdout)
    assert metrics["eval_loss"] == pytest.approx(_summary(trained_run)["eval_loss"], rel=1e-5)
    assert metrics["perplexity"] == pytest.approx(2.718281828 ** metrics["eval_loss"], rel=1e-6)
    assert 0 <= metrics["masked_accuracy"] <= 1 and metrics["scored_tokens"] > 100
    assert json.loads((trained_run / "eval" / "metrics.json").read_text())["eval_loss"] == metrics["eval_loss"]
    assert metrics["attention"] == _summary(trained_run)["attention"], "scored with the kernel it trained with"


@pytest.mark.parametrize("fixture", ["trained_run", "support_run"])
def test_the_eval_loss_is_averaged_over_tokens_whatever_the_batch_size(fixture: str, request, tmp_path: Path):
    """Held-out lines score unequal counts of tokens: one batch of all of them is the mean over tokens, and
    batches of one must give the same, not a mean of per-line means."""
    run_dir = request.getfixturevalue(fixture)
    job = ("--job", SUPPORT_JOB) if fixture == "support_run" else ()
    overrides = (*(SUPPORT_OVERRIDES if fixture == "support_run" else ()), "data.mode=line_by_line")
    lines = [line.split() for line in (run_dir / "corpus" / "eval.txt").read_text().splitlines() if line.strip()]
    text = tmp_path / "lines.txt"  # 3 to 17 words a line: shorter than a block, each its own length
    text.write_text("\n".join(" ".join(words[: 3 + number % 15]) for number, words in enumerate(lines)) + "\n")
    losses = []
    for batch in (1, 4096):
        args = ("evaluate", *job, "--run-dir", str(tmp_path / "run"), "--model", str(run_dir / "model"))
        args += ("--corpus", str(text), "--json")
        result = invoke(*args, *tiny(*overrides, f"train.per_device_batch_size={batch}"))
        losses.append(json.loads(result.stdout)["eval_loss"])
    assert losses[0] == pytest.approx(losses[1], rel=1e-6)


def test_evaluate_runs_the_jobs_attention_kernel(trained_run: Path, tmp_path: Path):
    # The saved model carries no kernel, so without train.attention evaluate would get torch's default.
    losses = {}
    for kernel in ("eager", "sdpa"):
        result = invoke(
            "evaluate",
            "--run-dir", str(tmp_path / kernel),
            "--model", str(trained_run / "model"),
            "--corpus", str(trained_run / "corpus" / "eval.txt"),
            "--json",
            *tiny(f"train.attention={kernel}"),
        )  # fmt: skip
        metrics = json.loads(result.stdout)
        assert metrics["attention"] == kernel
        losses[kernel] = metrics["eval_loss"]
    # The same arithmetic on the same masks: the kernel changes the time, not the score.
    assert losses["eager"] == pytest.approx(losses["sdpa"], rel=1e-2)


def test_evaluate_on_a_raw_corpus(trained_run: Path, tmp_path: Path):
    text = tmp_path / "other.txt"
    text.write_bytes(
        ("Reason determines every object \u2014 \u201cspace and time\u201d.\r\n\r\n" * 60).encode("cp1252")
    )
    result = invoke(
        "evaluate",
        "--run-dir",
        str(tmp_path / "run"),
        "--model",
        str(trained_run / "model"),
        "--corpus",
        str(text),
        "--json",
        *tiny(),
    )
    metrics = json.loads(result.stdout)
    assert metrics["corpus"] == str(text) and metrics["samples"] > 0


def test_fill_mask_json(trained_run: Path):
    result = invoke(
        "fill-mask", "--model", str(trained_run / "model"), "--top-k", "4", "--json", "Reason <mask> space."
    )
    candidates = json.loads(result.stdout)
    assert len(candidates) == 4
    assert set(candidates[0]) == {"token_str", "score", "sequence"}
    assert candidates == sorted(candidates, key=lambda c: -c["score"])


def test_fill_mask_of_an_empty_text_is_refused_not_replaced_by_the_jobs(trained_run: Path):
    result = invoke("fill-mask", "--model", str(trained_run / "model"), "", expect=3)
    assert result.stderr.strip().splitlines()[-1] == "kantai-batch: error: text '' has no <mask> token to fill"


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["fill-mask", "Human thinking involves human reason."], 3, "has no <mask> token"),
        (["fill-mask", "--model", "{tmp}", "A <mask>."], 3, "is not a model folder (no config.json)"),
        (["fill-mask", "--model", "{tmp}/nope", "A <mask>."], 3, "does not exist"),
        (["fill-mask", "--model", "{tmp}/file.txt", "A <mask>."], 3, "file.txt is a file, not a model folder"),
        (["evaluate", "--model", "{tmp}"], 3, "is not a model folder"),
        (["evaluate", "--run-dir", "{tmp}"], 3, "takes at most 64 tokens; data.block_size is 128"),
        (["fill-mask", "--top-k", "5000", "A <mask>."], 3, "top-k 5000 is more than model"),
        (["fill-mask", "A <mask>." + " reason" * 70], 3, "tokens; model"),
    ],
)
def test_model_errors_are_one_line(trained_run: Path, tmp_path: Path, args: list[str], code: int, message: str):
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    (tmp_path / "file.txt").write_text("not a model")
    if "--model" not in args:
        args = [args[0], "--model", str(trained_run / "model"), *args[1:]]
    result = invoke(*args, expect=code)
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_a_model_folder_without_its_tokenizer_is_refused(trained_run: Path, tmp_path: Path):
    weights = tmp_path / "weights-only"
    shutil.copytree(trained_run / "model", weights)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json"):
        (weights / name).unlink(missing_ok=True)
    metrics = (trained_run / "eval" / "metrics.json").read_bytes()
    for args in (["fill-mask", "--model", str(weights), "A <mask>."], ["evaluate", "--run-dir", str(trained_run),
                 "--model", str(weights), *tiny()]):  # fmt: skip
        result = invoke(*args, expect=3)
        assert (
            result.stderr.strip()
            == f"kantai-batch: error: model {weights} has no tokenizer (tokenizer.json, or vocab.json with merges.txt)"
        )
    assert (trained_run / "eval" / "metrics.json").read_bytes() == metrics


def test_a_quality_text_longer_than_the_model_fails_before_the_evaluation(trained_run: Path, tmp_path: Path):
    probes = tmp_path / "probes.txt"
    probes.write_text("Reason <mask> the conditions. -> unites\n" + "Reason" + " and reason" * 70 + " <mask>. -> is\n")
    metrics = (trained_run / "eval" / "metrics.json").read_bytes()
    long_text = "infer.fill_mask_text=" + "Reason" + " and reason" * 70 + " <mask>."
    for override, where in (
        (f"eval.probes={probes}", f"probe file {probes}, line 2"),
        (long_text, "infer.fill_mask_text"),
    ):
        result = invoke("evaluate", "--run-dir", str(trained_run), *tiny(override), expect=3)
        message = result.stderr.strip()
        assert len(message.splitlines()) == 1 and message.startswith(f"kantai-batch: error: {where}: the text is ")
        assert message.endswith("tokens; the model reads at most 64")
    assert (trained_run / "eval" / "metrics.json").read_bytes() == metrics


def test_inspect_a_saved_model(trained_run: Path):
    result = invoke("inspect", "--model", str(trained_run / "model"), "--json")
    table = json.loads(result.stdout)
    assert table["parameters"] == _summary(trained_run)["parameters"]


def test_pretrain_needs_tokenizer(tmp_path: Path, corpus_file: Path):
    invoke("prepare", "--run-dir", str(tmp_path), "--corpus", str(corpus_file))
    result = invoke("pretrain", "--run-dir", str(tmp_path), *tiny(), expect=3)
    assert "run `kantai-batch train-tokenizer` first" in result.stderr


def test_model_vocab_smaller_than_tokenizer_is_a_config_error(tmp_path: Path, corpus_file: Path):
    prepared_run(tmp_path, corpus_file)
    result = invoke("pretrain", "--run-dir", str(tmp_path), "--no-tracking", *tiny("model.vocab_size=300"), expect=2)
    assert "model.vocab_size 300 is smaller than the tokenizer's" in result.stderr


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "kantai_batch", "--log-level", "warning", *args]


def test_killed_pretrain_resumes_from_the_newest_complete_checkpoint(tmp_path: Path, corpus_file: Path):
    run_dir = tmp_path / "run"
    job = tiny("train.max_steps=400", "train.save_steps=10", "train.save_total_limit=3", "train.logging_steps=10")
    prepared_run(run_dir, corpus_file)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        _cli("pretrain", "--run-dir", str(run_dir), *job),
        env=env,
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    checkpoints = run_dir / "checkpoints"
    deadline = time.monotonic() + 240
    while not (checkpoints / "checkpoint-20" / MARKER).exists():
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.monotonic() < deadline, "no checkpoint within 240 s"
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (run_dir / "model").exists()
    # What a kill in the middle of a save leaves: a newer checkpoint folder without its marker.
    partial = checkpoints / "checkpoint-900"
    partial.mkdir()
    (partial / "model.safetensors").write_bytes(b"half written")
    newest = max(int(p.name.split("-")[1]) for p in checkpoints.glob("checkpoint-*") if (p / MARKER).exists())
    tokens_at = lambda step: json.loads((checkpoints / f"checkpoint-{step}" / "trainer_state.json").read_text())[  # noqa: E731
        "num_input_tokens_seen"
    ]
    tokens_before = tokens_at(newest)

    invoke("pretrain", "--run-dir", str(run_dir), *job)
    summary = _summary(run_dir)
    assert summary["resumed_from_step"] == newest >= 20
    assert summary["global_step"] == 400
    assert summary["real_tokens_trained"] == tokens_at(400) - tokens_before > 0, "only this session's tokens count"
    assert not partial.exists()

    # The same MLflow run continues: its loss history spans both sessions without a restart at step 0.
    client = mlflow.MlflowClient()
    steps = [m.step for m in client.get_metric_history(summary["mlflow_run_id"], "loss")]
    assert steps[0] == 10 and steps[-1] == 400
    assert set(steps) == set(range(10, 401, 10))


def test_checkpoints_of_another_model_are_not_resumed(tmp_path: Path, corpus_file: Path, caplog):
    """A checkpoint's lineage leaves the model section out: another dropout resumed the old training and
    re-committed its weights under the new config, and another architecture failed, where any other
    changed setting starts over."""
    run_dir = prepared_run(tmp_path / "run", corpus_file)
    steps = ("train.max_steps=10", "train.save_steps=10")
    invoke("pretrain", "--run-dir", str(run_dir), "--no-tracking", *tiny(*steps))
    weights = run_dir / "model" / "model.safetensors"
    before = weights.read_bytes()
    for change, seen in (
        ("model.hidden_dropout_prob=0.1", "hidden_dropout_prob 0.0 -> 0.1"),
        ("model.num_hidden_layers=3", "num_hidden_layers 2 -> 3"),
    ):
        with caplog.at_level(logging.INFO, logger="kantai_batch"):
            dropout = "model.hidden_dropout_prob=0.1"
            invoke("pretrain", "--run-dir", str(run_dir), "--no-tracking", *tiny(*steps, dropout, change))
        assert seen in caplog.text
        assert _summary(run_dir)["resumed_from_step"] == 0
        assert weights.read_bytes() != before, "trained again, not the old weights re-committed"
        assert json.loads((run_dir / "model" / "config.json").read_text())["hidden_dropout_prob"] == 0.1
        before = weights.read_bytes()

    # Unfinished trainings of two models of one lineage, set aside in turn, each keep their own folder: in
    # one, a step of the second replaced the first's.
    for dropout in ("0.2", "0.1", "0.2"):
        shutil.rmtree(run_dir / "model")  # stopped after its last checkpoint, before the commit
        invoke(
            "pretrain",
            "--run-dir",
            str(run_dir),
            "--no-tracking",
            *tiny(*steps, f"model.hidden_dropout_prob={dropout}", "model.num_hidden_layers=3"),
        )
    aside = sorted(p.name for p in (run_dir / "checkpoints").glob("other-training-*"))
    assert len(aside) == 2 and all("-model-" in name for name in aside), aside
    configs = [
        json.loads((run_dir / "checkpoints" / name / "checkpoint-10" / "config.json").read_text()) for name in aside
    ]
    assert sorted(config["hidden_dropout_prob"] for config in configs) == [0.1, 0.2]


def test_the_same_corpus_under_another_path_redoes_only_prepare(
    trained_run: Path, tmp_path: Path, corpus_file: Path, caplog
):
    """stats.json names the path the corpus was read from: counted as the corpus, the same text under
    another name redid the tokenizer, the tokens and the whole training."""
    run_dir = tmp_path / "run"
    shutil.copytree(trained_run, run_dir)
    renamed = tmp_path / "elsewhere.txt"
    shutil.copyfile(corpus_file, renamed)
    with caplog.at_level(logging.INFO, logger="kantai_batch"):
        invoke("run", "--run-dir", str(run_dir), "--corpus", str(renamed), *tiny())
    assert "prepare: " in caplog.text and "redoing it" in caplog.text.split("train-tokenizer:")[0]
    for later in ("train-tokenizer", "tokenize", "pretrain", "evaluate"):
        folder = run_dir / phase_row(later).output
        assert f"{later}: {folder} is complete and its inputs are unchanged, skipped" in caplog.text
    assert json.loads((run_dir / "corpus" / "stats.json").read_text())["source"] == str(renamed)


@pytest.mark.parametrize("unread", [(), ("train.decay_ratio=0.5",)])
def test_run_dirs_recorded_before_2026_12_07_are_neither_redone_nor_restarted(
    tmp_path: Path, corpus_file: Path, monkeypatch: pytest.MonkeyPatch, caplog, unread: tuple[str, ...]
):
    """Until then the corpus's identity counted stats.json and every job field counted, those its other
    settings leave unread (here a decay share under a linear schedule) included."""
    from kantai_batch import data, fingerprint

    counted = fingerprint.identity
    run_dir = tmp_path / "run"
    job = tiny(*unread, "train.max_steps=10", "train.save_steps=5")
    with monkeypatch.context() as before:  # the fingerprints, lineages and tokens.json as recorded then
        legacy = lambda output, marker, legacy=False: counted(output, marker, legacy=True)  # noqa: E731
        before.setattr(fingerprint, "identity", legacy)
        before.setattr(data, "identity", legacy)
        before.setattr(fingerprint, "in_effect", lambda job, **_: job)
        invoke("run", "--run-dir", str(run_dir), "--corpus", str(corpus_file), *job)
    with caplog.at_level(logging.INFO, logger="kantai_batch"):
        invoke("run", "--run-dir", str(run_dir), "--corpus", str(corpus_file), *job)
    assert "redoing it" not in caplog.text and caplog.text.count("inputs are unchanged, skipped") == 5
    # Their samples are still the corpus's, for the phases run one by one (a Kubernetes Job each).
    invoke("evaluate", "--run-dir", str(run_dir), *job)
    # A training begun then and stopped before its commit resumes its checkpoints, not starts over.
    shutil.rmtree(run_dir / "model")
    invoke("pretrain", "--run-dir", str(run_dir), *job)
    assert _summary(run_dir)["resumed_from_step"] == 10
    assert not list((run_dir / "checkpoints").glob("other-training-*"))


def test_corrupt_weights_are_a_one_line_error(trained_run: Path, tmp_path: Path):
    import shutil

    broken = tmp_path / "model"
    shutil.copytree(trained_run / "model", broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    result = invoke("fill-mask", "--model", str(broken), "A <mask>.", expect=3)
    assert f"model {broken} cannot be loaded" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize(
    ("change", "says"),
    [
        ({"num_hidden_layers": 3}, "the weights file lacks roberta.encoder.layer.2."),
        ({"num_hidden_layers": 1}, "the weights file holds tensors config.json has no place for: roberta.encoder"),
        ({"vocab_size": 320}, "lm_head.bias is [{vocab}] in the weights but [320] by config.json (2 tensors differ)"),
    ],
    ids=["missing", "unexpected", "mismatched"],
)  # fmt: skip
def test_weights_that_do_not_match_the_config_are_a_one_line_error(
    trained_run: Path, tmp_path: Path, change: dict, says: str
):
    """transformers started the tensors the weights lacked at random, logged a table and the command
    answered from noise with exit 0; a mismatched shape was an error pointing at that table."""
    broken = tmp_path / "model"
    shutil.copytree(trained_run / "model", broken)
    config = json.loads((broken / "config.json").read_text())
    (broken / "config.json").write_text(json.dumps({**config, **change}))
    metrics = (trained_run / "eval" / "metrics.json").read_bytes()
    for args in (["fill-mask", "--model", str(broken), "A <mask>."],
                 ["evaluate", "--run-dir", str(trained_run), "--model", str(broken), *tiny()]):  # fmt: skip
        result = invoke(*args, expect=3)
        error = result.stderr.strip().splitlines()[-1]
        assert error.startswith(f"kantai-batch: error: model {broken}: {says.format(vocab=config['vocab_size'])}")
    assert (trained_run / "eval" / "metrics.json").read_bytes() == metrics


def test_fill_mask_with_two_masks_gives_a_list_per_mask(trained_run: Path):
    result = invoke(
        "fill-mask", "--model", str(trained_run / "model"), "--top-k", "2", "--json", "<mask> reason <mask>."
    )
    per_mask = json.loads(result.stdout)
    assert [len(candidates) for candidates in per_mask] == [2, 2]


def test_a_tracking_server_gone_during_training_costs_warnings_not_the_training(tmp_path: Path, corpus_file: Path):
    """The server stops late in training: training goes on, the model is committed, the phase
    ends 0 once MLflow's retries of the queued metrics are over (not after its retries of every file of
    the model and of the run's end, then a traceback and exit 1), with one-line warnings for what could
    not be logged."""
    run_dir = prepared_run(tmp_path / "run", corpus_file)
    job = tiny("train.max_steps=60", "train.save_steps=10", "train.logging_steps=5")
    (tmp_path / "server").mkdir()
    with mlflow_server_process(tmp_path / "server", f"file://{tmp_path / 'artifacts'}") as (url, server):
        env = {**os.environ, "PYTHONPATH": str(ROOT), "MLFLOW_TRACKING_URI": url}
        # MLflow's own patience (7 retries, about 4 minutes) is what metrics queued in the outage wait out
        # at the end: shortened here, as a user may.
        env.update(MLFLOW_HTTP_REQUEST_MAX_RETRIES="2", MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR="1")
        proc = subprocess.Popen(_cli("pretrain", "--run-dir", str(run_dir), *job), env=env, cwd=tmp_path,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)  # fmt: skip
        deadline = time.monotonic() + 240
        # Late, so the training left after the kill is a few steps: the time it takes grows with the machine's load.
        while not (run_dir / "checkpoints" / "checkpoint-50" / MARKER).exists():
            assert proc.poll() is None, proc.stderr.read()
            assert time.monotonic() < deadline, "no checkpoint within 240 s"
            time.sleep(0.2)
        stop_group(server, signal.SIGKILL)
        killed = time.monotonic()
        _, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stderr[-3000:]
    summary = _summary(run_dir)
    assert summary["global_step"] == 60 and summary["mlflow_run_id"]
    assert time.monotonic() - killed < 60, "the finished phase waited on the gone server"
    assert "Traceback" not in stderr and "Retrying" not in stderr.split("is not logged to run")[-1]
    assert "is not logged to run" in stderr and "could not be marked FINISHED" in stderr, stderr[-3000:]


def test_unreachable_tracking_store_is_one_line(tmp_path: Path, corpus_file: Path, monkeypatch: pytest.MonkeyPatch):
    prepared_run(tmp_path, corpus_file)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    result = invoke("pretrain", "--run-dir", str(tmp_path), *tiny(), expect=4)
    assert "MLflow tracking store http://127.0.0.1:9" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "model").exists()


def test_a_run_the_store_cannot_return_for_a_moment_is_not_taken_for_a_missing_one(tmp_path: Path, monkeypatch):
    """Any failure to read the recorded run counted as "not in this store": a resumed training that met a
    tracking server blinking started a second MLflow run, splitting its loss curve in two."""
    from mlflow.exceptions import MlflowException

    from kantai_batch.tracking import run_exists

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    try:
        mlflow.set_experiment("runs")
        with mlflow.start_run() as held:
            pass
        assert run_exists(held.info.run_id)
        assert not run_exists("0123456789abcdef0123456789abcdef"), "another store's run"

        def blinking(run_id: str):
            raise MlflowException("API request failed: 503", error_code="TEMPORARILY_UNAVAILABLE")

        monkeypatch.setattr(mlflow, "get_run", blinking)
        with pytest.raises(MlflowException, match="503"):
            run_exists(held.info.run_id)
    finally:
        mlflow.set_tracking_uri(None)


def test_a_training_killed_before_it_pruned_its_last_checkpoints_prunes_them_when_rerun(
    tmp_path: Path, corpus_file: Path
):
    """Killed between sealing its last checkpoint and pruning the older ones, a training kept one too
    many for good: the rerun found it trained out, saved nothing more, and so pruned nothing."""
    run_dir = prepared_run(tmp_path / "run", corpus_file)
    steps = ("train.max_steps=10", "train.save_steps=5")
    invoke("pretrain", "--run-dir", str(run_dir), "--no-tracking", *tiny(*steps, "train.save_total_limit=2"))
    shutil.rmtree(run_dir / "model")  # as if killed after checkpoint-10 was sealed, before the prune and commit
    invoke("pretrain", "--run-dir", str(run_dir), "--no-tracking", *tiny(*steps, "train.save_total_limit=1"))
    assert _summary(run_dir)["resumed_from_step"] == 10
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("checkpoint-*")) == ["checkpoint-10"]


def test_a_checkpoint_removal_cut_short_leaves_no_checkpoint_marked_complete(tmp_path: Path, monkeypatch):
    """The folder was deleted in whatever order rmtree took: a pod killed inside it left a checkpoint
    whose _COMPLETE still listed files that were gone."""
    from kantai_batch.rundir import RunDir

    run = RunDir(tmp_path / "run")
    for step in (5, 10):
        (run.checkpoint(step)).mkdir(parents=True)
        (run.checkpoint(step) / "model.safetensors").write_bytes(b"weights")
        run.seal_checkpoint(step)

    def killed(path, *args, **kwargs):
        raise KeyboardInterrupt  # the pod killed before the first file went

    monkeypatch.setattr(shutil, "rmtree", killed)
    with pytest.raises(KeyboardInterrupt):
        run.prune_checkpoints(1)
    assert not (run.checkpoint(5) / MARKER).exists(), "the marker goes first"
    assert (run.checkpoint(10) / MARKER).exists()


def test_an_unfinished_trainings_checkpoints_are_set_aside_not_deleted(tmp_path: Path, corpus_file: Path, caplog):
    """Started again with a setting changed by mistake (or after a divergence), a training that never
    committed its model keeps its checkpoints: they may be hours of work, and its job resumes them."""
    run_dir = prepared_run(tmp_path / "run", corpus_file)
    first = tiny("train.max_steps=20", "train.save_steps=10")
    invoke("pretrain", "--run-dir", str(run_dir), "--no-tracking", *first)
    shutil.rmtree(run_dir / "model")  # as if stopped after its last checkpoint, before the commit
    kept = {p.name: (p / MARKER).read_text() for p in (run_dir / "checkpoints").glob("checkpoint-*")}
    lineage = json.loads(kept["checkpoint-20"])["lineage_sha256"]

    with caplog.at_level(logging.WARNING, logger="kantai_batch"):
        invoke("pretrain", "--run-dir", str(run_dir), "--no-tracking", *tiny("train.max_steps=10", "train.seed=7"))
    aside = run_dir / "checkpoints" / f"other-training-{lineage[:12]}"
    assert f"moved to {aside}" in caplog.text
    assert {p.name: (p / MARKER).read_text() for p in aside.iterdir()} == kept, "moved whole, markers and all"
    assert json.loads((run_dir / "model" / "train_summary.json").read_text())["resumed_from_step"] == 0

    # Moved back, its own job resumes it; the checkpoints of the training in between, finished, go.
    for name in ("checkpoint-10", *kept):
        shutil.rmtree(run_dir / "checkpoints" / name, ignore_errors=True)
    for name in kept:
        (aside / name).rename(run_dir / "checkpoints" / name)
    invoke("pretrain", "--run-dir", str(run_dir), "--no-tracking", *tiny("train.max_steps=30", "train.save_steps=10"))
    assert json.loads((run_dir / "model" / "train_summary.json").read_text())["resumed_from_step"] == 20


def test_a_second_training_on_one_run_dir_is_refused_while_the_first_runs(tmp_path: Path, corpus_file: Path):
    from kantai_batch.manifest import only_writer

    run_dir = prepared_run(tmp_path / "run", corpus_file)
    with only_writer(run_dir / "checkpoints"):  # the first training, holding its checkpoints
        result = invoke("pretrain", "--run-dir", str(run_dir), "--no-tracking", *tiny(), expect=4)
    assert f"{run_dir / 'checkpoints'} is being written by process {os.getpid()}" in result.stderr
    assert not (run_dir / "checkpoints").exists() and not (run_dir / "model").exists()
    invoke("pretrain", "--run-dir", str(run_dir), "--no-tracking", *tiny("train.max_steps=10"))


def test_checkpoints_of_another_training_are_not_resumed_but_a_longer_one_resumes(tmp_path: Path, corpus_file: Path):
    run_dir = prepared_run(tmp_path / "run", corpus_file)
    short = tiny("train.max_steps=10", "train.save_steps=10")
    invoke("pretrain", "--run-dir", str(run_dir), "--no-tracking", *short)
    first = json.loads((run_dir / "checkpoints" / "checkpoint-10" / MARKER).read_text())["lineage_sha256"]
    # A job the run's tokens were not made for is refused before it touches the checkpoints.
    wrong = tiny("train.max_steps=10", "train.save_steps=10", "data.block_size=16")
    result = invoke("pretrain", "--run-dir", str(run_dir), "--no-tracking", *wrong, expect=3)
    assert "were made for other settings" in result.stderr
    assert json.loads((run_dir / "checkpoints" / "checkpoint-10" / MARKER).read_text())["lineage_sha256"] == first
    # Another learning rate is another training: it starts over, and the old checkpoint is gone.
    other = tiny("train.max_steps=10", "train.save_steps=10", "train.learning_rate=3e-3")
    invoke("pretrain", "--run-dir", str(run_dir), "--no-tracking", *other)
    assert json.loads((run_dir / "model" / "train_summary.json").read_text())["resumed_from_step"] == 0
    second = json.loads((run_dir / "checkpoints" / "checkpoint-10" / MARKER).read_text())["lineage_sha256"]
    assert second != first
    # A longer training of the same lineage resumes it.
    longer = tiny("train.max_steps=20", "train.save_steps=10", "train.learning_rate=3e-3")
    invoke("pretrain", "--run-dir", str(run_dir), "--no-tracking", *longer)
    assert json.loads((run_dir / "model" / "train_summary.json").read_text())["resumed_from_step"] == 10
    # A pod retried between the last checkpoint and the commit takes no step more (the Trainer would):
    # it commits the last checkpoint's model; so does a job asking for fewer steps than were taken.
    weights = (run_dir / "checkpoints" / "checkpoint-20" / "model.safetensors").read_bytes()
    for again in (longer, tiny("train.max_steps=10", "train.save_steps=10", "train.learning_rate=3e-3")):
        shutil.rmtree(run_dir / "model")
        invoke("pretrain", "--run-dir", str(run_dir), "--no-tracking", *again)
        summary = json.loads((run_dir / "model" / "train_summary.json").read_text())
        assert (summary["global_step"], summary["resumed_from_step"], summary["stopped_by"]) == (20, 20, "max_steps")
        assert _tensors(run_dir / "model") == _tensors(run_dir / "checkpoints" / "checkpoint-20")
        assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["checkpoint-10", "checkpoint-20"]
    assert (run_dir / "checkpoints" / "checkpoint-20" / "model.safetensors").read_bytes() == weights


def _tensors(folder: Path) -> dict:
    from safetensors.torch import load_file

    return {name: tensor.tolist() for name, tensor in load_file(folder / "model.safetensors").items()}


def test_a_diverged_training_stops_before_its_next_checkpoint_and_fails_for_good(
    tmp_path: Path, corpus_file: Path, monkeypatch: pytest.MonkeyPatch
):
    from kantai_batch import objective

    steps = itertools.count(1)
    masked_lm_loss = objective.masked_lm_loss

    def diverging(outputs, labels, num_items_in_batch=None):  # from step 24 on, as a too-high learning rate would
        loss = masked_lm_loss(outputs, labels, num_items_in_batch)
        return loss * math.nan if next(steps) >= 24 else loss

    monkeypatch.setattr(objective, "masked_lm_loss", diverging)
    run_dir = prepared_run(tmp_path / "run", corpus_file)
    # No log line falls between: the check before the checkpoint of step 30 finds it.
    settings = tiny("train.max_steps=40", "train.save_steps=10", "train.logging_steps=1000")
    result = invoke("pretrain", "--run-dir", str(run_dir), "--no-tracking", *settings, expect=6)
    error = result.stderr.strip().splitlines()[-1]
    assert error.startswith("kantai-batch: error: pretrain diverged by step 30 (loss nan, grad_norm nan)")
    assert "the newest checkpoint is step 20" in error
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["checkpoint-10", "checkpoint-20"]
    assert not (run_dir / "model").exists(), "no diverged model is committed"


def test_an_infinite_gradient_norm_stops_training_but_not_under_fp16_loss_scaling():
    from transformers import TrainerControl, TrainerState

    from kantai_batch.preemption import Preemption
    from kantai_batch.stopping import StopAgreement

    stop, state = StopAgreement(Preemption(1.0)), TrainerState(global_step=7)
    control = stop.on_log(None, state, TrainerControl(should_save=True), logs={"loss": 4.2, "grad_norm": 3.0})
    assert not stop.diverged and control.should_save and not control.should_training_stop
    # fp16's loss scaler skips a step whose gradients overflowed: an infinite norm there is no divergence.
    fp16 = SimpleNamespace(fp16=True)
    control = stop.on_log(fp16, state, control, logs={"loss": 4.2, "grad_norm": math.inf})
    assert not stop.diverged and control.should_save and not control.should_training_stop
    control = stop.on_log(SimpleNamespace(fp16=False), state, control, logs={"loss": 4.2, "grad_norm": math.inf})
    assert stop.diverged and stop.divergence == {"step": 7, "loss": 4.2, "grad_norm": math.inf}
    assert control.should_training_stop and not control.should_save


def test_resuming_loads_the_tied_head_without_calling_it_missing(tmp_path: Path, monkeypatch):
    """transformers 5's Trainer warned "There were missing keys in the checkpoint model loaded:
    ['lm_head.decoder.weight', 'lm_head.decoder.bias']" at every resume: a checkpoint holds tied tensors
    once. The head must still share the loaded embeddings, and a key really missing is still named."""
    import safetensors.torch
    import torch
    import transformers.trainer
    from transformers import RobertaConfig

    from kantai_batch.job import load_job
    from kantai_batch.trainer import PretrainTrainer, training_arguments

    config = RobertaConfig(vocab_size=300, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                           intermediate_size=64, max_position_embeddings=40, pad_token_id=1)  # fmt: skip
    torch.manual_seed(0)
    saved = RobertaForMaskedLM(config)
    checkpoint = tmp_path / "checkpoint-1"
    saved.save_pretrained(checkpoint)
    warnings: list[str] = []
    monkeypatch.setattr(transformers.trainer.logger, "warning", lambda message, *a, **k: warnings.append(message))

    def resumed() -> RobertaForMaskedLM:
        torch.manual_seed(1)
        model = RobertaForMaskedLM(config)
        args = training_arguments(load_job(None, ["train.precision=fp32"]), tmp_path / "out")
        PretrainTrainer(task="mlm", model=model, args=args)._load_from_checkpoint(str(checkpoint))
        return model

    model = resumed()
    assert not [message for message in warnings if "missing keys" in message], warnings
    embeddings = model.roberta.embeddings.word_embeddings.weight
    assert model.lm_head.decoder.weight is embeddings
    assert torch.equal(embeddings, saved.roberta.embeddings.word_embeddings.weight)

    weights = safetensors.torch.load_file(checkpoint / "model.safetensors")
    del weights["roberta.encoder.layer.0.output.dense.bias"]
    safetensors.torch.save_file(weights, checkpoint / "model.safetensors", metadata={"format": "pt"})
    resumed()
    (missing,) = [message for message in warnings if "missing keys" in message]
    assert "roberta.encoder.layer.0.output.dense.bias" in missing and "lm_head" not in missing, missing
