"""prepare with corpus.format twcs: the recipe's filter, the options, hostile rows, streaming."""

from __future__ import annotations

import csv
import io
import json
import re
import tracemalloc
from collections import Counter
from pathlib import Path

import pytest

from helpers import TWCS_HEADER, invoke, support_conversations, twcs_csv
from kantai_batch.job import load_job
from kantai_batch.manifest import MARKER
from kantai_batch.rundir import RunDir

TWCS = ("--set", "corpus.format=twcs")


def _examples(run_dir: Path) -> list[str]:
    examples = []
    for split in ("train.txt", "eval.txt"):
        text = (run_dir / "corpus" / split).read_text(encoding="utf-8")
        examples += [example for example in text.split("\n\n") if example.strip()]
    return [example.strip() for example in examples]


def _twcs_stats(run_dir: Path) -> dict:
    return json.loads((run_dir / "corpus" / "stats.json").read_text())["twcs"]


def _prepare(run_dir: Path, csv_path: Path, *sets: str, expect: int = 0):
    args = ["prepare", "--run-dir", str(run_dir), "--corpus", str(csv_path), *TWCS]
    for value in sets:
        args += ["--set", value]
    return invoke(*args, expect=expect)


def _recipe(text: str) -> str:
    """The recipe's cleaning, written the way the notebook does it."""
    return re.sub(r"[^a-z\s']", "", text.lower())


def _well_formed_rows() -> list[list[str]]:
    rows = support_conversations(150)
    long_tail = " ".join(["and", "then", "nothing", "happened", "at", "all"] * 5)
    rows += [
        ["9001", "a", "True", "t", f'He said "it is BROKEN",\nand then\r\nI\'m stuck {long_tail}', "", ""],
        ["9002", "b", "True", "t", f"Café naïve résumé 😀 über straße don't {long_tail}", "", ""],
        ["9003", "c", "False", "t", f"@x We're on it: https://t.co/abc {long_tail} #help", "", "9001"],
        ["9004", "d", "True", "t", "too short to keep", "", ""],
    ]
    return rows


def test_cleaning_and_length_filter_match_the_recipe(tmp_path: Path):
    rows = _well_formed_rows()
    source = twcs_csv(tmp_path / "twcs.csv", rows, bom=True)
    _prepare(tmp_path / "run", source)
    expected = []
    with source.open(encoding="utf-8-sig", newline="") as handle:
        for row in csv.DictReader(handle):
            cleaned = _recipe(row["text"])
            if len(cleaned.split()) > 30:
                expected.append(" ".join(cleaned.split()))
    assert 0 < len(expected) < len(rows), "the generated rows exercise both sides of the filter"
    assert Counter(_examples(tmp_path / "run")) == Counter(expected)
    counts = _twcs_stats(tmp_path / "run")
    assert counts["rows_read"] == len(rows)
    assert counts["examples_kept"] == len(expected)
    assert counts["examples_dropped"] == {"too_short": len(rows) - len(expected)}


def test_min_words_keeps_only_examples_of_more_words(tmp_path: Path):
    """corpus.min_words is "more than min_words words": an example of exactly min_words words is too short."""
    rows = support_conversations(40)
    rows.append(["9001", "a", "False", "t", "exactly five words right here", "", ""])
    rows.append(["9002", "b", "False", "t", "six words make it past here", "", ""])
    _prepare(tmp_path / "run", twcs_csv(tmp_path / "twcs.csv", rows), "corpus.min_words=5")
    examples = _examples(tmp_path / "run")
    assert "six words make it past here" in examples
    assert "exactly five words right here" not in examples
    assert _twcs_stats(tmp_path / "run")["examples_dropped"] == {"too_short": 1}


