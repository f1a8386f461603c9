from __future__ import annotations

import errno
import json
import re
import subprocess
import sys

import pytest

from helpers import ROOT, invoke, prepared_run, tiny
from kantai_batch.model import load_tokenizer


def test_inspect_reports_the_kantaibert_parameter_count():
    result = invoke("inspect", "--job", str(ROOT / "jobs" / "kantaibert.yaml"), "--set", "model.vocab_size=52000")
    lines = result.stdout.strip().splitlines()
    assert lines[-1] == "83,504,416 parameters in 106 tensors"
    assert lines[0].split()[:3] == ["roberta.embeddings.word_embeddings.weight", "52000x768", "39,936,000"]
    assert lines[0].split()[3] == "47.83%"


def test_inspect_sizes_an_auto_vocabulary_to_the_trained_tokenizer(tmp_path, corpus_file):
    before = invoke("inspect", "--run-dir", str(tmp_path), *tiny()).stdout.splitlines()[0].split()
    assert before[1] == "1024x64", "no tokenizer yet: tokenizer.vocab_size 1000 rounded up to 64"
    prepared_run(tmp_path, corpus_file)
    size = len(load_tokenizer(tmp_path / "tokenizer"))
    after = invoke("inspect", "--run-dir", str(tmp_path), *tiny()).stdout.splitlines()[0].split()
    assert after[1] == f"{-(-size // 64) * 64}x64" and size < 1000


def test_inspect_json_follows_overrides():
    result = invoke("inspect", "--json", "--set", "model.num_hidden_layers=2")
    table = json.loads(result.stdout)
    assert table["tensors"] == 106 - 4 * 16
    assert table["parameters"] == sum(row["count"] for row in table["table"])
    assert abs(sum(row["share"] for row in table["table"]) - 1) < 1e-9


