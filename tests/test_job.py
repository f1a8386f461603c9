from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel

from helpers import ROOT, invoke
from kantai_batch.errors import JobConfigError
from kantai_batch.job import TWCS_FIELDS, Job, load_job


def test_shipped_job_file_is_the_embedded_defaults():
    assert load_job(ROOT / "jobs" / "kantaibert.yaml") == load_job(None) == Job()


def test_shipped_job_file_lists_every_key_a_masked_lm_job_reads():
    listed = yaml.safe_load((ROOT / "jobs" / "kantaibert.yaml").read_text())
    customer_support_only = {("corpus", name) for name in TWCS_FIELDS} | {("generate", "*")}
    missing = [
        f"{section}.{name}"
        for section, field in Job.model_fields.items()
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)
        for name in field.annotation.model_fields
        if name not in (listed.get(section) or {})
        and (section, name) not in customer_support_only
        and (section, "*") not in customer_support_only
    ]
    assert not missing, f"jobs/kantaibert.yaml does not list {', '.join(missing)}"


def test_overrides_are_typed_by_the_schema():
    job = load_job(None, ["train.learning_rate=1e-4", "train.max_steps=30", "data.mode=line_by_line", "name=2024"])
    assert job.train.learning_rate == pytest.approx(1e-4)
    assert job.train.max_steps == 30
    assert job.data.mode == "line_by_line"
    assert job.name == "2024"


def test_corpus_option_overrides_the_source(tmp_path: Path):
    job_file = tmp_path / "job.yaml"
    job_file.write_text("corpus:\n  source: a.txt\n  encoding: cp1252\n")
    job = load_job(job_file, corpus="b.txt")
    assert (job.corpus.source, job.corpus.encoding) == ("b.txt", "cp1252")


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["model.hiden_size=64"], "model.hiden_size: unknown key"),
        (["model.hidden_size=wide"], "model.hidden_size: Input should be a valid integer"),
        (["train.mlm_probability=1.5"], "train.mlm_probability"),
        (["data.mode=sentences"], "data.mode"),
        (["corpus.encoding=klingon"], "unknown encoding 'klingon'"),
        (["corpus.encoding=base64"], "'base64' is not a text encoding"),
        (["corpus.encoding=idna"], "'idna' cannot read text with bad bytes in it"),
        (["name="], "name: must be non-empty"),
        (["name=runs/kant"], "got 'runs/kant'"),
        (['tokenizer.special_tokens=["<s>","<s>","</s>","<unk>","<mask>"]'], "the five special tokens must differ"),
        (['tokenizer.special_tokens=["<s>"," ","</s>","<unk>","<mask>"]'], "each special token must be non-empty"),
        (["generate.seed=-1"], "generate.seed: Input should be greater than or equal to 0"),
        (["model.hidden_size=100"], "hidden_size 100 is not a multiple of num_attention_heads 12"),
        (["data.block_size=600"], "data.block_size 600 needs model.max_position_embeddings of at least 602"),
        # RoBERTa's positions start after the padding index: 514 hold a block of 512, not of 513.
        (["data.block_size=513"], "data.block_size 513 needs model.max_position_embeddings of at least 515"),
        (["infer.fill_mask_text=no mask here"], "infer.fill_mask_text needs exactly one <mask> token, has 0"),
        (["infer.fill_mask_text=<mask> and <mask>."], "infer.fill_mask_text needs exactly one <mask> token, has 2"),
        (["train"], "expected dotted.key=value"),
        ([".x=5"], "--set '.x=5': expected dotted.key=value"),
        (["train..seed=5"], "--set 'train..seed=5': expected dotted.key=value"),
        (["model=3"], "model: Input should be a valid dictionary"),
        (["train.learning_rate=.inf"], "train.learning_rate: Input should be a finite number"),
        (["register.min_improvement=1.5"], "register.min_improvement: Input should be less than 1"),
        # YAML's true is not 1: a one-layer model, a learning rate of 1.
        (["model.num_hidden_layers=true"], "model.num_hidden_layers: expects a number, not a boolean"),
        (["train.learning_rate=false"], "train.learning_rate: expects a number, not a boolean"),
        (["model.vocab_size=true"], "model.vocab_size: expects a number, not a boolean"),
        (["train.max_steps=yes"], "train.max_steps: expects a number, not a boolean"),
        # Too few rows for the bytes and the special tokens (1 failed inside torch, a traceback).
        (["model.vocab_size=1"], "Input should be greater than or equal to 261"),
    ],
)
def test_invalid_values_name_the_key(overrides: list[str], message: str):
    with pytest.raises(JobConfigError, match=re.escape(message)):
        load_job(None, overrides)