def test_min_words_does_not_count_the_conversation_separator(tmp_path: Path):
    """In conversation mode min_words counts the words of both turns: the <reply> joining them is no word."""
    rows = support_conversations(40)
    rows.append(["9001", "a", "True", "t", "my parcel vanished", "", ""])
    rows.append(["9002", "Brand", "False", "t", "checking now", "", "9001.0"])  # 5 words with the separator's 6
    rows.append(["9003", "b", "True", "t", "my box vanished", "", ""])
    rows.append(["9004", "Brand", "False", "t", "we are checking", "", "9003.0"])  # 6 words
    _prepare(tmp_path / "run", twcs_csv(tmp_path / "twcs.csv", rows), "corpus.conversation=true", "corpus.min_words=5")
    examples = _examples(tmp_path / "run")
    assert "my box vanished <reply> we are checking" in examples
    assert "my parcel vanished <reply> checking now" not in examples
    assert _twcs_stats(tmp_path / "run")["examples_dropped"]["too_short"] == 1


def test_hostile_rows_are_counted_and_skipped(tmp_path: Path):
    words = " ".join(f"word{i} plain" for i in range(20))
    rows = [
        *support_conversations(60),
        ["8001", "a", "False"],  # missing columns
        ["8002", "a", "False", "t", words, "", "", "surplus"],  # one field too many
        ["8003", "a", "False", "t", "", "", ""],  # empty text
        ["8004", "a", "False", "t", "   \t ", "", ""],  # blank text
        ["8005", "a", "False", "t", "12345 67890 !!! 42", "", ""],  # nothing left after cleaning
        ["8006", "a", "maybe", "t", words, "", ""],  # inbound neither True nor False
    ]
    tail = b'8007,a,False,t,"bytes \xff\xfe that are not utf-8 ' + words.encode() + b'",,\n'
    source = twcs_csv(tmp_path / "twcs.csv", rows, bom=True, tail=tail)
    _prepare(tmp_path / "run", source, "corpus.min_words=10", "corpus.brand_replies_only=true")
    assert json.loads((tmp_path / "run" / "corpus" / "stats.json").read_text())["encoding"] == "utf_8_sig"
    counts = _twcs_stats(tmp_path / "run")
    assert counts["rows_read"] == len(rows) + 1
    assert counts["rows_dropped"] == {
        "wrong_field_count": 2,
        "empty_text": 2,
        "nothing_left_after_cleaning": 1,
        "bad_inbound": 1,
        "undecodable": 1,
        "customer_tweet": 60,
    }
    assert counts["examples_kept"] == 60, "every brand reply survives"
    assert all("word" not in example for example in _examples(tmp_path / "run"))


def test_a_utf16_file_with_stray_bytes_counts_them_as_undecodable_rows(tmp_path: Path):
    source = twcs_csv(tmp_path / "twcs.csv", support_conversations(40))
    text = source.read_bytes().decode("utf-8").encode("utf-16")  # with its byte-order mark
    # A lone high surrogate inside a tweet, then an odd last byte: neither is text in UTF-16.
    broken = '8001,a,False,t,"half \ud83d of a character, which UTF-16 cannot hold alone",,\n'
    source.write_bytes(text + broken.encode("utf-16-le", "surrogatepass") + b"\n")
    _prepare(tmp_path / "run", source, "corpus.min_words=5")
    counts = _twcs_stats(tmp_path / "run")
    assert counts["rows_dropped"] == {"undecodable": 1, "wrong_field_count": 1}
    assert counts["examples_kept"] == 80


def test_unterminated_quote_at_the_end_does_not_crash(tmp_path: Path):
    source = twcs_csv(tmp_path / "twcs.csv", support_conversations(40), tail=b'9999,a,True,t,"never closed ' * 3)
    _prepare(tmp_path / "run", source, "corpus.min_words=5")
    counts = _twcs_stats(tmp_path / "run")
    assert counts["examples_kept"] == 80
    assert counts["rows_read"] == 81 and sum(counts["rows_dropped"].values()) == 1


