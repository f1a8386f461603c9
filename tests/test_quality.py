"""Quality probes: the probe file, the hits evaluate and run report, and the shipped Kant probes."""

from __future__ import annotations

import json
import logging
import re
import shutil
import statistics
from pathlib import Path

import pytest

from helpers import ROOT, invoke, kantian_text, tiny
from kantai_batch.errors import InputDataError, JobConfigError
from kantai_batch.infer import fill_mask
from kantai_batch.model import load_lm, load_model_tokenizer
from kantai_batch.probes import Probe, format_quality, read_probes, score_probes


def _summary_steps(run_dir: Path) -> int:
    return json.loads((run_dir / "model" / "train_summary.json").read_text())["global_step"]


def _probe_file(path: Path, lines: list[str]) -> Path:
    path.write_text("# a comment, then a blank line\n\n" + "\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_shipped_kant_probes_parse():
    probes = read_probes(ROOT / "jobs" / "probes" / "kant.txt")
    assert len(probes) >= 20
    assert all(probe.text.count("<mask>") == 1 and probe.answers for probe in probes)
    recipe = next(probe for probe in probes if probe.text == "Human thinking involves human <mask>.")
    assert {"reason", "understanding", "conception", "experience"} <= set(recipe.answers)


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("Reason is <mask>.", "line 3: expected 'TEXT -> ANSWER[, ANSWER...]'"),
        ("Reason is <mask>. -> ", "line 3: expected 'TEXT -> ANSWER[, ANSWER...]'"),
        ("Reason <mask> is <mask>. -> pure", "line 3: the text needs exactly one <mask>, got 2"),
        ("Reason is pure. -> pure", "line 3: the text needs exactly one <mask>, got 0"),
    ],
)
def test_malformed_probe_lines_name_file_and_line(tmp_path: Path, line: str, message: str):
    path = _probe_file(tmp_path / "probes.txt", [line])
    with pytest.raises(InputDataError, match=re.escape(message)) as caught:
        read_probes(path)
    assert str(path) in str(caught.value)


def test_missing_or_empty_probe_file(tmp_path: Path):
    # The job names it: a retry finds it missing again (exit 4 had a Job retry a typo).
    with pytest.raises(JobConfigError, match="eval.probes: probe file .*nope.txt does not exist"):
        read_probes(tmp_path / "nope.txt")
    with pytest.raises(InputDataError, match="has no probes"):
        read_probes(_probe_file(tmp_path / "empty.txt", []))


@pytest.fixture
def held_out(tmp_path: Path) -> Path:
    text = tmp_path / "held-out.txt"
    text.write_text(kantian_text(40, seed=7), encoding="utf-8")
    return text


@pytest.mark.slow
def test_evaluate_scores_probes_against_the_models_own_predictions(trained_run: Path, tmp_path: Path, held_out: Path):
    model = trained_run / "model"
    texts = ["Reason determines <mask> cognition.", "The mind <mask> every object."]
    # The model's own first choice must count as a hit at 1, a word it never predicts as a miss.
    firsts = [fill_mask(model, text, top_k=1)[0][0]["token_str"].strip() for text in texts]
    probes = _probe_file(
        tmp_path / "probes.txt",
        [f"{texts[0]} -> {firsts[0]}", f"{texts[1]} -> zzzz, {firsts[1].upper()}", f"{texts[0]} -> zzzz"],
    )
    result = invoke(
        "evaluate", "--run-dir", str(tmp_path / "run"), "--model", str(model), "--corpus", str(held_out),
        "--json", *tiny(f"eval.probes={probes}"),
    )  # fmt: skip
    quality = json.loads(result.stdout)["quality"]
    assert quality["fill_mask"]["text"] == "Human thinking involves human <mask>."
    assert len(quality["fill_mask"]["predicted"]) == 5
    scored = quality["probes"]
    assert (scored["probes"], scored["top1_hits"], scored["topk_hits"]) == (3, 2, 2)
    assert [row["rank"] for row in scored["results"]] == [1, 1, None]
    assert scored["median_rank"] == 1.0
    table = invoke("evaluate", "--run-dir", str(tmp_path / "run"), "--model", str(model), "--corpus", str(held_out),
                   *tiny(f"eval.probes={probes}"))  # fmt: skip
    hits = "probes: 2/3 right at top 1, 2/3 in the top 5"
    assert f"{hits}, median rank of a right answer 1 of {scored['vocabulary']:,}" in table.stdout
    assert "fill-mask 'Human thinking involves human <mask>.'" in table.stdout


