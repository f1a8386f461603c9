"""The ``kantai-batch`` command: one Click group, one subcommand per phase.

This layer only parses options, loads the job once and turns user errors into one-line messages with
the exit code of their kind. Phase modules (and torch/transformers with them) are imported inside
the commands, so ``kantai-batch --help`` answers at once.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import json
import logging
import os
import signal
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from kantai_batch import __version__, s3
from kantai_batch.distributed import (
    distributed_state,
    exit_process,
    joined_process_group,
    leave_process_group,
    local_main_first,
)
from kantai_batch.errors import JobConfigError, KantaiError, NotPromotedError, first_line
from kantai_batch.job import Job, load_job
from kantai_batch.phases import phase
from kantai_batch.rundir import RunDir

log = logging.getLogger("kantai_batch")

DEFAULT_RUN_DIR = "runs/kantaibert"
_RESULTS = "kantai.results"
# The local folder the command writes its phases to (a remote run dir's mirror).
_WRITES_TO = "kantai.writes_to"


class _Group(click.Group):
    """Every error one line on stderr, ``kantai-batch: error: …``, with the exit code schedulers act on."""

    def make_context(self, info_name, args, parent=None, **extra) -> click.Context:
        try:
            return super().make_context(info_name, args, parent=parent, **extra)
        except click.exceptions.NoArgsIsHelpError:
            raise  # no command at all: Click's help, as asked
        except click.ClickException as exc:  # the group's own options (--log-level)
            _usage_error(exc)
            raise click.exceptions.Exit(exc.exit_code) from None

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except click.exceptions.NoArgsIsHelpError:
            raise
        except click.ClickException as exc:  # a command's options and arguments
            _usage_error(exc)
            ctx.exit(exc.exit_code)
        except KeyboardInterrupt:
            # Ctrl-C: the shell's code for it, not Click's "Aborted!" and 1. Scratch folders went as the stack
            # unwound; nothing half-written is trusted.
            click.echo("\nkantai-batch: interrupted", err=True)
            ctx.exit(130)
        except KantaiError as exc:
            click.echo(f"kantai-batch: error: {exc}", err=True)
            ctx.exit(exc.exit_code)
        except OSError as exc:
            if isinstance(exc, BrokenPipeError) and _reader_gone():
                # `kantai-batch … | head`: what the reader wanted, it read. Quiet, with the status of a
                # process ended by SIGPIPE, as `yes | head` gives; stdout goes to /dev/null so the
                # interpreter's last flush does not complain either.
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
                ctx.exit(128 + signal.SIGPIPE)
            # The machine refused (permissions, a full disk): name the path, no traceback.
            where = f"{exc.filename}: " if exc.filename else ""
            reason = exc.strerror or first_line(exc)
            if not exc.filename and exc.errno in (errno.ENOSPC, errno.EDQUOT):
                # A write that found the disk full names no file: say where the command writes.
                folder = ctx.meta.get(_WRITES_TO)
                places = [f"the run dir {folder}"] if folder else []
                reason += f" (writing to {' or '.join([*places, f'the temporary folder {tempfile.gettempdir()}'])})"
            click.echo(f"kantai-batch: error: {where}{reason}", err=True)
            ctx.exit(1)


def _reader_gone() -> bool:
    """Whether stdout is a pipe whose reader closed it."""
    import select

    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & select.POLLERR for _, events in poller.poll(0))
    except (OSError, ValueError, AttributeError):  # no real stdout (a test's capture), or no poll
        return False


def _usage_error(exc: click.ClickException) -> None:
    message = " ".join(exc.format_message().split())
    context = getattr(exc, "ctx", None)
    command = " ".join(["kantai-batch", *(context.command_path.split()[1:] if context is not None else [])])
    click.echo(f"kantai-batch: error: {message} (see {command} --help)", err=True)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.version_option(__version__, prog_name="kantai-batch")
@click.option(
    "--log-level",
    envvar="KANTAI_LOG_LEVEL",
    type=click.Choice(["debug", "info", "warning", "error"], case_sensitive=False),
    default="info",
    help="How much to log to stderr.",
)
def cli(log_level: str) -> None:
    """Pretrain transformer language models from scratch, one phase per command.

    Phases read and write one run dir: prepare -> corpus/, train-tokenizer -> tokenizer/,
    tokenize -> tokens/, pretrain -> checkpoints/ and model/, evaluate -> eval/. `run` does them all in order.
    """
    logging.basicConfig(
        level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    # Everything is trained from scratch: nothing may wait on the Hugging Face Hub, which batch
    # pods usually cannot reach.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    # DeepSpeed, which the Trainer imports whenever it is installed, warns "Setting accelerator to CPU. If
    # you have GPU or other accelerator, we were unable to detect it." on every machine without a GPU:
    # on a laptop, which has none to detect, that reads like a fault. Its other messages stay.
    logging.getLogger("DeepSpeed").addFilter(_not_the_cpu_fallback)


def _not_the_cpu_fallback(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith("Setting accelerator to CPU.")


def emit(text: str) -> None:
    """Print a result (predictions, metrics, a table) to the command's real stdout."""
    click.echo(text, file=click.get_current_context().meta.get(_RESULTS))