def test_conversation_mode_pairs_each_customer_tweet_with_the_reply(tmp_path: Path):
    rows = support_conversations(50)
    rows.append(["7001", "c", "True", "t", "nobody ever answered this one " * 3, "", ""])
    rows.append(["7002", "Brand", "False", "t", "a reply to a tweet that is not in the file " * 3, "", "6999"])
    rows.append(["7003", "Brand", "False", "t", "a brand tweet that starts a thread " * 3, "", ""])
    rows.append(["9" * 20, "c", "True", "t", "an id longer than any tweet id has " * 3, "", ""])
    source = twcs_csv(tmp_path / "twcs.csv", rows)
    _prepare(
        tmp_path / "run",
        source,
        "corpus.conversation=true",
        "corpus.strip_handles=true",
        "corpus.strip_urls=true",
        "corpus.min_words=5",
    )
    examples = _examples(tmp_path / "run")
    assert len(examples) == 50
    for customer, brand in zip(rows[0:100:2], rows[1:100:2], strict=True):
        expected_customer = " ".join(_recipe(re.sub(r"https?://\S+|@\w+", " ", customer[4])).split())
        expected_reply = " ".join(_recipe(re.sub(r"https?://\S+|@\w+", " ", brand[4])).split())
        assert f"{expected_customer} <reply> {expected_reply}" in examples
    assert not any("http" in example or "brand my" in example for example in examples)
    counts = _twcs_stats(tmp_path / "run")
    assert counts["rows_dropped"] == {"not_a_reply": 1, "bad_tweet_id": 1}
    assert counts["examples_dropped"]["customer_tweet_unanswered"] == 1
    assert counts["examples_dropped"]["reply_to_no_customer_tweet"] == 1


def test_dedupe_drops_repeated_examples(tmp_path: Path):
    rows = support_conversations(30)
    repeated = [[str(9000 + i), "Brand", "False", "t", rows[1][4], "", ""] for i in range(5)]
    source = twcs_csv(tmp_path / "twcs.csv", rows + repeated)
    _prepare(tmp_path / "plain", source, "corpus.min_words=5")
    _prepare(tmp_path / "deduped", source, "corpus.min_words=5", "corpus.dedupe=true")
    plain, deduped = _examples(tmp_path / "plain"), _examples(tmp_path / "deduped")
    assert len(plain) == 65
    assert len(deduped) == len(set(plain)) < len(plain)
    assert _twcs_stats(tmp_path / "deduped")["examples_dropped"]["duplicate"] == len(plain) - len(set(plain))


def test_missing_text_column_names_the_file_and_its_columns(tmp_path: Path):
    source = tmp_path / "tweets.csv"
    source.write_text("tweet_id,author_id,body\n1,a,hello there\n", encoding="utf-8")
    result = _prepare(tmp_path / "run", source, expect=3)
    message = result.stderr.strip()
    assert len(message.splitlines()) == 1
    assert str(source) in message and "no text column" in message and "tweet_id, author_id, body" in message
    assert not (tmp_path / "run" / "corpus").exists(), "nothing half-written"


def test_a_tweet_holding_the_separator_text_stays_one_turn(tmp_path: Path):
    rows = support_conversations(60)
    rows[0][4] = "my order <reply> has not arrived and nobody answers me at all"
    rows[1][4] = "sorry <reply> we will look at it right away and write back soon"
    _prepare(tmp_path / "run", twcs_csv(tmp_path / "twcs.csv", rows), "corpus.conversation=true",
             "corpus.letters_only=false", "corpus.min_words=5")  # fmt: skip
    examples = _examples(tmp_path / "run")
    assert len(examples) == 60 and all(example.count("<reply>") == 1 for example in examples)
    assert "my order has not arrived and nobody answers me at all <reply> sorry we will look at it" in " ".join(
        " ".join(example.split()) for example in examples
    )


def test_conversation_mode_needs_the_id_columns(tmp_path: Path):
    source = tmp_path / "tweets.csv"
    source.write_text("text,inbound\n" + "hello there friend,True\n" * 5, encoding="utf-8")
    result = _prepare(tmp_path / "run", source, "corpus.conversation=true", expect=3)
    assert "no tweet_id or in_response_to_tweet_id column" in result.stderr


def test_filters_that_keep_nothing_say_what_they_dropped(tmp_path: Path):
    source = twcs_csv(tmp_path / "twcs.csv", support_conversations(20))
    result = _prepare(tmp_path / "run", source, "corpus.min_words=500", expect=3)
    assert "no example passed the filters" in result.stderr and "too_short 40" in result.stderr