def test_the_longest_block_the_default_positions_hold_loads():
    assert load_job(None, ["data.block_size=512"]).data.block_size == 512 == Job().model.max_position_embeddings - 2


def test_bad_yaml_is_one_line_naming_file_and_line(tmp_path: Path):
    job_file = tmp_path / "broken.yaml"
    job_file.write_text("name: x\nmodel:\n  hidden_size: [64\n")
    result = invoke("inspect", "--job", str(job_file), expect=2)
    error = result.stderr.strip()
    assert len(error.splitlines()) == 1
    assert str(job_file) in error and "not valid YAML at line" in error


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("- a\n- b\n", "must be a mapping of sections"),
        ("model:\n  hidden: 3\n", "model.hidden: unknown key"),
        ("", "has no settings (leave out --job for the embedded defaults)"),
        ("# train:\n#   max_steps: 3\n", "has no settings"),
    ],
)
def test_job_file_shape_errors(tmp_path: Path, content: str, message: str):
    job_file = tmp_path / "job.yaml"
    job_file.write_text(content)
    result = invoke("inspect", "--job", str(job_file), expect=2)
    assert message in result.stderr and "Traceback" not in result.stderr


def test_missing_job_file_is_an_error(tmp_path: Path):
    result = invoke("prepare", "--job", str(tmp_path / "nope.yaml"), "--run-dir", str(tmp_path), expect=2)
    assert f"job file {tmp_path / 'nope.yaml'} does not exist" in result.stderr


def test_unknown_set_key_is_an_error_at_the_cli(tmp_path: Path):
    result = invoke("prepare", "--run-dir", str(tmp_path), "--set", "train.max_step=3", expect=2)
    assert "train.max_step: unknown key" in result.stderr
    assert not (tmp_path / "corpus").exists()


def test_readme_documents_every_job_field():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    for section_name, section in Job.model_fields.items():
        if isinstance(section.default, BaseModel):
            for field in type(section.default).model_fields:
                assert f"`{section_name}.{field}`" in readme, f"README does not document {section_name}.{field}"
        else:
            assert f"`{section_name}`" in readme, f"README does not document {section_name}"


def test_the_settings_a_retraining_compares_are_those_that_shape_the_model():
    from kantai_batch.fingerprint import settings_digest

    base = settings_digest(load_job(None))
    # Where the corpus is read from, what is shown and how the new model is judged train the same model.
    for same in (
        "corpus.source=elsewhere.txt",
        "eval.benchmark=b.txt",
        "register.min_improvement=0.1",
        "infer.top_k=3",
        "train.preemption_grace_s=30",  # bookkeeping: how the training logs, saves and waits
        "train.save_steps=100",
    ):
        assert settings_digest(load_job(None, [same])) == base, same
    for changed in ("train.learning_rate=3e-4", "tokenizer.vocab_size=3000", "data.eval_fraction=0.2",
                    "train.init_from=models:/m@champion", "model.num_hidden_layers=4",
                    "train.max_steps=7"):  # fmt: skip
        assert settings_digest(load_job(None, [changed])) != base, changed