def job_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """--job, --run-dir, --corpus and --set, resolved into ``job`` and ``run`` arguments."""

    @click.option(
        "--job",
        "job_file",
        type=click.Path(dir_okay=False, path_type=Path),
        envvar="KANTAI_JOB",
        help="Job YAML file; without one the embedded KantaiBERT defaults apply.",
    )
    @click.option(
        "--run-dir",
        envvar="KANTAI_RUN_DIR",
        default=DEFAULT_RUN_DIR,
        help="Folder holding every phase's outputs.",
    )
    @click.option(
        "--corpus",
        "corpus",
        envvar="KANTAI_CORPUS",
        help="Corpus file, folder, glob, http(s) URL or s3:// URI (object or prefix); overrides corpus.source.",
    )
    @click.option(
        "--set",
        "overrides",
        multiple=True,
        metavar="KEY=VALUE",
        help="Override a job field, e.g. --set train.max_steps=30 (repeatable).",
    )
    @functools.wraps(func)
    def wrapper(job_file: Path | None, run_dir: str, corpus: str | None, overrides: tuple[str, ...], **kwargs: Any):
        job = load_job(job_file, overrides, corpus=corpus)
        if not run_dir.strip():  # not the working directory by accident, which would fill it with phases
            raise JobConfigError("--run-dir (KANTAI_RUN_DIR) is empty; name a folder or s3://bucket/prefix")
        run = RunDir.from_uri(run_dir)
        click.get_current_context().meta[_WRITES_TO] = run.root
        if run.remote is not None:
            # Rejected credentials or a missing bucket end the command here, before it writes anything.
            s3.check_access(run.remote)
        # Under torchrun: join the process group now, with the job's collective timeout.
        distributed_state(job.train.collective_timeout_s)
        # stdout carries results only: what the libraries print (the Trainer's log lines) goes
        # to stderr with the logs and progress bars.
        click.get_current_context().meta[_RESULTS] = sys.stdout
        with contextlib.redirect_stdout(sys.stderr):
            result = func(job=job, run=run, **kwargs)
        # Only after success: a rank that failed may leave the others inside a collective, and
        # destroying the group then waits on them (torchtitan learned the same).
        leave_process_group()
        return result

    return wrapper


tracking_option = click.option(
    "--tracking/--no-tracking",
    envvar="KANTAI_TRACKING",
    default=True,
    help="Log the training to MLflow (MLFLOW_TRACKING_URI, else MLflow's local default store).",
)


