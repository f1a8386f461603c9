"""Retraining that promotes only a better model, against a real `mlflow server` (artifacts in the loopback S3).

`run --register NAME` scores the new model and NAME@champion on one benchmark in one process and moves
`champion` only to a model that is better by register.min_improvement; `train.init_from` continues
from the champion with its tokenizer; an unchanged corpus and job do nothing.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import mlflow
import pytest

from helpers import free_port, invoke, kantian_text, tiny
from kantai_batch.data import tokenizer_digest
from kantai_batch.errors import (
    InputDataError,
    JobConfigError,
    NotPromotedError,
    SourceUnavailableError,
    TrainingDivergedError,
)
from kantai_batch.manifest import read_marker
from kantai_batch.model import load_tokenizer

pytestmark = pytest.mark.slow


@pytest.fixture
def registry(mlflow_server: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> mlflow.MlflowClient:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    monkeypatch.setenv("KANTAI_CACHE_DIR", str(tmp_path / "cache"))
    return mlflow.MlflowClient(tracking_uri=mlflow_server, registry_uri=mlflow_server)


def _week(folder: Path, week: int) -> Path:
    """One more file of a growing corpus folder (different paragraphs each week)."""
    folder.mkdir(exist_ok=True)
    path = folder / f"week-{week}.txt"
    path.write_text(kantian_text(300, seed=week), encoding="utf-8")
    return folder


def _retrain(run_dir: Path, corpus: Path, name: str, *extra: str, expect: int | None = 0):
    args = ["run", "--run-dir", str(run_dir), "--corpus", f"{corpus}/", "--register", name]
    return invoke(*args, *tiny(f"train.init_from=models:/{name}@champion", *extra), expect=expect)


def _champion(client: mlflow.MlflowClient, name: str) -> str:
    return str(client.get_model_version_by_alias(name, "champion").version)


def _results(result) -> list[str]:
    return [line for line in result.stdout.splitlines() if line.strip()]


def test_retraining_promotes_only_a_better_model_continuing_from_the_champion(
    registry: mlflow.MlflowClient, tmp_path: Path, caplog: pytest.LogCaptureFixture
):
    caplog.set_level(logging.INFO, logger="kantai_batch")
    name = "retrain-tiny"
    corpus, run_dir = tmp_path / "corpus", tmp_path / "run"

    # 1. The first run: no champion yet (and no version for init_from), so it trains from scratch,
    # freezes its held-out split as the benchmark, and is promoted.
    first = _retrain(run_dir, _week(corpus, 1), name)
    assert _results(first)[0].startswith(f"promoted: {name} version 1 is champion"), first.stdout
    assert "no such version yet, training from scratch" in caplog.text
    assert _champion(registry, name) == "1"
    v1 = registry.get_model_version(name, "1").tags
    stats = json.loads((run_dir / "corpus" / "stats.json").read_text())
    assert v1["corpus_sha256"] == stats["source_sha256"]
    assert v1["champion_loss"] == "none" and float(v1["benchmark_loss"]) > 0
    frozen = registry.get_registered_model(name).tags
    eval_split = (run_dir / "corpus" / "eval.txt").read_bytes()
    assert frozen["kantai.benchmark_sha256"] == v1["benchmark_sha256"] == hashlib.sha256(eval_split).hexdigest()
    downloaded = mlflow.artifacts.download_artifacts(frozen["kantai.benchmark_uri"], dst_path=str(tmp_path / "b"))
    assert Path(downloaded).read_bytes() == eval_split, "the first version's held-out split, as an artifact"
    history = registry.get_metric_history(registry.get_model_version(name, "1").run_id, "benchmark_loss")
    assert [m.value for m in history] == [pytest.approx(float(v1["benchmark_loss"]), rel=1e-5)]
    tokenizer_v1 = tokenizer_digest(load_tokenizer(run_dir / "tokenizer"))
    model_v1 = read_marker(run_dir / "model")["files"]

    # 2. The same corpus and job: nothing trained, no version. (A run that moved the alias and stopped
    # before writing its decision: the decision is recorded now.)
    registry.delete_model_version_tag(name, "1", "promotion")
    caplog.clear()
    again = _retrain(run_dir, corpus, name)
    assert "recorded by a later run" in registry.get_model_version(name, "1").tags["promotion"]
    assert len(_results(again)) == 1 and _results(again)[0].startswith("nothing to do:"), again.stdout
    assert "prepare: redoing it" in caplog.text and "pretrain:" not in caplog.text
    assert len(registry.search_model_versions(f"name = '{name}'")) == 1
    assert read_marker(run_dir / "model")["files"] == model_v1

    # 3. A week more data: continues from the champion with its tokenizer, on the same benchmark.
    caplog.clear()
    grown = _retrain(run_dir, _week(corpus, 2), name)
    assert "tokenizer: copied from models:/retrain-tiny@champion" in caplog.text
    assert "pretrain: continuing from" in caplog.text
    assert tokenizer_digest(load_tokenizer(run_dir / "tokenizer")) == tokenizer_v1, "token ids keep their meaning"
    assert _results(grown)[0].startswith(f"promoted: {name} version 2 is champion"), grown.stdout
    v2 = registry.get_model_version(name, "2").tags
    assert v2["benchmark_sha256"] == v1["benchmark_sha256"], "the frozen benchmark, not the grown eval split"
    # The champion was scored again, in this process, on the same bytes and masks: the same number.
    assert float(v2["champion_loss"]) == pytest.approx(float(v1["benchmark_loss"]), rel=1e-5)
    assert float(v2["benchmark_loss"]) <= float(v2["champion_loss"]) * (1 - 0.005)
    assert v2["corpus_sha256"] != v1["corpus_sha256"]
    assert _champion(registry, name) == "2"

    # 4. Sabotaged: a learning rate that makes it diverge. Registered as the challenger; the champion stays.
    worse = _retrain(run_dir, corpus, name, "train.learning_rate=1", expect=None)
    assert worse.exit_code == 0, worse.stderr[-3000:]
    line = _results(worse)[0]
    assert line.startswith(f"not promoted: {name} version 3 is challenger") and "champion stays version 2" in line
    v3 = registry.get_model_version(name, "3").tags
    assert float(v3["benchmark_loss"]) > float(v3["champion_loss"]) * (1 - 0.005)
    assert _champion(registry, name) == "2"
    assert registry.get_model_version_by_alias(name, "challenger").version == "3"

    # The same run again: its model is already registered; with --fail-if-not-promoted that is exit 5.
    retry = invoke(
        "run", "--run-dir", str(run_dir), "--corpus", f"{corpus}/", "--register", name, "--fail-if-not-promoted",
        *tiny(f"train.init_from=models:/{name}@champion", "train.learning_rate=1"),
        expect=NotPromotedError.exit_code,
    )  # fmt: skip
    assert (
        _results(retry)[0]
        == f"nothing new: the run's model is already {name} version 3 (@challenger); not registered again"
    )
    assert retry.stderr.strip().splitlines()[-1] == f"kantai-batch: error: {_results(retry)[0]}"
    assert len(registry.search_model_versions(f"name = '{name}'")) == 3

    # The table of versions, and a promotion by hand recorded on the version.
    rows = json.loads(invoke("models", name, "--json").stdout)
    assert [(r["version"], r["aliases"]) for r in rows] == [("1", []), ("2", ["champion"]), ("3", ["challenger"])]
    assert rows[2]["benchmark_loss"] == pytest.approx(float(v3["benchmark_loss"]))
    assert rows[1]["corpus_sha256"] == v2["corpus_sha256"]
    # The URI pull and promote take names the model as well.
    assert json.loads(invoke("models", f"models:/{name}@champion", "--json").stdout) == rows
    table = invoke("models", name).stdout.splitlines()
    assert table[0].split()[:4] == ["version", "aliases", "benchmark_loss", "corpus_sha256"]
    assert table[2].split()[:2] == ["2", "champion"] and v2["corpus_sha256"][:12] in table[2]

    moved = invoke("promote", f"models:/{name}/3")
    assert moved.stdout.strip() == f"{name}@champion: version 3 (was version 2)"
    assert _champion(registry, name) == "3"
    v3 = registry.get_model_version(name, "3").tags
    assert v3["champion.previous_version"] == "2"
    assert v3["champion.set_by"].startswith(f"kantai-batch promote models:/{name}/3 --alias champion")
    # Asking for what is not there is one line, and moves nothing.
    gone = invoke("promote", f"models:/{name}/99", expect=InputDataError.exit_code).stderr.strip()
    assert len(gone.splitlines()) == 1 and f"models:/{name}/99 in MLflow" in gone
    reserved = invoke("promote", f"models:/{name}/2", "--alias", "latest", expect=JobConfigError.exit_code)
    assert "alias 'latest'" in reserved.stderr
    assert _champion(registry, name) == "3"
    unknown = invoke("models", "no-such-model", expect=InputDataError.exit_code).stderr.strip()
    assert len(unknown.splitlines()) == 1 and "models:/no-such-model in MLflow" in unknown


@pytest.mark.parametrize(("new_loss", "promoted"), [(0.999, False), (0.99, True)])
def test_the_champion_moves_only_for_a_loss_lower_by_min_improvement(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, new_loss: float, promoted: bool
):
    """A loss 0.1% below the champion's is noise, not a better model: with register.min_improvement 0.005
    the new version is the challenger; 1% below, it is the champion. The decision alone, the registry stubbed."""
    from types import SimpleNamespace

    from kantai_batch import benchmark, promotion, registry, sources
    from kantai_batch.job import load_job

    losses = {"new model": new_loss, "champion version 1": 1.0}
    monkeypatch.setattr(benchmark, "score", lambda job, model_dir, bench, what: {"loss": losses[what]})
    monkeypatch.setattr(sources, "cache_dir", lambda: tmp_path)
    monkeypatch.setattr(registry, "cached_pull", lambda uri, cache: tmp_path / "champion")
    monkeypatch.setattr(registry, "register", lambda *args, **kwargs: {"version": "2", "run_id": "run-2"})
    monkeypatch.setattr(registry, "log_metrics", lambda *args: None)
    monkeypatch.setattr(registry, "set_version_tags", lambda *args: None)
    monkeypatch.setattr(registry, "version_by_alias", lambda name, alias: "1")
    moved = []
    monkeypatch.setattr(registry, "move_alias", lambda name, alias, version, by: moved.append((alias, version)))
    monkeypatch.setattr(promotion, "_versions_or_none", lambda name: [])
    monkeypatch.setattr(promotion, "_model_sha256", lambda run: "0" * 64)
    monkeypatch.setattr(promotion, "_require_finite_training", lambda run, stays: None)
    monkeypatch.setattr(promotion, "_unlike", lambda model_dir, champion_dir: None)

    job = load_job(None, ["register.min_improvement=0.005"])
    run = SimpleNamespace(model=tmp_path / "model", require=lambda *args: None)
    held_out = SimpleNamespace(freeze=False, sha256="1" * 64, source="benchmark.txt")
    outcome = promotion._decide(job, run, "kant", "1", held_out, {})
    assert outcome.promoted is promoted
    assert moved == [("champion" if promoted else "challenger", "2")]
    if not promoted:
        assert "register.min_improvement asks for at least 0.5% lower" in outcome.line


def test_a_failure_after_training_leaves_the_champion_where_it_was(registry: mlflow.MlflowClient, tmp_path: Path):
    name = "failing-tiny"
    corpus, run_dir = tmp_path / "corpus", tmp_path / "run"
    _retrain(run_dir, _week(corpus, 1), name)
    assert _champion(registry, name) == "1"

    # Training diverges to NaN: pretrain stops it, one line, exit 6 (no retry), nothing registered.
    nan = _retrain(run_dir, _week(corpus, 2), name, "train.learning_rate=1e30", expect=TrainingDivergedError.exit_code)
    message = nan.stderr.strip().splitlines()[-1]
    assert message.startswith("kantai-batch: error: pretrain diverged by step ")
    assert message.endswith(f"nothing registered, {name}@champion stays version 1")
    # The benchmark cannot be read: one line, exit 4, found before any training, nothing registered.
    missing = tmp_path / "no-such-benchmark.txt"
    model_before = read_marker(run_dir / "model")
    failed = _retrain(run_dir, corpus, name, f"eval.benchmark={missing}", expect=SourceUnavailableError.exit_code)
    assert failed.stderr.strip().splitlines()[-1] == f"kantai-batch: error: benchmark {missing} does not exist"
    assert read_marker(run_dir / "model") == model_before, "no training for a benchmark that is not there"
    # Another eval.seed holds out other paragraphs, and most of the frozen benchmark's go to training:
    # the new model would be scored on text it trained on. Refused before any training.
    leaked = _retrain(run_dir, corpus, name, "eval.seed=7", expect=JobConfigError.exit_code)
    message = leaked.stderr.strip().splitlines()[-1]
    assert " examples are in the training split " in message and "eval.seed, data.eval_fraction" in message
    assert read_marker(run_dir / "model") == model_before
    assert _champion(registry, name) == "1"
    assert len(registry.search_model_versions(f"name = '{name}'")) == 1

    # A benchmark the job names: both models are scored on it; the frozen split stays the model's default.
    frozen = registry.get_registered_model(name).tags["kantai.benchmark_sha256"]
    named = tmp_path / "benchmark.txt"
    named.write_text(kantian_text(60, seed=99), encoding="utf-8")
    _retrain(run_dir, corpus, name, f"eval.benchmark={named}")
    v2 = registry.get_model_version(name, "2").tags
    assert v2["benchmark"] == str(named) and v2["benchmark_sha256"] != frozen
    assert float(v2["champion_loss"]) != pytest.approx(
        float(registry.get_model_version(name, "1").tags["benchmark_loss"])
    )
    assert registry.get_registered_model(name).tags["kantai.benchmark_sha256"] == frozen

    # From scratch (train.init_from null) the new model has a tokenizer of its own: a loss per token of
    # another tokenization does not compare, whatever it is. Registered as the challenger; the champion stays.
    before = _champion(registry, name)
    scratch = _retrain(run_dir, _week(corpus, 3), name, "train.init_from=null")
    line = _results(scratch)[0]
    assert line.startswith(f"not promoted: {name} version 3 is challenger: its tokenizer is not the champion's"), line
    assert f"champion stays version {before} (`kantai-batch promote models:/{name}/3` moves it by hand)" in line
    assert _champion(registry, name) == before
    assert registry.get_model_version_by_alias(name, "challenger").version == "3"


def test_a_run_stopped_right_after_its_version_was_created_is_not_registered_twice(
    registry: mlflow.MlflowClient, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """The store fails (or the pod is killed) just after it created the version: the next run must find that
    version as its model (by its tags) and decide for it, not register the same model a second time."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking.client import MlflowClient

    name = "stopped-tiny"
    corpus, run_dir = tmp_path / "corpus", tmp_path / "run"
    _retrain(run_dir, _week(corpus, 1), name)
    created = MlflowClient._create_model_version

    def created_then_lost(self, *args, **kwargs):
        created(self, *args, **kwargs)
        raise MlflowException("API request failed: 503 (the store went away after creating the version)")

    with monkeypatch.context() as patched:
        patched.setattr(MlflowClient, "_create_model_version", created_then_lost)
        _retrain(run_dir, _week(corpus, 2), name, expect=SourceUnavailableError.exit_code)
    assert _champion(registry, name) == "1"
    again = _retrain(run_dir, corpus, name)
    assert _results(again)[0].startswith(f"promoted: {name} version 2 is champion"), again.stdout
    versions = registry.search_model_versions(f"name = '{name}'")
    assert sorted(v.version for v in versions) == ["1", "2"], "the model was registered once"
    assert all("model_sha256" in v.tags and "promotion" in v.tags for v in versions)