@pytest.mark.parametrize(
    ("base", "unread", "read"),
    [
        # Read only by warmup_stable_decay.
        ([], "train.decay_ratio=0.5", "train.lr_scheduler=warmup_stable_decay"),
        # Replaced by warmup_steps.
        (["train.warmup_steps=5"], "train.warmup_ratio=0.3", "train.warmup_steps=6"),
        # Read only by mimetic_local.
        (["train.attention_init=mimetic"], "train.local_window_gain=1.4", "train.attention_init=random"),
        # A causal LM masks nothing.
        (["task=clm"], "train.mlm_probability=0.5", "train.learning_rate=1e-3"),
        (["task=clm"], "train.sparse_prediction=false", "train.seed=3"),
        (["task=clm"], "eval.mlm_probability=0.2", "eval.seed=3"),
    ],
)
def test_a_field_its_other_settings_leave_unread_redoes_nothing(base: list[str], unread: str, read: str):
    """Changing a field the job does not read (a decay share under a linear schedule, a causal LM's
    masking rate) redid the phases reading its section and started the training over."""
    from kantai_batch.fingerprint import checkpoint_lineage, fingerprint_of, settings_digest

    class NoRun:  # the run's folders do not enter into it here
        marker = marker_as_read = staticmethod(lambda folder: None)
        tokenizer = tokens = None

    def digests(*overrides: str) -> list[str]:
        job = load_job(None, [*base, *overrides])
        phases = [fingerprint_of(job, name) for name in ("tokenize", "pretrain")]
        return [*phases, checkpoint_lineage(job, NoRun()), settings_digest(job)]

    assert digests(unread) == digests()
    assert digests(read) != digests()


@pytest.mark.parametrize("folder", ["tokenizer", "tokens"])
def test_a_checkpoint_of_other_tokens_or_another_tokenizer_is_of_another_lineage(folder: str):
    """Tokens redone (a grown corpus in the same run dir) or a new tokenizer: the old checkpoints trained on
    other samples, and resuming one would mix two trainings. The lineage follows those folders' files."""
    from kantai_batch.fingerprint import checkpoint_lineage

    class Run:  # a run's folders, by their markers' file checksums
        tokenizer, tokens = "tokenizer", "tokens"

        def __init__(self, markers: dict[str, dict]) -> None:
            self.markers = markers

        def marker(self, folder: str) -> dict | None:
            return self.markers.get(folder)

        marker_as_read = marker  # what a writer read: here the same folders

    before = {"tokenizer": {"files": {"tokenizer.json": "aa"}}, "tokens": {"files": {"train/data.arrow": "bb"}}}
    after = {**before, folder: {"files": {**before[folder]["files"], "added": "cc"}}}
    job = load_job(None)
    assert checkpoint_lineage(job, Run(before)) == checkpoint_lineage(job, Run(dict(before)))
    assert checkpoint_lineage(job, Run(after)) != checkpoint_lineage(job, Run(before))


@pytest.mark.parametrize(
    ("content", "message"),
    [
        # YAML keeps a repeated key's last value: the first section's settings were dropped without a word.
        ("train:\n  max_steps: 3\ntrain:\n  epochs: 2\n", "at line 3, column 1: duplicate key train"),
        ("train:\n  seed: 1\n  seed: 2\n", "at line 3, column 3: duplicate key seed"),
        ("train:\n  learnig_rate: 1.0e-3\n", "train.learnig_rate: unknown key (did you mean learning_rate?)"),
        ("name: on\n", "name: expects text; YAML reads unquoted true/false, yes/no, on/off as a boolean"),
        ("model:\n  vocab_size: 100\n", "model.vocab_size: Input should be greater than or equal to 261 or 'auto'"),
    ],
)
def test_job_file_mistakes_are_named(tmp_path: Path, content: str, message: str):
    job_file = tmp_path / "job.yaml"
    job_file.write_text(content)
    with pytest.raises(JobConfigError, match=re.escape(message)):
        load_job(job_file)