def sampling_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """--max-new-tokens, --temperature, --top-k, --top-p, --seed over the job's generate section, as ``sampling``."""

    @click.option("--max-new-tokens", type=int, help="Tokens to generate at most [default: generate.max_new_tokens].")
    @click.option("--temperature", type=float, help="0 is greedy, above 0 samples [default: generate.temperature].")
    @click.option(
        "--top-k", type=int, help="Sample among the k most likely tokens; 0 is off [default: generate.top_k]."
    )
    @click.option("--top-p", type=float, help="Nucleus sampling threshold; 1 is off [default: generate.top_p].")
    @click.option("--seed", type=int, help="Sampling seed [default: generate.seed].")
    @functools.wraps(func)
    def wrapper(job: Job, **kwargs: Any):
        given = {name: kwargs.pop(name) for name in ("max_new_tokens", "temperature", "top_k", "top_p", "seed")}
        # generate has --num-return-sequences; chat answers with one reply, whatever the job says.
        given["num_return_sequences"] = kwargs.pop("num_return_sequences") if "num_return_sequences" in kwargs else 1
        return func(job=job, sampling=job.generate.with_overrides(**given), **kwargs)

    return wrapper


model_option = click.option(
    "--model",
    "model_uri",
    metavar="URI",
    help="Model folder, s3:// URI or models:/NAME@ALIAS (or /VERSION) [default: RUN/model].",
)


def _model(model_uri: str | None, run: RunDir) -> Path:
    """The local folder of --model (S3 and registry models are downloaded and verified), else RUN/model."""
    from kantai_batch.registry import cached_pull, is_registry_uri
    from kantai_batch.sources import cache_dir, local_model

    if model_uri and is_registry_uri(model_uri):
        return cached_pull(model_uri, cache_dir())
    if model_uri:
        return local_model(model_uri)
    return run.require(run.model, "model", "pretrain")


@cli.command()
@job_options
def prepare(job: Job, run: RunDir) -> None:
    """Read, decode and clean the raw corpus; split it into RUN/corpus/{train,eval}.txt."""
    phase("prepare").run(job, run)


@cli.command("train-tokenizer")
@job_options
def train_tokenizer(job: Job, run: RunDir) -> None:
    """Train a byte-level BPE tokenizer on the train split into RUN/tokenizer/."""
    phase("train-tokenizer").run(job, run)


@cli.command()
@job_options
@click.option(
    "--workers",
    type=click.IntRange(min=1),
    help="Processes that tokenize and write the shards [default: data.tokenize_workers, else by corpus size].",
)
@click.option(
    "--parts",
    type=click.IntRange(min=1),
    default=1,
    envvar="KANTAI_TOKENIZE_PARTS",
    help="Processes or pods that each make a part of the tokens; the one that completes them commits tokens/.",
)
@click.option(
    "--part",
    type=click.IntRange(min=0),
    default=0,
    envvar="JOB_COMPLETION_INDEX",
    help="Which part this process makes, 0 to parts-1 [default: a Kubernetes Indexed Job's pod index, else 0].",
)
def tokenize(job: Job, run: RunDir, workers: int | None, parts: int, part: int) -> None:
    """Tokenize both splits once into RUN/tokens/{train,eval}/, memory-mapped Arrow shards that pretrain reads."""
    phase("tokenize").run(job, run, workers=workers, part=part, parts=parts)


@cli.command()
@job_options
@tracking_option
def pretrain(job: Job, run: RunDir, tracking: bool) -> None:
    """Pretrain the model from scratch (or from train.init_from); resumes from the newest complete checkpoint."""
    phase("pretrain").run(job, run, track=tracking)


@cli.command()
@job_options
@model_option
@click.option("--json", "as_json", is_flag=True, help="Print the metrics as JSON.")
def evaluate(job: Job, run: RunDir, model_uri: str | None, as_json: bool) -> None:
    """Eval loss, perplexity and token accuracy on the held-out split (or --corpus)."""
    # --corpus names the text to evaluate on here, not a corpus to prepare.
    # Only a --corpus given on the command line: KANTAI_CORPUS names what prepare reads, and must
    # not silently replace the held-out split.
    ctx = click.get_current_context()
    given = ctx.get_parameter_source("corpus") == click.core.ParameterSource.COMMANDLINE
    explicit_corpus = ctx.params.get("corpus") if given else None
    # Under `launch evaluate` every rank runs this: one per node downloads an s3:// or registry model
    # into the shared cache, the others then find it complete (two at once would undo each other).
    with local_main_first():
        model_dir = _model(model_uri, run)
    metrics = phase("evaluate").run(job, run, model_dir=model_dir, corpus=explicit_corpus)
    _print_metrics(metrics, as_json)