@pytest.mark.slow
def test_bad_probe_file_fails_before_evaluating_and_keeps_metrics(trained_run: Path, tmp_path: Path, held_out: Path):
    run_dir = tmp_path / "run"
    args = ("evaluate", "--run-dir", str(run_dir), "--model", str(trained_run / "model"), "--corpus", str(held_out))
    invoke(*args, *tiny())
    metrics = (run_dir / "eval" / "metrics.json").read_bytes()
    bad = _probe_file(tmp_path / "bad.txt", ["no mask here -> word"])
    result = invoke(*args, *tiny(f"eval.probes={bad}"), expect=3)
    assert result.stderr.strip().splitlines() == [
        f"kantai-batch: error: probe file {bad}, line 3: the text needs exactly one <mask>, got 0"
    ]
    assert (run_dir / "eval" / "metrics.json").read_bytes() == metrics
    # A text too small to score is named as the user gave it, not by the decoded copy's scratch path.
    small = tmp_path / "small.txt"
    small.write_text("Reason.\n")
    result = invoke(*args[:-1], str(small), *tiny(), expect=3)
    assert result.stderr.splitlines()[-1].startswith(
        f"kantai-batch: error: eval corpus {small} is too small for one block"
    )


@pytest.mark.slow
def test_run_prints_the_probe_hits_after_the_fill_mask_answers(tmp_path: Path, corpus_file: Path):
    probes = _probe_file(tmp_path / "probes.txt", ["Reason determines <mask> cognition. -> every, the"])
    result = invoke(
        "run", "--run-dir", str(tmp_path / "run"), "--corpus", str(corpus_file), "--no-tracking",
        *tiny("train.max_steps=5", f"eval.probes={probes}"),
    )  # fmt: skip
    assert result.stdout.strip().splitlines()[-1].startswith("probes: ")
    assert "/1 in the top 5" in result.stdout
    saved = json.loads((tmp_path / "run" / "eval" / "metrics.json").read_text())
    assert saved["quality"]["probes"]["probes"] == 1

    # A probe added to the same file: `run` scores the file as it is now, not the one evaluated before.
    probes.write_text(probes.read_text() + "The mind <mask> every object. -> knows\n", encoding="utf-8")
    result = invoke(
        "run", "--run-dir", str(tmp_path / "run"), "--corpus", str(corpus_file), "--no-tracking",
        *tiny("train.max_steps=5", f"eval.probes={probes}"),
    )  # fmt: skip
    assert "/2 in the top 5" in result.stdout.strip().splitlines()[-1]
    assert json.loads((tmp_path / "run" / "eval" / "metrics.json").read_text())["quality"]["probes"]["probes"] == 2

    # Gone since, it is not needed by a run dir whose evaluation is done: nothing to redo, nothing refused.
    probes.unlink()
    result = invoke(
        "run", "--run-dir", str(tmp_path / "run"), "--corpus", str(corpus_file), "--no-tracking",
        *tiny("train.max_steps=5", f"eval.probes={probes}"),
    )  # fmt: skip
    assert "/2 in the top 5" in result.stdout.strip().splitlines()[-1], "the scores it made stand"
    # With a phase before the evaluation to redo, it is refused before that phase.
    result = invoke(
        "run", "--run-dir", str(tmp_path / "run"), "--corpus", str(corpus_file), "--no-tracking",
        *tiny("train.max_steps=6", f"eval.probes={probes}"), expect=2,
    )  # fmt: skip
    assert f"eval.probes: probe file {probes} does not exist" in result.stderr
    assert _summary_steps(tmp_path / "run") == 5


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ("eval.probes={missing}", "eval.probes: probe file {missing} does not exist"),
        ("train.deepspeed={missing}", "train.deepspeed {missing} does not exist"),
        ("train.init_from={missing}", "train.init_from {missing} does not exist"),
    ],
)
def test_run_checks_the_files_the_job_names_before_the_first_phase(
    tmp_path: Path, corpus_file: Path, setting: str, message: str
):
    """Each was read only by a later phase: a misspelt path failed after preparing, tokenizing and
    (for the probes) the whole training."""
    missing = tmp_path / "nope"
    run_dir = tmp_path / "run"
    args = ("run", "--run-dir", str(run_dir), "--corpus", str(corpus_file), "--no-tracking")
    result = invoke(*args, *tiny(setting.format(missing=missing)), expect=2)
    assert result.stderr.strip().splitlines() == [
        f"kantai-batch: error: {message.format(missing=missing)}" + (f" (relative paths start at {Path.cwd()})")
    ]
    assert not run_dir.exists() or not any(run_dir.iterdir())


