"""The model registry against a real `mlflow server` (artifacts in the loopback S3): register, pull, use."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from helpers import free_port, invoke
from kantai_batch.manifest import MARKER, is_complete

pytestmark = pytest.mark.slow


@pytest.fixture
def tracking_server(mlflow_server: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> str:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    monkeypatch.setenv("KANTAI_CACHE_DIR", str(tmp_path / "cache"))
    return mlflow_server


@pytest.mark.floors
def test_register_pull_and_fill_mask_round_trip(
    tracking_server: str, trained_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    text = "Reason <mask> the conditions of experience."
    original = json.loads(invoke("fill-mask", "--model", str(trained_run / "model"), "--json", text).stdout)

    registered = json.loads(
        invoke("register", "--model", str(trained_run / "model"), "--name", "kantai-tiny", "--alias", "champion").stdout
    )
    assert registered["name"] == "kantai-tiny" and registered["alias"] == "champion"
    again = json.loads(invoke("register", "--model", str(trained_run / "model"), "--name", "kantai-tiny").stdout)
    assert int(again["version"]) == int(registered["version"]) + 1

    out = tmp_path / "pulled"
    result = invoke("pull", "models:/kantai-tiny@champion", "--out", str(out))
    assert result.stdout.strip() == str(out)
    assert {"config.json", "model.safetensors", "tokenizer.json", MARKER} <= {p.name for p in out.iterdir()}
    # The job it was trained by comes with it (the MLmodel file's metadata): its blocks, its experiment.
    assert (out / "job.yaml").read_text() == (trained_run / "model" / "job.yaml").read_text()
    pulled = json.loads(invoke("fill-mask", "--model", str(out), "--json", text).stdout)
    assert pulled == original, "the registered model predicts exactly as the trained one"
    # A model folder pulled before is replaced; a folder of anything else is refused and kept.
    invoke("pull", f"models:/kantai-tiny/{registered['version']}", "--out", str(out))
    assert {"config.json", "model.safetensors", MARKER} <= {p.name for p in out.iterdir()}
    notes = tmp_path / "run" / "notes.txt"
    notes.parent.mkdir()
    notes.write_text("mine")
    refused = invoke("pull", "models:/kantai-tiny@champion", "--out", str(notes.parent), expect=2)
    assert refused.stderr.count("\n") == 1 and f"--out {notes.parent} holds files" in refused.stderr
    assert [p.name for p in notes.parent.iterdir()] == ["notes.txt"] and notes.read_text() == "mine"
    # A run's committed corpus is complete too, and no model folder.
    corpus = tmp_path / "corpus"
    shutil.copytree(trained_run / "corpus", corpus)
    invoke("pull", "models:/kantai-tiny@champion", "--out", str(corpus), expect=2)
    assert (corpus / "train.txt").is_file() and not (corpus / "config.json").exists()
    # `--out .` would leave the shell standing in a deleted folder: refused, nothing touched.
    monkeypatch.chdir(notes.parent)
    for here in (".", str(tmp_path)):
        refused = invoke("pull", "models:/kantai-tiny@champion", "--out", here, expect=2)
        assert refused.stderr.count("\n") == 1 and "holds the working directory" in refused.stderr
    assert [p.name for p in notes.parent.iterdir()] == ["notes.txt"]
    invoke("pull", "models:/kantai-tiny@champion", "--out", "model")
    assert is_complete(notes.parent / "model")
    monkeypatch.chdir(tmp_path)

    direct = json.loads(invoke("fill-mask", "--model", "models:/kantai-tiny@champion", "--json", text).stdout)
    assert direct == original
    by_version = invoke("fill-mask", "--model", f"models:/kantai-tiny/{again['version']}", "--json", text).stdout
    assert json.loads(by_version) == original


@pytest.mark.floors
def test_a_causal_model_registers_and_generates(tracking_server: str, support_run: Path):
    prompt = "my order never arrived"
    local = json.loads(
        invoke("generate", "--model", str(support_run / "model"), "--temperature", "0", "--json", prompt).stdout
    )
    invoke("register", "--model", str(support_run / "model"), "--name", "support-tiny", "--alias", "champion")
    remote = invoke("generate", "--model", "models:/support-tiny@champion", "--temperature", "0", "--json", prompt)
    assert json.loads(remote.stdout) == local


def test_unknown_registered_model_is_a_one_line_error(tracking_server: str, tmp_path: Path):
    result = invoke("pull", "models:/no-such-model@champion", "--out", str(tmp_path / "x"), expect=3)
    message = result.stderr.strip()
    assert len(message.splitlines()) == 1 and "models:/no-such-model@champion" in message
    assert not (tmp_path / "x").exists()
    for uri in (
        "models:/kb",
        "models:/kb/1/extra",
        "models:/kb/latest",
        "models:/kb@",
        "models:/@champion",
        "models:/",
    ):
        refused = invoke("pull", uri, "--out", str(tmp_path / "x"), expect=2).stderr.strip()
        assert (
            refused
            == f"kantai-batch: error: {uri}: give a version or an alias (models:/NAME/VERSION or models:/NAME@ALIAS)"
        )


def test_unreachable_tracking_server_is_a_one_line_error(
    trained_run: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{free_port()}")
    for name in (
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES",
        "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR",
        "MLFLOW_HTTP_REQUEST_TIMEOUT",
    ):
        monkeypatch.delenv(name, raising=False)
    result = invoke("register", "--model", str(trained_run / "model"), "--name", "x", expect=4)
    message = result.stderr.strip()
    assert len(message.splitlines()) == 1 and "MLflow http://127.0.0.1:" in message
    # A server not there at the start is given 2 short retries, not MLflow's 7 over about 4 minutes,
    # and MLflow's own settings are back for the rest of the process.
    retries = [r for r in caplog.records if r.name == "urllib3.connectionpool" and "Retrying" in r.getMessage()]
    assert len(retries) == 2
    assert "MLFLOW_HTTP_REQUEST_MAX_RETRIES" not in os.environ


@pytest.mark.parametrize("name", ["kantaibert", "Kant's critique", 'the "support" model'])
def test_the_version_search_filter_keeps_any_quote_in_a_model_name(name: str):
    from mlflow.utils.search_utils import SearchModelVersionUtils

    from kantai_batch.registry import name_filter

    assert SearchModelVersionUtils.parse_search_filter(name_filter(name))[0]["value"] == name


NAMES = ["kantaibert", "Kant's critique", "a.b", "..a", ".", "a/b", "a:b", " ", "", "x" * 300, "ü", "a..b"]
ALIASES = [
    "champion",
    "_x",
    "a-b",
    "latest",
    "LaTeSt",
    "v3",
    "V12",
    "v",
    "vx3",
    "two words",
    "",
    "é",
    "x" * 256,
    "x" * 255,
]


def _mlflow_check(*names: str):
    from mlflow.utils import validation

    found = [getattr(validation, name, None) for name in names]
    return found if all(found) else None


@pytest.mark.parametrize("value", ALIASES)
def test_aliases_follow_mlflows_own_rules(value: str):
    """Ours are a copy (MLflow's checks are private, renamed in 3.18): where it takes an alias we take it
    unless it starts with a digit, and where it refuses one so do we."""
    from mlflow.exceptions import MlflowException

    from kantai_batch.errors import JobConfigError
    from kantai_batch.registry import require_alias

    checks = _mlflow_check("_validate_alias_name", "_validate_alias_name_reserved") or _mlflow_check(
        "_validate_model_alias_name", "_validate_model_alias_name_reserved"
    )
    if checks is None:
        pytest.skip("this MLflow has neither name of its private alias checks to compare with")
    try:
        for check in checks:
            check(value)
        mlflow_takes = True
    except MlflowException:
        mlflow_takes = False
    try:
        require_alias(value, "--alias")
        we_take = True
    except JobConfigError:
        we_take = False
    assert we_take == (mlflow_takes and not value[0].isdigit())


@pytest.mark.parametrize("value", NAMES)
def test_model_names_follow_mlflows_own_rule(value: str):
    from mlflow.exceptions import MlflowException

    from kantai_batch.errors import JobConfigError
    from kantai_batch.registry import require_model_name

    checks = _mlflow_check("_validate_model_name")
    if checks is None:
        pytest.skip("this MLflow has no private _validate_model_name to compare with")
    try:
        checks[0](value)
        mlflow_takes = True
    except MlflowException:
        mlflow_takes = False
    try:
        require_model_name(value, "--name")
        we_take = True
    except JobConfigError:
        we_take = False
    assert we_take == mlflow_takes


def test_a_bad_alias_or_empty_name_registers_nothing(tracking_server: str, trained_run: Path, tmp_path: Path):
    import mlflow

    # MLflow's store refuses its reserved names whatever their case.
    for alias, why in (
        ("latest", "it is reserved ('latest', 'v<N>')"),
        ("LATEST", "it is reserved ('latest', 'v<N>')"),
        ("V3", "it is reserved ('latest', 'v<N>')"),
        ("two words", "1 to 255 letters, digits, underscores (_) and dashes (-)"),
        ("3rd", "must start with a letter or '_'"),
    ):  # fmt: skip
        refused = invoke("register", "--model", str(trained_run / "model"), "--name", "kb", "--alias", alias, expect=2)
        assert len(refused.stderr.strip().splitlines()) == 1 and refused.stderr.strip().endswith(why)
        assert f"--alias {alias!r}" in refused.stderr
    assert mlflow.MlflowClient().search_registered_models(filter_string="name = 'kb'") == []
    # An empty --register (a variable the settings define empty) would train and register nothing, exit 0.
    run_dir = tmp_path / "run"
    empty = invoke("run", "--run-dir", str(run_dir), "--register", "", expect=2)
    assert "--register '' is not a registered model name" in empty.stderr
    alone = invoke("run", "--run-dir", str(run_dir), "--fail-if-not-promoted", expect=2)
    assert "--fail-if-not-promoted needs --register NAME" in alone.stderr
    assert not run_dir.exists()


def test_the_pull_cache_tells_a_version_registered_again_from_the_old_one(
    tracking_server: str, trained_run: Path, tmp_path: Path
):
    import mlflow
    import torch
    from transformers import RobertaForMaskedLM

    from kantai_batch.manifest import file_sha256
    from kantai_batch.registry import cached_pull

    other = tmp_path / "other-model"
    shutil.copytree(trained_run / "model", other)
    model = RobertaForMaskedLM.from_pretrained(str(other))
    with torch.no_grad():
        model.lm_head.bias.add_(1.0)
    model.save_pretrained(str(other))
    cache = tmp_path / "cache"
    invoke("register", "--model", str(trained_run / "model"), "--name", "again", "--alias", "champion")
    first = cached_pull("models:/again@champion", cache)
    weights = file_sha256(first / "model.safetensors")
    # The model deleted and registered again: version 1 once more, of other weights.
    mlflow.MlflowClient().delete_registered_model("again")
    invoke("register", "--model", str(other), "--name", "again", "--alias", "champion")
    second = cached_pull("models:/again/1", cache)
    assert second != first and file_sha256(second / "model.safetensors") != weights
    assert cached_pull("models:/again@champion", cache) == second


def test_the_pull_cache_tells_a_version_registered_again_from_the_same_training_run(
    tracking_server: str, trained_run: Path, tmp_path: Path
):
    """A training continued under longer bounds keeps its MLflow run: a version registered again from it
    (the model deleted and registered anew) has the old number and the old run, and other weights."""
    import mlflow
    import torch
    from transformers import RobertaForMaskedLM

    from kantai_batch.manifest import file_sha256
    from kantai_batch.registry import cached_pull

    first_model = tmp_path / "first"
    shutil.copytree(trained_run / "model", first_model)
    registered = json.loads(invoke("register", "--model", str(first_model), "--name", "same-run").stdout)
    cache = tmp_path / "cache"
    first = cached_pull("models:/same-run/1", cache)
    weights = file_sha256(first / "model.safetensors")

    longer = tmp_path / "longer"
    shutil.copytree(first_model, longer)
    model = RobertaForMaskedLM.from_pretrained(str(longer))
    with torch.no_grad():
        model.lm_head.bias.add_(1.0)
    model.save_pretrained(str(longer))
    summary = json.loads((longer / "train_summary.json").read_text())
    summary["mlflow_run_id"] = registered["run_id"]  # the same training run, continued
    (longer / "train_summary.json").write_text(json.dumps(summary))
    mlflow.MlflowClient().delete_registered_model("same-run")
    again = json.loads(invoke("register", "--model", str(longer), "--name", "same-run").stdout)
    assert (again["version"], again["run_id"]) == ("1", registered["run_id"])
    second = cached_pull("models:/same-run/1", cache)
    assert file_sha256(second / "model.safetensors") == file_sha256(longer / "model.safetensors") != weights


@pytest.mark.parametrize("lost", ["model/model.safetensors", "components/tokenizer/tokenizer_config.json"])
def test_a_registered_model_downloaded_without_its_weights_or_tokenizer_is_not_cached(
    tracking_server: str, trained_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, lost: str
):
    """The store lost an artifact: the pull fails naming the URI, and once the artifact is back the same
    cache pulls the whole model (a folder committed without it was served for good)."""
    import mlflow

    from kantai_batch.errors import InputDataError
    from kantai_batch.registry import cached_pull

    invoke("register", "--model", str(trained_run / "model"), "--name", "partial")
    download = mlflow.artifacts.download_artifacts

    def without(**kwargs):
        downloaded = Path(download(**kwargs))
        (downloaded / lost).unlink()
        return str(downloaded)

    cache = tmp_path / "cache"
    with monkeypatch.context() as patched:
        patched.setattr(mlflow.artifacts, "download_artifacts", without)
        with pytest.raises(InputDataError, match="models:/partial/1 was downloaded without its"):
            cached_pull("models:/partial/1", cache)
    folder = cached_pull("models:/partial/1", cache)
    assert (folder / "model.safetensors").is_file() and (folder / "tokenizer_config.json").is_file()