@cli.command("fill-mask")
@job_options
@model_option
@click.option("--top-k", type=click.IntRange(min=1), help="Predictions per mask [default: infer.top_k].")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list of {token_str, score, sequence}.")
@click.argument("text", required=False)
def fill_mask(job: Job, run: RunDir, model_uri: str | None, top_k: int | None, as_json: bool, text: str | None) -> None:
    """Fill the <mask> in TEXT [default: infer.fill_mask_text] with the model's predictions."""
    # An empty TEXT given is refused as having no mask, not replaced by the job's.
    text = job.infer.fill_mask_text if text is None else text
    _show_fill_mask(_model(model_uri, run), text, top_k or job.infer.top_k, as_json)


@cli.command()
@job_options
@click.option(
    "--model", "model_uri", metavar="URI", help="Inspect a saved model (folder or s3:// URI) instead of the job's."
)
@click.option("--json", "as_json", is_flag=True, help="Print the table as JSON.")
def inspect(job: Job, run: RunDir, model_uri: str | None, as_json: bool) -> None:
    """Parameter count, tensors, and every tensor's name, shape and share of the total.

    With model.vocab_size auto, the job's model is sized for RUN/tokenizer once it is trained, and for
    the tokenizer.vocab_size limit before that.
    """
    from kantai_batch.model import model_for_job, parameter_rows, saved_model_skeleton

    if model_uri:
        model = saved_model_skeleton(_model(model_uri, run))
    else:
        model = model_for_job(job, _tokenizer_size(job, run))
    rows = parameter_rows(model)
    total = sum(row.count for row in rows)
    if as_json:
        tensors = [{"name": r.name, "shape": list(r.shape), "count": r.count, "share": r.count / total} for r in rows]
        emit(json.dumps({"parameters": total, "tensors": len(rows), "table": tensors}, indent=2))
        return
    width = max(len(row.name) for row in rows)
    for row in rows:
        shape = "x".join(str(dim) for dim in row.shape)
        emit(f"{row.name:<{width}}  {shape:>12}  {row.count:>12,}  {row.count / total:7.2%}")
    emit(f"{total:,} parameters in {len(rows)} tensors")


def _tokenizer_size(job: Job, run: RunDir) -> int:
    if job.model.vocab_size != "auto":
        return 0
    if run.is_complete(run.tokenizer):
        from kantai_batch.model import load_tokenizer

        return len(load_tokenizer(run.require(run.tokenizer, "tokenizer", "train-tokenizer")))
    log.info(
        "inspect: model.vocab_size auto, no trained tokenizer in %s: sized for tokenizer.vocab_size", run.tokenizer
    )
    return job.tokenizer.vocab_size


@cli.command()
@job_options
@model_option
@click.option(
    "--num-return-sequences",
    type=int,
    help="Continuations to generate; more than one needs sampling [default: generate.num_return_sequences].",
)
@sampling_options
@click.option(
    "--raw",
    is_flag=True,
    help="Continue the prompt as given, even with a model trained on conversations (no reply separator).",
)
@click.option("--json", "as_json", is_flag=True, help='Print {"prompt", "text", "new_tokens"} as JSON.')
@click.argument("prompt", required=False)
def generate(
    job: Job, run: RunDir, model_uri: str | None, sampling, raw: bool, as_json: bool, prompt: str | None
) -> None:
    """Continue PROMPT [default: generate.prompt] with a causal LM; stops at </s>."""
    from kantai_batch.generate import Generator

    generator = Generator.load(_model(model_uri, run))
    # An empty PROMPT given is refused as empty, not replaced by the job's.
    prompt = job.generate.prompt if prompt is None else prompt
    _show_generation(generator(prompt, sampling, as_message=not raw), as_json)