def test_an_unreachable_registry_fails_before_any_work(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "0")
    result = _retrain(tmp_path / "run", _week(tmp_path / "corpus", 1), "x", expect=SourceUnavailableError.exit_code)
    message = result.stderr.strip()
    assert len(message.splitlines()) == 1 and "models:/x@champion in MLflow http://127.0.0.1:" in message
    assert not (tmp_path / "run").exists(), "nothing was prepared"


@pytest.mark.parametrize(
    ("name", "why"),
    [
        ("team/kant", "names cannot contain '/' or ':'"),
        ("kant:v2", "names cannot contain '/' or ':'"),
        (" ", "it is empty"),
        ("..x", "it must be a plain name, not a path"),
        # MLflow takes these two; models:/a@b/3 would read as an alias, and $(...) is a pod's undefined variable.
        ("a@b", "(a Kubernetes variable that was not defined)"),
        ("$(KANTAI_MODEL_NAME)", "(a Kubernetes variable that was not defined)"),
    ],
)
def test_a_name_mlflow_cannot_register_fails_before_any_work(tmp_path: Path, name: str, why: str):
    corpus = _week(tmp_path / "corpus", 1)
    result = invoke("run", "--run-dir", str(tmp_path / "run"), "--corpus", str(corpus), "--register", name, expect=2)
    message = result.stderr.strip()
    assert len(message.splitlines()) == 1
    assert message.startswith(f"kantai-batch: error: --register {name!r} is not a registered model name: ")
    assert message.endswith(why)
    assert not (tmp_path / "run").exists(), "nothing was prepared"