def test_twcs_options_are_refused_for_plain_text():
    from kantai_batch.errors import JobConfigError

    with pytest.raises(JobConfigError, match="min_words only apply to format twcs"):
        load_job(None, ["corpus.min_words=3"])
    with pytest.raises(JobConfigError, match="excludes brand_replies_only"):
        load_job(None, ["corpus.format=twcs", "corpus.conversation=true", "corpus.brand_replies_only=true"])


@pytest.mark.slow
def test_the_csv_is_streamed_not_loaded(tmp_path: Path):
    """Python's peak allocations stay a small fraction of the file while it is read."""
    from kantai_batch.corpus import prepare

    source = twcs_csv(tmp_path / "twcs.csv", support_conversations(40_000))
    size = source.stat().st_size
    assert size > 10_000_000
    job = load_job(
        None,
        ["corpus.format=twcs", "corpus.encoding=utf-8", "corpus.dedupe=true", "corpus.min_words=5"],
        corpus=str(source),
    )
    run = RunDir.from_uri(str(tmp_path / "run"))
    tracemalloc.start()
    try:
        prepare(job, run)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert (run.corpus / MARKER).is_file()
    assert peak < size / 5, f"peak {peak:,} bytes for a {size:,}-byte file"


def test_every_reply_to_a_customer_tweet_lands_on_its_side_of_the_split(tmp_path: Path):
    """A tweet answered three times is three examples: split one by one, the text held out in one trained
    in the others (and the causal LM is scored on the customer's words too)."""
    rows = []
    names = [a + b + c for a in "bdgkmprst" for b in "aeiou" for c in "lnrs"]  # letters: the cleaning drops digits
    for index in range(60):
        customer = 100 * index + 1
        ask = f"my order for the {names[index]} never arrived and nobody answers my messages at all"
        rows.append([str(customer), f"c{index}", "True", "t", ask, "", ""])
        for reply in range(3):
            answer = f"sorry to hear that we will look into the {names[index]} right away {names[-reply - 1]} thanks"
            rows.append([str(customer + 1 + reply), "Brand", "False", "t", answer, "", f"{customer}.0"])
    source = twcs_csv(tmp_path / "twcs.csv", rows)
    _prepare(tmp_path / "run", source, "corpus.conversation=true", "corpus.min_words=5", "data.eval_fraction=0.3")
    sides = {}
    for split in ("train", "eval"):
        text = (tmp_path / "run" / "corpus" / f"{split}.txt").read_text(encoding="utf-8")
        for example in filter(str.strip, text.split("\n\n")):
            sides.setdefault(example.strip().split(" <reply> ")[0], set()).add(split)
    assert len(sides) == 60 and all(len(found) == 1 for found in sides.values()), sides
    assert 5 < sum(found == {"eval"} for found in sides.values()) < 35


def test_a_text_file_given_as_twcs_is_named_by_its_empty_header(tmp_path: Path):
    """Kant's text starts with a blank line: the error said "its columns: none"."""
    source = tmp_path / "kant.txt"
    source.write_text("\nHUMAN REASON, in one sphere of its cognition, is called upon to consider questions.\n")
    message = _prepare(tmp_path / "run", source, expect=3).stderr.strip()
    assert "has no text column (its first line, the header, is empty); corpus.format twcs expects" in message


def test_a_field_past_128_kib_is_one_field_not_rows(tmp_path: Path):
    # A quoted field longer than the csv module's default limit, whose lines look like rows: the reader
    # gave up inside it and read its later lines as tweets, trained on as a conversation.
    import csv

    # The limit is the process's: a csv corpus prepared by an earlier test in this process raised it,
    # and this test passed without twcs raising it itself. The default, as a `prepare` process starts.
    previous = csv.field_size_limit(128 * 1024)
    try:
        _a_field_past_128_kib(tmp_path)
    finally:
        csv.field_size_limit(previous)