@cli.command()
@job_options
@model_option
@sampling_options
@click.option("--serve", is_flag=True, help="Serve a web page with a prompt box instead of a terminal session.")
@click.option("--host", default="127.0.0.1", help="Address to serve on (with --serve).")
@click.option("--port", type=click.IntRange(0, 65535), default=7860, help="Port to serve on; 0 picks a free one.")
def chat(job: Job, run: RunDir, model_uri: str | None, sampling, serve: bool, host: str, port: int) -> None:
    """Talk to a causal LM: prompt, answer, repeat (Ctrl-D leaves), or a web page with --serve."""
    from kantai_batch.chat import bind, repl, serve_page
    from kantai_batch.generate import Generator

    results = click.get_current_context().meta[_RESULTS]
    if not serve:
        repl(Generator.load(_model(model_uri, run), command="chat"), sampling, stdin=sys.stdin, stdout=results)
        return
    with bind(host, port) as server:
        serve_page(server, Generator.load(_model(model_uri, run), command="chat"), sampling, announce=results)


@cli.command()
@job_options
@click.option(
    "--steps",
    type=click.IntRange(min=2),
    help="Training steps per configuration, its schedule planned for them [default: 10; with --seconds, each "
    "configuration's own plan].",
)
@click.option(
    "--seconds",
    type=click.FloatRange(min=1),
    help="Stop each configuration after this much training time (evaluations not counted).",
)
@click.option(
    "--baseline",
    type=click.Choice(["recipe", "run_mlm", "run_clm"]),
    help="Also train a baseline: the notebook recipe, or transformers' run_mlm.py (run_clm.py for a causal LM job) "
    "as a skilled user runs it.",
)
@click.option(
    "--eval-every", type=click.FloatRange(min=1),
    help="Evaluate on the held-out text every this many training seconds with --seconds, else every this many steps.",
)  # fmt: skip
@click.option(
    "--variant", "variants", multiple=True, metavar="NAME:KEY=VALUE[,KEY=VALUE]",
    help="Also train the job with these overrides, under NAME (repeatable).",
)  # fmt: skip
@click.option(
    "--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), default=Path("bench/results"),
    help="Folder for the JSON record.",
)  # fmt: skip
@click.option("--json", "as_json", is_flag=True, help="Print the JSON record instead of the table.")
def bench(
    job: Job,
    run: RunDir,
    steps: int | None,
    seconds: float | None,
    baseline: str | None,
    eval_every: float | None,
    variants: tuple[str, ...],
    out_dir: Path,
    as_json: bool,
) -> None:
    """Training throughput (tokens/s, step time, MFU, peak memory) and held-out loss, vs a baseline and variants.

    The corpus and tokenizer come from the run dir, prepared there first if needed.
    """
    from kantai_batch.bench import bench as bench_phase
    from kantai_batch.bench import format_table

    if steps is None and seconds is None:
        steps = 10
    record = bench_phase(
        job,
        run,
        steps=steps,
        seconds=seconds,
        baseline=baseline,
        out_dir=out_dir,
        eval_every=eval_every,
        variants=variants,
    )
    emit(json.dumps(record, indent=2) if as_json else format_table(record) + f"\nwritten to {record['path']}")


@cli.command()
@job_options
@model_option
@click.option("--name", envvar="KANTAI_MODEL_NAME", required=True, help="Registered model name.")
@click.option("--alias", envvar="KANTAI_MODEL_ALIAS", help="Alias to point at the new version, e.g. champion.")
def register(job: Job, run: RunDir, model_uri: str | None, name: str, alias: str | None) -> None:
    """Log a trained model to MLflow as a transformers model and register a new version of it."""
    from kantai_batch.registry import register as register_model
    from kantai_batch.registry import require_alias, require_model_name

    require_model_name(name, "--name")
    if alias is not None:
        require_alias(alias, "--alias")
    emit(json.dumps(register_model(_model(model_uri, run), name, alias), indent=2))