def test_a_job_that_conflicts_with_the_model_it_continues_is_a_one_line_error(
    trained_run: Path, corpus_file: Path, tmp_path: Path
):
    run_dir = tmp_path / "run"
    invoke("prepare", "--run-dir", str(run_dir), "--corpus", str(corpus_file))
    start = f"train.init_from={trained_run / 'model'}"
    small = invoke("train-tokenizer", "--run-dir", str(run_dir), *tiny(start, "tokenizer.vocab_size=300"), expect=2)
    message = small.stderr.strip().splitlines()[-1]
    assert message.startswith(f"kantai-batch: error: train.init_from {trained_run / 'model'}: its tokenizer conflicts")
    assert "(tokenizer.vocab_size 300 but the model's has" in message
    assert not (run_dir / "tokenizer").exists()
    invoke("train-tokenizer", "--run-dir", str(run_dir), *tiny(start))
    assert tokenizer_digest(load_tokenizer(run_dir / "tokenizer")) == tokenizer_digest(
        load_tokenizer(trained_run / "model")
    )
    invoke("tokenize", "--run-dir", str(run_dir), *tiny(start))
    wider = invoke("pretrain", "--run-dir", str(run_dir), "--no-tracking", *tiny(start, "model.intermediate_size=256"),
                   expect=JobConfigError.exit_code)  # fmt: skip
    message = wider.stderr.strip().splitlines()[-1]
    assert "has another architecture than the job (intermediate_size 128 -> 256)" in message
    assert not (run_dir / "model").exists()
