"""The customer-support job end to end: causal LM pretraining, generate, and the terminal chat."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import AutoTokenizer, RobertaForCausalLM

from helpers import ROOT, invoke
from helpers import SUPPORT_JOB as JOB
from kantai_batch.manifest import MARKER

pytestmark = pytest.mark.slow


def _generate_json(model: Path, *args: str) -> dict:
    result = invoke("generate", "--job", JOB, "--model", str(model), "--json", *args)
    return json.loads(result.stdout)


@pytest.mark.floors
def test_run_trains_a_causal_lm_with_its_own_tokenizer(support_run: Path):
    for phase in ("corpus", "tokenizer", "model", "eval"):
        assert (support_run / phase / MARKER).is_file(), phase
    model = RobertaForCausalLM.from_pretrained(str(support_run / "model"))
    assert model.config.is_decoder and model.config.architectures == ["RobertaForCausalLM"]
    tokenizer = AutoTokenizer.from_pretrained(str(support_run / "model"))
    assert "<reply>" in tokenizer.all_special_tokens
    assert len(tokenizer) < 1000, "trained on the tweets, not a pretrained vocabulary"
    summary = json.loads((support_run / "model" / "train_summary.json").read_text())
    assert summary["global_step"] == 150
    tokens = summary["real_tokens_trained"]
    assert tokens % 32 == 0 and 0.9 * 150 * 8 * 32 <= tokens <= 150 * 8 * 32, "grouped blocks have no padding"
    stats = json.loads((support_run / "tokens" / "tokens.json").read_text())
    assert stats["splits"]["train"]["settings"]["mode"] == "grouped", "each conversation framed as a prompt is"
    # ln(1024) = 6.93 for an untrained model; the generated conversations are very repetitive.
    assert summary["eval_loss"] < 4.0
    assert 0 < summary["eval_next_token_accuracy"] <= 1
    metrics = json.loads((support_run / "eval" / "metrics.json").read_text())
    assert metrics["task"] == "clm" and metrics["perplexity"] == pytest.approx(2.718281828 ** metrics["eval_loss"])


def test_run_ends_with_a_reply_to_the_jobs_prompt(support_run: Path):
    stdout = (support_run.parent / "run_stdout.txt").read_text()
    assert stdout.startswith("my package was supposed to arrive yesterday and it still has not shown up <reply> ")


def test_the_model_learned_to_answer(support_run: Path):
    reply = _generate_json(support_run / "model", "--temperature", "0", "my laptop is broken can you help me")
    answer = reply["text"].split("<reply>", 1)[1]
    assert any(word in answer.split() for word in ("sorry", "thanks", "we", "apologise")), reply


@pytest.mark.floors
def test_generate_continues_the_prompt_and_respects_max_new_tokens(support_run: Path):
    prompt = "My ORDER was cancelled!!"
    raw = _generate_json(support_run / "model", "--raw", "--max-new-tokens", "5", "--temperature", "0", prompt)
    assert raw["prompt"] == prompt and raw["text"].startswith(prompt) and len(raw["text"]) > len(prompt)
    assert 1 <= raw["new_tokens"] <= 5
    answered = _generate_json(support_run / "model", "--max-new-tokens", "7", prompt)
    assert answered["text"].startswith(f"{prompt} <reply> ") and answered["new_tokens"] <= 7


@pytest.mark.floors
def test_generate_is_reproducible_with_a_seed_and_varies_without(support_run: Path):
    model = support_run / "model"
    sampled = ("--temperature", "1.5", "--top-k", "0", "--top-p", "1", "--max-new-tokens", "12")
    first = _generate_json(model, *sampled, "--seed", "7", "my card")
    again = _generate_json(model, *sampled, "--seed", "7", "my card")
    assert first == again
    others = {_generate_json(model, *sampled, "--seed", str(seed), "my card")["text"] for seed in range(1, 6)}
    assert len(others | {first["text"]}) > 1, "sampling draws different texts for different seeds"


def test_several_sequences_come_as_lists(support_run: Path):
    reply = _generate_json(support_run / "model", "--num-return-sequences", "3", "--max-new-tokens", "6", "hello")
    assert len(reply["text"]) == 3 and len(reply["new_tokens"]) == 3
    assert all(text.startswith("hello <reply>") for text in reply["text"])
    assert all(count <= 6 for count in reply["new_tokens"])


def test_greedy_with_several_sequences_is_refused(support_run: Path):
    result = invoke(
        "generate", "--model", str(support_run / "model"), "--temperature", "0", "--num-return-sequences", "2",
        "hi", expect=2,
    )  # fmt: skip
    assert "greedy decoding" in result.stderr


def test_generate_refuses_a_masked_lm(trained_run: Path):
    result = invoke("generate", "--model", str(trained_run / "model"), "hello", expect=3)
    message = result.stderr.strip()
    assert len(message.splitlines()) == 1
    assert "masked language model" in message and "use fill-mask" in message


def test_fill_mask_refuses_a_causal_lm(support_run: Path):
    result = invoke("fill-mask", "--model", str(support_run / "model"), "my <mask> is late", expect=3)
    message = result.stderr.strip()
    assert len(message.splitlines()) == 1
    assert "causal language model" in message and "use generate or chat" in message


def test_line_by_line_clm_batches_never_target_padding(support_run: Path):
    from kantai_batch.data import build_split
    from kantai_batch.job import load_job
    from kantai_batch.model import load_tokenizer
    from kantai_batch.objective import collator

    job = load_job(JOB, ["data.mode=line_by_line"])
    tokenizer = load_tokenizer(support_run / "tokenizer")
    samples = build_split(support_run / "corpus" / "eval.txt", job, tokenizer, fix_masks=False, what="eval")
    batch = collator("clm", tokenizer, job)([samples[i] for i in range(8)])
    pad = batch["input_ids"] == tokenizer.pad_token_id
    assert pad.any(), "lines of different lengths are padded"
    assert (batch["labels"][pad] == -100).all()
    assert (batch["labels"][~pad] == batch["input_ids"][~pad]).all(), "every real token is a target"


def _chat_env() -> dict[str, str]:
    # This checkout's code, not the copy the environment has installed.
    return {**os.environ, "KANTAI_LOG_LEVEL": "error", "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(ROOT)}


def test_chat_answers_each_line_of_stdin(support_run: Path):
    done = subprocess.run(
        [sys.executable, "-m", "kantai_batch", "chat", "--model", str(support_run / "model"), "--temperature", "0"],
        input="my phone keeps crashing\n\nmy refund is missing\n",
        capture_output=True,
        text=True,
        env=_chat_env(),
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    answers = done.stdout.splitlines()
    assert len(answers) == 2, "one answer per non-blank line"
    single = _generate_json(support_run / "model", "--temperature", "0", "my phone keeps crashing")
    assert single["text"].endswith(answers[0]), "the REPL answers as generate does"


def test_piped_chat_keeps_each_answer_on_one_line():
    """A sampled line break (4 of 150 answers at temperature 100) split an answer over two output lines."""
    import io
    from types import SimpleNamespace

    from kantai_batch.chat import repl

    answers = iter(["first\nsecond\r\nthird", "one line"])
    out = io.StringIO()
    repl(lambda prompt, sampling: SimpleNamespace(continuations=[next(answers)]), None,  # type: ignore[arg-type]
         stdin=io.StringIO("a prompt\nanother\n"), stdout=out)  # fmt: skip
    assert out.getvalue().splitlines() == ["first second third", "one line"]


def test_chat_in_a_terminal_prompts_answers_and_leaves_on_ctrl_d(support_run: Path):
    pexpect = pytest.importorskip("pexpect")
    child = pexpect.spawn(
        sys.executable,
        ["-m", "kantai_batch", "chat", "--model", str(support_run / "model"), "--max-new-tokens", "8"],
        env=_chat_env(),
        encoding="utf-8",
        timeout=120,
    )
    try:
        child.expect_exact("you> ")
        child.sendline("where is my package")
        child.expect_exact("you> ")
        answer = child.before.replace("\r", "").split("\n")
        assert answer[0] == "where is my package", "the terminal echoes the prompt"
        assert answer[1].strip(), "then prints a non-empty answer"
        child.sendeof()
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0


def test_chat_serve_on_a_port_in_use_fails_by_name_before_loading_the_model(tmp_path: Path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        # The model does not exist: the port is found taken first, without minutes of loading.
        result = invoke("chat", "--serve", "--port", str(port), "--model", str(tmp_path / "no-model"), expect=1)
    message = f"kantai-batch: error: chat cannot serve on 127.0.0.1:{port}: Address already in use"
    assert result.stderr.strip() == message


def test_chat_serve_on_a_host_no_resolver_knows_is_a_config_error(tmp_path: Path):
    result = invoke(
        "chat", "--serve", "--host", "no-such-host.invalid", "--model", str(tmp_path / "no-model"), expect=2
    )
    assert result.stderr.strip().startswith("kantai-batch: error: chat --host no-such-host.invalid: ")
    assert result.stderr.count("\n") == 1


@pytest.mark.parametrize(
    ("settings", "expected"),
    [
        (
            {"temperature": 0.7, "top_k": 7, "top_p": 0.5},
            {"do_sample": True, "temperature": 0.7, "top_k": 7, "top_p": 0.5},
        ),
        ({"temperature": 0, "top_k": 7, "top_p": 0.5}, {"do_sample": False}),
    ],
    ids=["sampled", "greedy"],
)
def test_the_users_sampling_settings_reach_generation(monkeypatch: pytest.MonkeyPatch, settings, expected):
    """What --temperature, --top-k and --top-p (or the chat page's fields) say is what generate samples
    with; temperature 0 is greedy. An untrained model will do: only the call to generate is looked at."""
    import torch
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast, RobertaConfig

    from kantai_batch.generate import Generator
    from kantai_batch.job import Sampling

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(["where is my order"] * 5, vocab_size=270,
                            special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"])  # fmt: skip
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, bos_token="<s>", pad_token="<pad>",
                                        eos_token="</s>", unk_token="<unk>", mask_token="<mask>")  # fmt: skip
    config = RobertaConfig(vocab_size=len(tokenizer), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                           intermediate_size=32, max_position_embeddings=34, is_decoder=True)  # fmt: skip
    generator = Generator(RobertaForCausalLM(config), tokenizer)
    given = []

    def spy(inputs, generation_config, **kwargs):
        given.append(generation_config)
        return torch.cat([inputs, torch.tensor([[tokenizer.eos_token_id]])], dim=1)

    monkeypatch.setattr(generator.model, "generate", spy)
    generator("where is my order", Sampling(max_new_tokens=4, **settings))
    assert {name: getattr(given[0], name) for name in expected} == expected


def _read(generator, module, prompt: str, sampling=None, **options) -> list[list[int]]:
    """The ids (or positions) ``module`` was given in each forward of one generation."""
    from kantai_batch.job import Sampling

    seen: list[list[int]] = []
    hook = module.register_forward_hook(lambda module, args, out: seen.append(args[0][0].tolist()))
    try:
        generator(prompt, sampling or Sampling(temperature=0, max_new_tokens=1), **options)
    finally:
        hook.remove()
    return seen


@pytest.mark.floors
def test_greedy_generation_reads_the_positions_training_read(support_run: Path):
    import torch

    from kantai_batch.generate import Generator
    from kantai_batch.job import Sampling

    generator = Generator.load(support_run / "model")
    prompt = "my card was charged twice"
    made = Sampling(temperature=0, max_new_tokens=8)
    seen = _read(generator, generator.model.roberta.embeddings.position_embeddings, prompt, made, as_message=False)
    made = generator(prompt, made, as_message=False)
    # RoBERTa numbers positions from padding_idx + 1 = 2; generate numbers them from 0 unless told.
    length = len(seen[0])
    assert seen == [list(range(2, 2 + length))] + [[2 + length + i] for i in range(len(seen) - 1)]
    # The same greedy continuation by plain forward passes, which number positions as training did.
    tok, model = generator.tokenizer, generator.model
    ids = torch.tensor([[tok.bos_token_id, *tok(prompt, add_special_tokens=False)["input_ids"]]])
    for _ in range(made.new_tokens[0]):
        with torch.inference_mode():
            ids = torch.cat([ids, model(ids).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    # Continued as given, a reply separator the model writes stays in the text (test_raw_generation_...).
    reply = tok.convert_tokens_to_ids("<reply>")
    pieces = [
        tok.decode(part, skip_special_tokens=True) for part in _split(ids[0, -made.new_tokens[0] :].tolist(), reply)
    ]
    assert " ".join(made.continuations[0].split()) == " <reply> ".join(" ".join(p.split()) for p in pieces).strip()


def _split(ids: list[int], separator: int) -> list[list[int]]:
    parts = [[]]
    for token in ids:
        if token == separator:
            parts.append([])
        else:
            parts[-1].append(token)
    return parts


def test_past_the_trained_blocks_a_warning_and_special_token_strings_read_as_text(
    support_run: Path, caplog: pytest.LogCaptureFixture
):
    from kantai_batch.errors import InputDataError
    from kantai_batch.generate import Generator
    from kantai_batch.job import Sampling

    generator = Generator.load(support_run / "model")
    assert generator.trained == 32 < generator.max_length, "the tiny job's blocks, from the model's job.yaml"
    with caplog.at_level(logging.WARNING, logger="kantai_batch"):
        generator("hello there", Sampling(temperature=0, max_new_tokens=8))
        assert "run past" not in caplog.text
        generator(" ".join(["word"] * 10), Sampling(temperature=0, max_new_tokens=8))
    assert "run past the 32 tokens a block the model was trained on" in caplog.text
    # The cleaner (the tokenizer's normalizer) leaves letters only; "<s>" in a message is its letter.
    read = _read(generator, generator.model.roberta.embeddings.word_embeddings, "my <s> order </s> is <mask> late")
    tok = generator.tokenizer
    reply = tok.convert_tokens_to_ids("<reply>")
    assert read[0][0] == tok.bos_token_id and read[0][-1] == reply
    assert not set(read[0][1:-1]) & set(tok.all_special_ids), tok.convert_ids_to_tokens(read[0])
    # The separator typed in a message is text too: the one the template puts after it is the turn.
    read = _read(generator, generator.model.roberta.embeddings.word_embeddings, "where is my <reply> order")
    assert read[0].count(reply) == 1 and read[0][-1] == reply
    with pytest.raises(InputDataError, match="empty once the model's tokenizer has cleaned it"):
        generator("!!! 123 ???", Sampling(temperature=0))
    with pytest.raises(InputDataError, match=r"a lone surrogate, '\\ud800' at 9\): not text"):
        generator("my order \ud800", Sampling(temperature=0))


def test_an_empty_prompt_given_is_refused_not_replaced(support_run: Path):
    result = invoke("generate", "--job", JOB, "--model", str(support_run / "model"), "", expect=3)
    assert "the prompt is empty" in result.stderr


def test_raw_generation_keeps_the_reply_separator_the_model_writes(support_run: Path):
    # Continued as given, a customer's words run into the brand's reply: the separator shows where.
    prompt = "my laptop is broken can you help me"
    raw = _generate_json(support_run / "model", "--raw", "--max-new-tokens", "12", "--temperature", "0", prompt)
    assert " <reply> " in raw["text"], raw
    before, _, reply = raw["text"].partition(" <reply> ")
    assert before.startswith(prompt) and reply and not reply.startswith(" "), raw


@pytest.mark.parametrize("stop", ["<s>", "<reply>"])
def test_a_reply_ends_where_the_model_starts_another_example_or_turn(
    support_run: Path, monkeypatch: pytest.MonkeyPatch, stop: str
):
    import torch

    from kantai_batch.generate import Generator
    from kantai_batch.job import Sampling

    generator = Generator.load(support_run / "model")
    tok = generator.tokenizer
    # What a sampled reply can look like: words, then a new example (<s>) or turn (<reply>) without </s>.
    written = tok.convert_tokens_to_ids(["Ġwe", "Ġare", "Ġsorry", stop, "my", "Ġcard", "Ġis", "Ġbroken"])
    seen = {}

    def generate(inputs, generation_config, **kwargs):
        seen["stops"] = generation_config.eos_token_id
        return torch.cat([inputs, torch.tensor([written])], dim=1)

    monkeypatch.setattr(generator.model, "generate", generate)
    made = generator("my order never arrived", Sampling(temperature=0))
    assert made.continuations == ["we are sorry"], "the reply ends there; its words are not glued to the next"
    assert made.new_tokens == [3]
    assert tok.convert_tokens_to_ids(stop) in seen["stops"], "and generation stops there, not at max-new-tokens"