def _a_field_past_128_kib(tmp_path: Path) -> None:
    inner = (
        "\n9101,x,True,t,smuggled customer words " + "alpha " * 10 + ",9102,"
        "\n9102,b,False,t,smuggled reply words " + "beta " * 10 + ",,9101\n"
    )
    huge = ["9100", "a", "True", "t", "word " * 30_000 + inner + "end", "", ""]
    source = twcs_csv(tmp_path / "twcs.csv", [*support_conversations(40), huge])
    _prepare(tmp_path / "run", source, "corpus.min_words=5")
    smuggled = [example[:40] for example in _examples(tmp_path / "run") if "smuggled" in example]
    assert all(example.startswith("word word") for example in smuggled), smuggled
    counts = _twcs_stats(tmp_path / "run")
    assert counts["rows_read"] == 81 and "malformed_csv" not in counts["rows_dropped"], counts


def test_a_repeated_customer_tweet_id_is_counted_and_the_first_text_stands(tmp_path: Path):
    rows = support_conversations(40)
    repeated = [rows[0][0], "someone", "True", rows[0][3], "@Brand a second tweet under the first one's id", "", ""]
    source = twcs_csv(tmp_path / "twcs.csv", [*rows, repeated])
    _prepare(tmp_path / "run", source, "corpus.conversation=true", "corpus.min_words=5")
    counts = _twcs_stats(tmp_path / "run")
    assert counts["rows_read"] == 81 and counts["rows_dropped"] == {"repeated_tweet_id": 1}, counts
    assert not any("second tweet" in example for example in _examples(tmp_path / "run"))


def test_a_reply_exported_twice_is_one_reply_not_two_conversations(tmp_path: Path):
    rows = support_conversations(40)
    # Every brand reply twice, as a concatenated or re-run export has it; dedupe off, as a user keeping
    # the canned replies' repeats would set it. A second reply under its own id is a second reply.
    second = ["9001", "Brand", "False", rows[1][3], "@cust0 and a second answer from us about it", "", rows[0][0]]
    source = twcs_csv(tmp_path / "twcs.csv", [*rows, *rows[1::2], second])
    _prepare(tmp_path / "run", source, "corpus.conversation=true", "corpus.min_words=5", "corpus.dedupe=false")
    counts = _twcs_stats(tmp_path / "run")
    assert counts["rows_dropped"] == {"repeated_tweet_id": 40}, counts
    examples = _examples(tmp_path / "run")
    assert len(examples) == 41 and sum("second answer" in example for example in examples) == 1


@pytest.mark.parametrize("delimiter", [";", "\t"])
def test_a_file_delimited_by_another_character_says_so(tmp_path: Path, delimiter: str):
    # What a spreadsheet in a German or French locale saves as "CSV", or a tab-separated export.
    buffer = io.StringIO(newline="")
    csv.writer(buffer, delimiter=delimiter, lineterminator="\n").writerows([TWCS_HEADER, *support_conversations(5)])
    source = tmp_path / "twcs.csv"
    source.write_text(buffer.getvalue(), encoding="utf-8")
    message = _prepare(tmp_path / "run", source, "corpus.conversation=true", expect=3).stderr.strip()
    assert len(message.splitlines()) == 1 and str(source) in message
    assert f"delimited by {delimiter!r}, not commas" in message, message


def test_the_kaggle_zip_or_a_gzip_without_its_suffix_is_named_for_what_it_is(tmp_path: Path):
    import gzip
    import zipfile

    plain = twcs_csv(tmp_path / "twcs.csv", support_conversations(40))
    # Kaggle's download is archive.zip holding twcs/twcs.csv; the advice was to force an encoding.
    kaggle = tmp_path / "archive.zip"
    with zipfile.ZipFile(kaggle, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.write(plain, "twcs/twcs.csv")
    packed = tmp_path / "packed.csv"
    packed.write_bytes(gzip.compress(plain.read_bytes()))
    for source, expected in ((kaggle, "is a zip archive, not text: unzip it"), (packed, "add .gz to its name")):
        message = _prepare(tmp_path / "run", source, "corpus.conversation=true", expect=3).stderr.strip()
        assert len(message.splitlines()) == 1 and f"{source} is" in message and expected in message, message