@cli.command()
@click.argument("uri")
@click.option(
    "--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path), help="Folder to write."
)
def pull(uri: str, out_dir: Path) -> None:
    """Download models:/NAME/VERSION or models:/NAME@ALIAS as a model folder the other commands load."""
    from kantai_batch.manifest import is_complete
    from kantai_batch.registry import pull as pull_model

    # The pulled model replaces the folder whole. Replacing the one a shell stands in leaves that shell
    # in a deleted directory that looks empty.
    if Path.cwd().resolve().is_relative_to(out_dir.resolve()):
        raise JobConfigError(
            f"--out {out_dir} holds the working directory; name a folder inside it, such as --out model"
        )
    # Fine for a model folder pulled or trained before, not for a run dir, a run's corpus or tokenizer
    # (complete folders too), or the user's other files.
    if (
        out_dir.is_dir()
        and any(out_dir.iterdir())
        and not (is_complete(out_dir) and (out_dir / "config.json").is_file())
    ):
        raise JobConfigError(f"--out {out_dir} holds files that are not a model folder; name a new or empty folder")
    results = sys.stdout
    with contextlib.redirect_stdout(sys.stderr):
        pull_model(uri, out_dir)
    click.echo(str(out_dir), file=results)


@cli.command("run")
@job_options
@tracking_option
@click.option(
    "--register",
    "register_as",
    metavar="NAME",
    help="Score the model and NAME@champion on the benchmark, register it, and make it champion only if better.",
)
@click.option(
    "--fail-if-not-promoted",
    is_flag=True,
    help="With --register: exit 5 when the new version is not promoted (it is still registered, as challenger).",
)
def run_all(job: Job, run: RunDir, tracking: bool, register_as: str | None, fail_if_not_promoted: bool) -> None:
    """Every phase in order, skipping those whose output is complete; then fill-mask or generate."""
    from kantai_batch.distributed import is_main_process
    from kantai_batch.pipeline import run_pipeline

    outcome = None
    if fail_if_not_promoted and register_as is None:
        raise JobConfigError("--fail-if-not-promoted needs --register NAME")
    if register_as is not None:  # an empty name (an unset variable) is an error, not "do not register"
        from kantai_batch.promotion import retrain
        from kantai_batch.registry import require_model_name

        require_model_name(register_as, "--register")
        outcome = retrain(job, run, register_as, track=tracking)
    else:
        run_pipeline(job, run, track=tracking)
    if not is_main_process():
        return
    if outcome is not None:
        emit(outcome.line)
        if not outcome.trained:
            return
    if job.task == "clm":
        from kantai_batch.generate import Generator

        generation = Generator.load(_model(None, run))(job.generate.prompt, job.generate)
        _show_generation(generation, as_json=False)
    else:
        _show_fill_mask(_model(None, run), job.infer.fill_mask_text, job.infer.top_k, as_json=False)
        _show_probes(run)
    if outcome is not None and fail_if_not_promoted and not outcome.promoted:
        raise NotPromotedError(outcome.line)


@cli.command()
@click.argument("uri")
@click.option("--alias", default="champion", help="The alias to move to the version URI names.")
def promote(uri: str, alias: str) -> None:
    """Move an alias to models:/NAME/VERSION by hand (tagged with the command and the previous holder)."""
    from kantai_batch.promotion import promote as move

    results = sys.stdout
    with contextlib.redirect_stdout(sys.stderr):
        line = move(uri, alias)
    click.echo(line, file=results)