def test_a_section_with_its_keys_commented_out_is_empty(tmp_path: Path):
    job_file = tmp_path / "job.yaml"
    job_file.write_text("name: x\ntrain:\n#  max_steps: 3\n")
    assert load_job(job_file).train == Job().train
    assert load_job(job_file, ["train.max_steps=7"]).train.max_steps == 7


def test_errors_name_the_set_that_gave_the_value_not_the_job_file(tmp_path: Path):
    job_file = tmp_path / "job.yaml"
    job_file.write_text("train:\n  max_steps: 3\n")
    with pytest.raises(JobConfigError) as raised:
        load_job(job_file, ["train.max_steps=abc"])
    assert str(raised.value).startswith("--set train.max_steps: Input should be a valid integer")
    with pytest.raises(JobConfigError, match=re.escape(f"job {job_file}: model.hidden_size")):
        job_file.write_text("model:\n  hidden_size: wide\n")
        load_job(job_file, ["train.max_steps=3"])


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        # The learning rate would never reach its peak: training ends while it still warms up.
        (["train.max_steps=9", "train.warmup_steps=9"], "train.warmup_steps 9 must be below train.max_steps 9"),
        # Found empty only by the generation at the end of a whole clm `run`.
        (["task=clm", "generate.prompt=   "], "--set generate.prompt: must not be empty"),
    ],
)
def test_settings_a_training_would_end_on_are_refused_at_load(overrides: list[str], message: str):
    with pytest.raises(JobConfigError, match=re.escape(message)):
        load_job(None, overrides)


def test_the_benchmark_only_run_register_reads_redoes_no_evaluation():
    from kantai_batch.fingerprint import fingerprint_of

    evaluated = fingerprint_of(load_job(None), "evaluate")
    assert fingerprint_of(load_job(None, ["eval.benchmark=b.txt"]), "evaluate") == evaluated
    assert fingerprint_of(load_job(None, ["eval.probes=p.txt"]), "evaluate") != evaluated


def test_a_causal_lms_evaluation_is_not_redone_for_the_masked_lms_fields():
    from kantai_batch.fingerprint import fingerprint_of

    clm = ["task=clm"]
    evaluated = fingerprint_of(load_job(None, clm), "evaluate")
    for unread in ("infer.top_k=3", "eval.mlm_probability=0.2", "eval.probes=p.txt"):
        assert fingerprint_of(load_job(None, [*clm, unread]), "evaluate") == evaluated, unread
    # A masked LM's evaluation reads them.
    assert fingerprint_of(load_job(None, ["infer.top_k=3"]), "evaluate") != fingerprint_of(load_job(None), "evaluate")


def test_yaml_anchors_and_merge_keys_still_load(tmp_path: Path):
    job_file = tmp_path / "job.yaml"
    job_file.write_text(
        "tokenizer: &sizes\n  vocab_size: 8192\nmodel:\n  <<: *sizes\n  hidden_size: 256\n  num_attention_heads: 4\n"
    )
    job = load_job(job_file)
    assert (job.tokenizer.vocab_size, job.model.vocab_size, job.model.hidden_size) == (8192, 8192, 256)


@pytest.mark.parametrize(
    ("overrides", "corpus", "starts"),
    [
        # A check across fields names the option that set one of them.
        (["train.warmup_steps=500", "train.max_steps=100"], None, "--set train.warmup_steps 500 must be below"),
        (["data.block_size=1024"], None, "--set data.block_size 1024 needs model.max_position_embeddings"),
        ([], "", "--corpus: a source must be a non-empty string"),
    ],
)
def test_checks_across_fields_and_the_corpus_option_name_where_the_value_came_from(
    tmp_path: Path, overrides: list[str], corpus: str | None, starts: str
):
    job_file = tmp_path / "job.yaml"
    job_file.write_text("name: x\n")
    with pytest.raises(JobConfigError) as raised:
        load_job(job_file, overrides, corpus=corpus)
    assert str(raised.value).startswith(starts), str(raised.value)