@pytest.mark.slow
def test_probe_ranks_follow_the_fill_mask_pipeline_over_the_whole_vocabulary(trained_run: Path, caplog):
    from transformers import pipeline

    model_dir = trained_run / "model"
    model, tokenizer = load_lm(model_dir, "mlm").eval(), load_model_tokenizer(model_dir)
    text = "Reason determines <mask> cognition."
    ranked = pipeline("fill-mask", model=model, tokenizer=tokenizer)(text, top_k=model.config.vocab_size)
    spelled = [tokenizer.decode([candidate["token"]]).lower() for candidate in ranked]
    # After a space the word is the token that starts with one (" the"), never the letters inside a word
    # ("the" of "bathe"); among those of one spelling the best counts.
    words = [word for word in spelled if word.startswith(" ") and word.strip()]
    picks = [words[0], words[3], words[len(words) // 2], words[-1]]
    expected = [spelled.index(word) + 1 for word in picks]
    inside = next(word for word in spelled if word.isalpha() and " " + word not in spelled)
    probes = [Probe(text, (word.strip(),), line) for line, word in enumerate(picks, start=1)]
    probes += [Probe(text, ("zzzz-not-a-token",), 9), Probe(text, (inside, picks[1].strip()), 10)]
    probes += [Probe(text, (inside,), 11)]
    with caplog.at_level(logging.WARNING, logger="kantai_batch.probes"):
        scored = score_probes(model, tokenizer, probes, top_k=5, source="probe file P")
    assert [row["rank"] for row in scored["results"]] == [*expected, None, expected[1], None]
    assert expected[2] > 5 and scored["vocabulary"] == model.config.vocab_size
    ranks = [*expected, expected[1]]
    assert (scored["top1_hits"], scored["topk_hits"]) == (ranks.count(1), sum(rank <= 5 for rank in ranks))
    assert scored["median_rank"] == statistics.median(ranks)
    assert scored["results"][0]["predicted"] == [word.strip() for word in spelled[:5]]
    assert [row.get("unscorable") for row in scored["results"][4:]] == [["zzzz-not-a-token"], [inside], [inside]]
    assert scored["unscorable_probes"] == 2
    warned = f"probe file P, line 11: ' {inside}' no single token of this tokenizer (as a word after a space)"
    assert warned in caplog.text
    line = format_quality({"fill_mask": {"text": text, "predicted": []}, "probes": scored})[1]
    median = f"median rank of a right answer {scored['median_rank']:,g} of {model.config.vocab_size:,}"
    assert line.endswith(f"{median}; 2 with no answer in this vocabulary")


def test_a_best_answer_ranked_exactly_top_k_is_a_top_k_hit():
    """A "hit at k" is rank k or better: an answer ranked 3rd counts in the top 3, one ranked 4th does not.
    A stand-in model gives the mask chosen scores, so the ranks are known without training one."""
    import torch
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(["Human thinking involves human reason and every object."] * 20, vocab_size=300,
                            special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"])  # fmt: skip
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, bos_token="<s>", pad_token="<pad>",
                                        eos_token="</s>", unk_token="<unk>", mask_token="<mask>")  # fmt: skip
    scores = torch.zeros(len(tokenizer))
    for word, score in [("Ġobject", 7.0), ("Ġevery", 6.0), ("Ġreason", 5.0), ("Ġhuman", 4.0)]:
        scores[tokenizer.convert_tokens_to_ids(word)] = score

    class Scripted:  # the same scores at every position of every text
        device = torch.device("cpu")

        def __call__(self, input_ids, **kwargs):
            return type("Output", (), {"logits": scores.expand(1, input_ids.shape[1], -1)})

    text = "Human thinking involves human <mask>."
    probes = [Probe(text, ("reason",), 1), Probe(text, ("human",), 2)]
    scored = score_probes(Scripted(), tokenizer, probes, top_k=3)
    assert [row["rank"] for row in scored["results"]] == [3, 4]
    assert scored["results"][0]["predicted"] == ["object", "every", "reason"]
    assert (scored["top1_hits"], scored["topk_hits"]) == (0, 1)


@pytest.mark.slow
def test_run_redoes_an_evaluation_made_on_another_corpus(
    trained_run: Path, tmp_path: Path, held_out: Path, corpus_file: Path
):
    """`evaluate --corpus` writes RUN/eval too: those scores are not the held-out split's, and `run` must not
    skip its evaluation on their account."""
    run_dir = shutil.copytree(trained_run, tmp_path / "run")
    invoke("evaluate", "--run-dir", str(run_dir), "--corpus", str(held_out), *tiny())
    assert json.loads((run_dir / "eval" / "metrics.json").read_text())["corpus"] == str(held_out)
    invoke("run", "--run-dir", str(run_dir), "--corpus", str(corpus_file), *tiny())
    metrics = json.loads((run_dir / "eval" / "metrics.json").read_text())
    assert metrics["corpus"] == str(run_dir / "corpus" / "eval.txt"), metrics["corpus"]