@cli.command()
@click.argument("name")
@click.option("--json", "as_json", is_flag=True, help="Print the versions as JSON.")
def models(name: str, as_json: bool) -> None:
    """The versions of registered model NAME: aliases, benchmark loss, corpus checksum."""
    from kantai_batch.promotion import format_table, model_table
    from kantai_batch.registry import registered_name, require_model_name

    name = registered_name(name)  # a models:/ URI, as pull and promote take, names its model
    require_model_name(name, "NAME")  # an empty one reached MLflow, which called it a missing value (exit 3)
    results = sys.stdout
    with contextlib.redirect_stdout(sys.stderr):
        rows = model_table(name)
    click.echo(json.dumps(rows, indent=2) if as_json else "\n".join(format_table(rows)), file=results)


def _show_probes(run: RunDir) -> None:
    """The probe hits evaluate recorded, after the fill-mask answers."""
    from kantai_batch.probes import format_quality

    metrics_file = run.eval_metrics
    if metrics_file.is_file():
        quality = json.loads(metrics_file.read_text(encoding="utf-8")).get("quality", {})
        for line in format_quality(quality)[1:]:  # the fill-mask line is shown above in full
            emit(line)


@cli.command(
    "launch",
    context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False, "help_option_names": []},
)
@click.argument("arguments", nargs=-1, type=click.UNPROCESSED)
@click.pass_context
def launch_command(ctx: click.Context, arguments: tuple[str, ...]) -> None:
    """[TORCHRUN OPTIONS] COMMAND [ARGS]: COMMAND on every device of this node, under torchrun.

    Nodes, processes per node, rank and rendezvous come from torchrun's options (`torchrun --help`)
    or their PET_* environment variables. Exits with the first failed process's exit code (torchrun's
    own is 1), so a scheduler can tell a config error (2) or a preemption (143) from a crash.
    """
    from kantai_batch.launch import launch

    split = next((i for i, a in enumerate(arguments) if a in cli.commands and a != "launch"), None)
    # Options after COMMAND are COMMAND's (its own --help included); before it, torchrun's or ours.
    if {"--help", "-h"} & set(arguments[:split]):
        emit(ctx.get_help())
        return
    if split is None:
        raise JobConfigError(f"launch: name the command to run, one of {', '.join(sorted(cli.commands))}")
    sys.exit(launch(list(arguments[:split]), list(arguments[split:])))


@cli.command("render-k8s")
@click.option(
    "--overlay",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("k8s/overlays/gpu"),
    help="The kustomize overlay of the cluster.",
)
@click.option("--run-id", required=True, help="Suffix of the Jobs' names: 1-20 lowercase letters, digits or '-'.")
@click.option(
    "--phase",
    "phases",
    multiple=True,
    help="Only this phase's Job (repeatable), or retrain for the CronJob [default: every phase's Job].",
)
@click.option("--nodes", type=int, default=1, help="Pods of the pretrain Indexed Job.")
@click.option("--gpus", type=int, default=1, help="Processes (GPUs) per pretrain pod.")
@click.option("--tokenize-pods", type=int, default=1, help="Pods of the tokenize Indexed Job, each making a part.")
@click.option("--job", "job_file", help="Job file inside the image [default: the overlay's KANTAI_JOB].")
@click.option("--run-dir", help="Run dir, s3://bucket/prefix [default: the overlay's KANTAI_RUN_DIR].")
@click.option("--corpus", help="Corpus source [default: the job's corpus.source].")
@click.option("--image", help="NAME:TAG instead of the overlay's pinned image.")
@click.option("--queue", help="Kueue LocalQueue admitting the Jobs (label kueue.x-k8s.io/queue-name) [default: none].")
@click.option("--namespace", help="Namespace of every manifest [default: the overlay's].")
def render_k8s(overlay: Path, run_id: str, phases: tuple[str, ...], nodes: int, gpus: int, tokenize_pods: int,
               job_file: str | None, run_dir: str | None, corpus: str | None, image: str | None,
               queue: str | None, namespace: str | None) -> None:  # fmt: skip
    """Print the Kubernetes manifests of one submission (for `kubectl apply -f -`)."""
    from kantai_batch.submission import PHASES, Submission, render

    submission = Submission(
        overlay=overlay, run_id=run_id, nodes=nodes, gpus=gpus, tokenize_pods=tokenize_pods, job=job_file,
        run_dir=run_dir, corpus=corpus, image=image, queue=queue, namespace=namespace,
    )  # fmt: skip
    emit(render(submission, phases or PHASES).rstrip("\n"))