def test_module_entry_point_and_help_do_not_import_torch():
    # `python -m kantai_batch` is what `accelerate launch -m kantai_batch` starts.
    result = subprocess.run([sys.executable, "-m", "kantai_batch", "--help"], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0
    for command in ("prepare", "train-tokenizer", "pretrain", "evaluate", "fill-mask", "inspect", "run"):
        assert command in result.stdout
    probe = "import sys, kantai_batch.cli; print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    imported = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT)
    assert imported.stdout.strip() == "[]", "help must answer without loading torch"


def test_prepare_does_not_load_torch(tmp_path, corpus_file):
    # prepare runs in light pods and on laptops: torch would add seconds and 200 MB to it.
    argv = ["kantai-batch", "prepare", "--run-dir", str(tmp_path / "run"), "--corpus", str(corpus_file)]
    probe = (
        f"import sys\nfrom kantai_batch.cli import main\nsys.argv = {argv!r}\n"
        "try:\n    main()\nexcept SystemExit as exc:\n    assert not exc.code, exc.code\n"
        "print(sorted(m for m in ('torch', 'transformers', 'datasets') if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "[]"
    assert (tmp_path / "run" / "corpus" / "train.txt").is_file()


def test_every_phase_accepts_the_job_options():
    for command in ("prepare", "train-tokenizer", "pretrain", "evaluate", "fill-mask", "inspect", "run"):
        help_text = invoke(command, "--help").stdout
        for option in ("--job", "--run-dir", "--corpus", "--set"):
            assert option in help_text, f"{command} lacks {option}"


def test_every_command_answers_help():
    """README: `kantai-batch COMMAND --help` lists every option; `launch --help` was an error."""
    from kantai_batch.cli import cli

    for command in sorted(cli.commands):
        assert re.match(rf"Usage: \S+ {command} ", invoke(command, "--help").stdout), command
    # After the command to launch, --help is that command's.
    launched = subprocess.run(
        [sys.executable, "-m", "kantai_batch", "launch", "--nproc-per-node", "1", "pretrain", "--help"],
        capture_output=True, text=True, cwd=ROOT, timeout=120,
    )  # fmt: skip
    assert launched.returncode == 0 and "Usage: kantai-batch pretrain " in launched.stdout, launched.stderr[-2000:]


@pytest.mark.parametrize(
    ("args", "env", "named"),
    [
        (
            ["fill-mask", "--top-k", "0"],
            {},
            "'--top-k': 0 is not in the range x>=1. (see kantai-batch fill-mask --help)",
        ),
        (["--log-level", "loud", "inspect"], {}, "'--log-level': 'loud' is not one of"),
        (["inspect"], {"KANTAI_LOG_LEVEL": "loud"}, "'--log-level': 'loud' is not one of"),
        (["prepare", "--bogus"], {}, "No such option '--bogus'"),
        (["nosuch"], {}, "No such command 'nosuch'"),
        (["pull"], {}, "Missing argument 'URI'. (see kantai-batch pull --help)"),
    ],
)
def test_a_wrong_option_or_argument_is_one_line_naming_it(args, env, named, monkeypatch):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    result = invoke(*args, expect=2)
    assert result.stderr.startswith("kantai-batch: error: ") and result.stderr.count("\n") == 1, result.stderr
    assert named in result.stderr


def test_ctrl_c_ends_a_command_with_130_and_one_line(tmp_path, corpus_file, monkeypatch):
    from kantai_batch import corpus

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(corpus, "prepare", interrupted)
    result = invoke("prepare", "--run-dir", str(tmp_path / "run"), "--corpus", str(corpus_file), expect=130)
    assert result.stderr.strip() == "kantai-batch: interrupted"


def test_run_dir_that_is_a_file(tmp_path):
    (tmp_path / "file").write_text("x")
    result = invoke("prepare", "--run-dir", str(tmp_path / "file"), expect=2)
    assert f"run dir {tmp_path / 'file'} is not a folder" in result.stderr


def test_an_s3_run_dir_with_one_slash_is_refused_not_written_locally(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = invoke("prepare", "--run-dir", "s3:/bucket/run", "--corpus", "unused.txt", expect=2)
    assert result.stderr.strip() == (
        "kantai-batch: error: run dir s3:/bucket/run: unsupported URI (use a local folder or s3://bucket/prefix)"
    )
    assert not (tmp_path / "s3:").exists()


def test_an_empty_run_dir_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = invoke("prepare", "--run-dir", " ", expect=2)
    assert (
        result.stderr.strip()
        == "kantai-batch: error: --run-dir (KANTAI_RUN_DIR) is empty; name a folder or s3://bucket/prefix"
    )
    assert list(tmp_path.iterdir()) == []


def test_unwritable_run_dir_is_one_line(tmp_path, corpus_file):
    import os

    if os.geteuid() == 0:
        # root writes anywhere; a run dir below a file fails the same way for everyone.
        (tmp_path / "blocker").write_text("x")
        run_dir = tmp_path / "blocker" / "run"
    else:
        (tmp_path / "ro").mkdir(mode=0o500)
        run_dir = tmp_path / "ro" / "run"
    result = invoke("prepare", "--run-dir", str(run_dir), "--corpus", str(corpus_file), expect=1)
    assert result.stderr.startswith("kantai-batch: error: ") and len(result.stderr.strip().splitlines()) == 1
    assert "Traceback" not in result.stderr


def test_make_install_is_idempotent():
    if not (ROOT / ".venv" / ".installed").exists():
        pytest.skip("the suite is not running from `make test`'s .venv")
    # `make -q` exits 0 only when the target is up to date, i.e. a second install would do nothing.
    assert subprocess.run(["make", "-q", "install"], cwd=ROOT).returncode == 0


def test_inspect_a_config_without_a_known_architecture(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "roberta", "architectures": ["NoSuchModel"]}')
    result = invoke("inspect", "--model", str(tmp_path), expect=3)
    assert "names no known architecture (NoSuchModel)" in result.stderr


@pytest.mark.slow
def test_corpus_from_the_environment_feeds_prepare_not_evaluate(tmp_path, corpus_file, trained_run, monkeypatch):
    monkeypatch.setenv("KANTAI_CORPUS", str(corpus_file))
    invoke("prepare", "--run-dir", str(tmp_path / "run"))
    assert json.loads((tmp_path / "run" / "corpus" / "stats.json").read_text())["source"] == str(corpus_file)
    metrics = json.loads(invoke("evaluate", "--run-dir", str(trained_run), "--json", *tiny()).stdout)
    assert metrics["corpus"] == str(trained_run / "corpus" / "eval.txt"), "the held-out split, not $KANTAI_CORPUS"


def test_a_finished_phase_leaves_the_process_group(tmp_path, corpus_file):
    # Left to interpreter teardown, gloo's threads can abort a rank that finished (SIGABRT in CI).
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        invoke("prepare", "--run-dir", str(tmp_path / "run"), "--corpus", str(corpus_file))
        assert not dist.is_initialized()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


_RANK = """
import atexit, sys
import torch.distributed as dist
from pathlib import Path

out = Path(sys.argv[1])
if sys.argv[2] == "rank":
    dist.init_process_group("gloo", init_method=f"file://{out / 'rendezvous'}", rank=0, world_size=1)
atexit.register((out / "atexit").touch)

class Teardown:
    # Defaults, not globals: teardown may have cleared the module's globals before this runs.
    def __del__(self, marker=str(out / "teardown"), open=open):
        open(marker, "w").close()

kept_until_teardown = Teardown()
sys.argv = ["kantai-batch", *sys.argv[3:]]
import kantai_batch.cli as cli

if "crash" in out.name:
    def crash(*args, **kwargs):
        raise RuntimeError("a bug")

    cli.load_job = crash
cli.main()
"""


@pytest.mark.parametrize("role", ["rank", "single"])
@pytest.mark.parametrize("outcome", ["success", "config error", "crash"])
def test_a_rank_exits_with_its_code_after_exit_handlers_but_without_interpreter_teardown(
    tmp_path_factory, corpus_file, role, outcome
):
    # A rank's C++ teardown aborted finished ranks now and then (gloo threads kept alive by DDP), and
    # its 134 hid the phase's own exit code: a rank skips that teardown, a single process does not.
    tmp_path = tmp_path_factory.mktemp(outcome.replace(" ", "-"))
    command = [sys.executable, "-c", _RANK, str(tmp_path), role, "prepare", "--run-dir", str(tmp_path / "run")]
    command += ["--corpus", str(corpus_file), *(["--set", "train.max_steps=many"] if outcome == "config error" else [])]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == {"success": 0, "config error": 2, "crash": 1}[outcome], result.stderr
    last_line = result.stderr.strip().splitlines()[-1] if outcome != "success" else ""
    assert {"success": "", "config error": "train.max_steps", "crash": "RuntimeError: a bug"}[outcome] in last_line
    assert (tmp_path / "atexit").exists(), "Python's exit handlers still run"
    assert (tmp_path / "teardown").exists() == (role == "single"), "a rank leaves before interpreter teardown"


@pytest.mark.parametrize(
    ("store", "code", "says"),
    [
        ("bogus://x", 2, "got unsupported URI 'bogus://x'"),
        ("sqlite:///{tmp}/notes.txt", 2, "file is not a database"),
    ],
)
@pytest.mark.parametrize("command", [["models", "kt"], ["promote", "models:/kt/1"], ["pull", "models:/kt/1"]])
def test_a_tracking_store_mlflow_cannot_use_is_one_line(command, store, code, says, tmp_path, monkeypatch):
    (tmp_path / "notes.txt").write_text("not a database\n" * 100)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store.format(tmp=tmp_path))
    extra = ["--out", str(tmp_path / "pulled")] if command[0] == "pull" else []
    result = invoke(*command, *extra, expect=code)
    assert result.stderr.startswith("kantai-batch: error: ") and result.stderr.count("\n") == 1, result.stderr
    assert says in result.stderr
    assert (tmp_path / "notes.txt").read_text() == "not a database\n" * 100


@pytest.mark.parametrize(
    ("refusal", "says"),
    [
        (PermissionError(errno.EACCES, "Permission denied", "/data/run/.corpus.lock"),
         "/data/run/.corpus.lock: Permission denied"),
        (OSError(errno.ENOSPC, "No space left on device"),
         "No space left on device (writing to the run dir {run} or the temporary folder {tmp})"),
    ],
    ids=["named", "disk-full"],
)  # fmt: skip
def test_what_the_machine_refuses_is_one_line_naming_where(tmp_path, corpus_file, monkeypatch, refusal, says):
    """A write that finds the disk full names no file: the error said only "No space left on device"."""
    import tempfile

    from kantai_batch import corpus

    def refused(self, texts):
        raise refusal

    monkeypatch.setattr(corpus._Split, "write", refused)
    run_dir = tmp_path / "run"
    result = invoke("prepare", "--run-dir", str(run_dir), "--corpus", str(corpus_file), expect=1)
    assert result.stderr.strip().splitlines()[-1] == "kantai-batch: error: " + says.format(
        run=run_dir, tmp=tempfile.gettempdir()
    )
    assert not (run_dir / "corpus").exists(), "nothing half-written is committed"


def test_sigterm_as_pid_1_ends_the_command_even_when_it_lands_in_a_finalizer(tmp_path):
    # As PID 1 SIGTERM raises SystemExit wherever the main thread is; inside a __del__ Python drops it.
    script = tmp_path / "pid1.py"
    script.write_text(
        "import os, signal, time\n"
        "from kantai_batch import cli\n"
        "os.getpid = lambda: 1\n"
        "cli._UNWIND_S = 1.0\n"
        "cli._exit_on_sigterm()\n"
        "class Finalized:\n"
        "    def __del__(self):\n"
        "        signal.raise_signal(signal.SIGTERM)\n"
        "        time.sleep(0.01)\n"
        "Finalized()\n"
        "time.sleep(10)\n"
        "print('went on')\n"
    )
    from helpers import ROOT

    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 143, done.stdout + done.stderr
    assert "went on" not in done.stdout


@pytest.mark.parametrize("name", ["", "a/b"])
def test_models_with_a_bad_name_is_a_config_error_before_asking_mlflow(tmp_path, monkeypatch, name: str):
    """'' reached MLflow, whose "Missing value for required parameter 'name'" was exit 3, as for a model
    that is not there, where `register --name ''` is exit 2; 'a/b' showed model 'a', as if it were
    models:/a/b."""
    monkeypatch.chdir(tmp_path)  # MLflow's default local store would be made here
    result = invoke("models", name, expect=2)
    assert result.stderr.strip().startswith(f"kantai-batch: error: NAME {name!r} ") and result.stderr.count("\n") == 1
    assert not (tmp_path / "mlruns").exists() and not (tmp_path / "mlflow.db").exists()


def test_a_reader_that_stops_reading_ends_the_command_quietly(tmp_path):
    """`kantai-batch inspect | head -1` printed "kantai-batch: error: Broken pipe" and exit 1, as if
    something had failed: a closed pipe ends it quietly with SIGPIPE's status, as `yes | head` does."""
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "kantai_batch", "inspect"], cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)  # fmt: skip
    proc.stdout.close()  # before its first line: the reader is gone
    stderr = proc.stderr.read()
    assert proc.wait(timeout=120) == 141, stderr
    assert "error" not in stderr and "Exception ignored" not in stderr, stderr


def test_deepspeeds_cpu_fallback_warning_is_not_shown():
    """Every CPU training printed DeepSpeed's "Setting accelerator to CPU. If you have GPU or other
    accelerator, we were unable to detect it.", although the job does not use DeepSpeed."""
    script = "from kantai_batch.cli import cli; cli(['inspect', '--json'], standalone_mode=False); import deepspeed"
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "Setting accelerator to CPU" not in done.stdout + done.stderr