def _show_generation(generation, as_json: bool) -> None:
    if as_json:
        emit(json.dumps(generation.as_json(), indent=2, ensure_ascii=False))
        return
    for index, text in enumerate(generation.texts, start=1):
        if len(generation.texts) > 1:
            emit(f"--- {index} ({generation.new_tokens[index - 1]} new tokens)")
        emit(text)


def _show_fill_mask(model_dir: Path, text: str, top_k: int, as_json: bool) -> None:
    from kantai_batch.infer import fill_mask as fill_mask_predictions

    per_mask = fill_mask_predictions(model_dir, text, top_k)
    if as_json:
        emit(json.dumps(per_mask[0] if len(per_mask) == 1 else per_mask, indent=2, ensure_ascii=False))
        return
    emit(text)
    for index, candidates in enumerate(per_mask, start=1):
        if len(per_mask) > 1:
            emit(f"mask {index}:")
        for rank, candidate in enumerate(candidates, start=1):
            emit(f"  {rank}. {candidate['token_str']!r:<16} {candidate['score']:.4f}  {candidate['sequence']}")


def _print_metrics(metrics: dict[str, Any], as_json: bool) -> None:
    if as_json:
        emit(json.dumps(metrics, indent=2))
        return
    from kantai_batch.probes import format_quality

    for key, value in metrics.items():
        if key != "quality":
            emit(f"{key}: {value:.4f}" if isinstance(value, float) else f"{key}: {value}")
    for line in format_quality(metrics.get("quality", {})):
        emit(line)


def main() -> None:
    _exit_on_sigterm()
    try:
        cli(prog_name="kantai-batch")
    except SystemExit as exc:
        if joined_process_group():
            exit_process(_exit_code(exc))
        raise
    except Exception:
        # A crash (a peer's lost connection, a bug) reports as Python would, with Python's exit code.
        if joined_process_group():
            sys.excepthook(*sys.exc_info())
            exit_process(1)
        raise


def _exit_on_sigterm() -> None:
    """As a container's PID 1, SIGTERM ends any command with 143, unwinding (scratch folders go,
    nothing half-committed stays).

    There (the image's entrypoint) Python would otherwise ignore it: a drained pod
    of any phase but pretrain (which checkpoints on it) waited out its grace period and was killed,
    137, which the pod failure policy counts as a failure. Handlers installed later (pretrain's,
    torchrun's, bench's) replace this one while they run."""
    # Only there: elsewhere the default ends the process at once, even inside native code (a rank
    # waiting in a collective, a tokenizer training in Rust), where a Python handler would wait for it.
    if os.getpid() == 1 and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _exit_unwinding)


# How long the unwinding after SIGTERM may take before the process ends anyway.
_UNWIND_S = 20.0


def _exit_unwinding(signum: int, frame: Any) -> None:
    """Raise SystemExit(128 + signum) where the main thread is. Raised inside a finalizer (a ``__del__``
    the garbage collector runs, a weakref callback) Python prints it as ignored and the command goes on
    as if no signal came, until the grace period's SIGKILL: a backstop ends the process then."""
    import threading

    backstop = threading.Timer(_UNWIND_S, os._exit, (128 + signum,))
    backstop.daemon = True
    backstop.start()
    sys.exit(128 + signum)


def _exit_code(exc: SystemExit) -> int:
    """The status the interpreter would exit with for ``exc``: 0 for None, 1 for a message."""
    if exc.code is None:
        return 0
    if isinstance(exc.code, int):
        return exc.code
    print(exc.code, file=sys.stderr)
    return 1
