"""train.max_seconds: training for a wall-clock budget, with the schedule planned to end with it."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from transformers import get_scheduler

from helpers import ROOT, invoke, prepared_run, tiny
from kantai_batch import budget as budget_module
from kantai_batch.budget import ESTIMATE_STEPS, PlannedSchedule, TimeBudget
from kantai_batch.manifest import read_marker


@pytest.mark.parametrize(
    ("shape", "extra"),
    [
        ("linear", {}),
        ("cosine", {}),
        ("constant_with_warmup", {}),
        ("warmup_stable_decay", {"num_decay_steps": 20, "decay_type": "linear"}),
    ],
)
def test_the_planned_schedule_follows_the_trainers_own_shapes(shape: str, extra: dict):
    """For a fixed total, the re-plannable schedule gives the factors transformers' schedulers give."""
    total, warmup = 100, 10
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    reference = get_scheduler(shape, optimizer, num_warmup_steps=warmup, num_training_steps=total,
                              scheduler_specific_kwargs=extra)  # fmt: skip
    ours = PlannedSchedule(shape, total, warmup_steps=warmup, warmup_ratio=0.0, decay_ratio=0.2)
    for step in range(total):
        assert ours(step) == pytest.approx(reference.lr_lambdas[0](step), abs=1e-6), f"{shape} at step {step}"


def test_a_re_planned_schedule_ends_at_the_new_total():
    schedule = PlannedSchedule("cosine", 1000, warmup_steps=0, warmup_ratio=0.1, decay_ratio=0.2)
    assert schedule(50) == pytest.approx(0.5), "warm-up is a share of the planned total"
    schedule.total_steps = 200
    assert schedule(10) == pytest.approx(0.5) and schedule(200) == pytest.approx(0.0)
    assert 0 < schedule(150) < 1


def _train_on_a_fake_clock(monkeypatch: pytest.MonkeyPatch, step_seconds, evaluate_every: int = 0):
    """Steps of ``step_seconds(step)`` against a 1,000 s budget, as the stopping callback drives it, with
    a 60 s evaluation (excluded) every ``evaluate_every`` steps: the budget and the step training ended at."""
    clock = [0.0]
    monkeypatch.setattr(budget_module.time, "monotonic", lambda: clock[0])
    budget = TimeBudget(max_seconds=1000)
    budget.plan_within(PlannedSchedule("linear", 10_000, warmup_steps=0, warmup_ratio=0.1, decay_ratio=0.2))
    budget.start()
    for step in range(1, 10_000):
        clock[0] += step_seconds(step)
        if budget.steer(step, *budget.observe(step)):
            return budget, step
        if evaluate_every and step % evaluate_every == 0:
            clock[0] += 60.0
            budget.exclude(60.0)
    return budget, None


def test_evaluations_between_steps_do_not_shrink_the_plan(monkeypatch: pytest.MonkeyPatch):
    """Steps of 2 s with a 60 s evaluation every 50 steps: the plan is for 2 s steps, and it stands."""
    budget, ended_at = _train_on_a_fake_clock(monkeypatch, lambda step: 2.0, evaluate_every=50)
    assert budget.schedule.total_steps == 500
    assert ended_at == 500 and budget.spent() == pytest.approx(1000.0)


def test_a_plan_from_slow_first_steps_is_corrected_before_it_ends_training(monkeypatch: pytest.MonkeyPatch):
    """First steps of 3 s, then 1 s: the first plan ends at a third of the budget; the check halfway
    through it times the steps since the plan and re-plans to the budget's end."""
    budget, ended_at = _train_on_a_fake_clock(monkeypatch, lambda step: 3.0 if step <= ESTIMATE_STEPS + 1 else 1.0)
    assert budget.schedule.total_steps == ended_at == 978
    assert budget.spent() == pytest.approx(1000.0)


@pytest.mark.parametrize(("later_s", "change_at"), [(1.0, 300), (3.0, 300)])
def test_steps_that_change_speed_after_a_check_still_end_the_schedule_with_the_budget(
    monkeypatch: pytest.MonkeyPatch, later_s: float, change_at: int
):
    """Steps of 2 s, then faster or slower from a step past half the budget's steps: the schedule must
    still end where the budget does, not with a fifth of it unused (faster) or before its decay ended
    (slower: the budget stopped training with the learning rate still at a seventh of its peak)."""
    budget, ended_at = _train_on_a_fake_clock(monkeypatch, lambda step: 2.0 if step <= change_at else later_s)
    assert budget.spent() == pytest.approx(1000.0, abs=2 * later_s)
    assert budget.schedule.total_steps == pytest.approx(ended_at, abs=1)


def test_the_budget_stops_training_before_there_is_a_plan(monkeypatch: pytest.MonkeyPatch):
    """Steps of 200 s spend the 1,000 s budget before the steps timed for the first plan are done: the
    budget itself must end training then, not a plan made only after it was overspent."""
    budget, ended_at = _train_on_a_fake_clock(monkeypatch, lambda step: 200.0)
    assert ended_at == 5 and budget.spent() == pytest.approx(1000.0)


def test_ranks_whose_clocks_started_apart_plan_the_same_schedule(monkeypatch: pytest.MonkeyPatch):
    """Two ranks, one of whose clocks started half a step earlier: planned from their own clocks they
    would end a step apart (99 and 100), one leaving the loop while the other waits in a collective."""
    clock = [0.0]
    monkeypatch.setattr(budget_module.time, "monotonic", lambda: clock[0])
    ranks = [TimeBudget(max_seconds=100, spent_s=offset) for offset in (0.0, 0.5)]
    for rank in ranks:
        rank.plan_within(PlannedSchedule("linear", 10_000, warmup_steps=0, warmup_ratio=0.0, decay_ratio=0.2))
        rank.start()
    ended = {}
    for step in range(1, 200):
        clock[0] += 1.0
        views = [rank.observe(step) for rank in ranks]
        agreed = [max(values) for values in zip(*views, strict=True)]  # what StopAgreement's all_reduce gives
        for index, rank in enumerate(ranks):
            if index not in ended and rank.steer(step, *agreed):
                ended[index] = step
        if len(ended) == len(ranks):
            break
    assert [rank.schedule.total_steps for rank in ranks] == [99, 99]
    assert ended == {0: 99, 1: 99}


@pytest.mark.parametrize(("strategy", "saves"), [("steps", True), ("no", False)])
def test_the_step_the_budget_ends_on_is_saved_unless_nothing_is(strategy: str, saves: bool):
    from transformers import TrainerControl, TrainerState, TrainingArguments

    from kantai_batch.preemption import Preemption
    from kantai_batch.stopping import StopAgreement

    class Spent:  # a budget that is over at the first step it is asked about
        def observe(self, step):
            return 100.0, 1.0

        def steer(self, step, spent, step_s):
            return True

        max_seconds = 100.0

    args = TrainingArguments(output_dir="unused", save_strategy=strategy, report_to=[])
    stop = StopAgreement(Preemption(1.0), Spent())
    control = stop.on_step_end(args, TrainerState(global_step=3), TrainerControl())
    assert control.should_training_stop and control.should_save is saves


def test_a_resumed_run_plans_past_the_plan_it_saved(monkeypatch: pytest.MonkeyPatch):
    """A resume restores the saved plan into the schedule after the budget took its bound: a faster
    pod plans from the bound (max_steps), not from the old plan."""
    clock = [0.0]
    monkeypatch.setattr(budget_module.time, "monotonic", lambda: clock[0])
    budget = TimeBudget(max_seconds=1000, spent_s=400.0)
    budget.plan_within(PlannedSchedule("linear", 10_000, warmup_steps=0, warmup_ratio=0.1, decay_ratio=0.2))
    budget.schedule.__dict__.update(total_steps=300)  # as LambdaLR.load_state_dict restores a plan of 2 s steps
    budget.start()
    for step in range(200, 2_000):
        clock[0] += 0.5
        if budget.steer(step, *budget.observe(step)):
            break
    assert budget.schedule.total_steps > 1_300, "600 s left at 0.5 s a step: about 1,200 steps after the resume"
    assert step == budget.schedule.total_steps


def test_a_resume_under_a_longer_budget_goes_on_past_the_plan_that_ended(monkeypatch: pytest.MonkeyPatch):
    """The run ended where its plan of a 500 s budget did (step 250, 2 s a step); resumed with 1,000 s it
    plans the 500 s left at once, not stopping at the old plan's end or stepping at a learning rate of 0."""
    clock = [0.0]
    monkeypatch.setattr(budget_module.time, "monotonic", lambda: clock[0])
    budget = TimeBudget(max_seconds=1000, spent_s=500.0)
    budget.plan_within(PlannedSchedule("linear", 10_000, warmup_steps=0, warmup_ratio=0.1, decay_ratio=0.2))
    budget.schedule.__dict__.update(total_steps=250)  # the plan the checkpoint's scheduler restores
    budget.start()
    factors = []
    for step in range(251, 2_000):
        clock[0] += 2.0
        ended = budget.steer(step, *budget.observe(step))
        factors.append(budget.schedule(step))
        if ended:
            break
    assert step == budget.schedule.total_steps and 490 <= step <= 510, step
    assert budget.spent() == pytest.approx(1000.0, abs=4.0)
    assert min(factors[:-1]) > 0, "every step before the new plan's end trains"


def test_the_final_evaluation_takes_no_time_off_the_budget(monkeypatch: pytest.MonkeyPatch):
    from transformers import TrainerControl, TrainerState, TrainingArguments

    from kantai_batch.preemption import Preemption
    from kantai_batch.stopping import StopAgreement

    clock = [0.0]
    monkeypatch.setattr(budget_module.time, "monotonic", lambda: clock[0])
    budget = TimeBudget(max_seconds=100)
    budget.plan_within(PlannedSchedule("linear", 1_000, warmup_steps=0, warmup_ratio=0.0, decay_ratio=0.2))
    stop = StopAgreement(Preemption(1.0), budget)
    args, state, control = TrainingArguments(output_dir="unused", report_to=[]), TrainerState(), TrainerControl()
    stop.on_train_begin(args, state, control)
    for step in range(1, 6):
        clock[0] += 2.0
        state.global_step = step
        stop.on_step_end(args, state, control)
    clock[0] += 1.0  # the last save
    stop.on_train_end(args, state, control)
    clock[0] += 30.0  # the evaluation after training, which the summary follows
    stop.on_evaluate(args, state, control)
    assert budget.spent() == pytest.approx(11.0)


def _summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "model" / "train_summary.json").read_text())


@pytest.mark.slow
def test_training_stops_when_the_budget_is_spent_with_the_schedule_planned_for_it(tmp_path: Path, corpus_file: Path):
    run_dir = prepared_run(tmp_path / "run", corpus_file)
    budget = 15.0  # enough for the timed first steps even on a heavily loaded machine
    command = [sys.executable, "-m", "kantai_batch", "pretrain", "--run-dir", str(run_dir), "--no-tracking", *tiny(
        "train.max_steps=null", f"train.max_seconds={budget}", "train.lr_scheduler=linear", "train.warmup_steps=2",
        "train.logging_steps=1",
    )]  # fmt: skip
    result = subprocess.run(command, cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True,
                            text=True, timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    summary = _summary(run_dir)
    assert summary["stopped_by"] == "max_seconds" and summary["max_seconds"] == budget
    # Saved where the budget stopped it, as at max_steps, and marked with the budget that ended it: a pod
    # retried before the commit commits this step, though the plan ended it with a little time left.
    last = run_dir / "checkpoints" / f"checkpoint-{summary['global_step']}"
    assert read_marker(last)["last_step"] == budget
    shutil.rmtree(run_dir / "model")
    invoke("pretrain", "--run-dir", str(run_dir), "--no-tracking", *command[command.index("--no-tracking") + 1 :])
    retried = _summary(run_dir)
    assert retried["global_step"] == retried["resumed_from_step"] == summary["global_step"]
    assert retried["stopped_by"] == "max_seconds"
    # The end is the budget or the planned step, whichever comes first: close to the budget either way.
    assert budget / 2 <= summary["budget_spent_s"] < 3 * budget, summary
    assert summary["global_step"] > ESTIMATE_STEPS + 1, "too few steps to time: is the machine overloaded?"
    assert "the schedule ends at step" in result.stderr, "the schedule was planned from the timed steps"
    planned = int(re.findall(r"the schedule ends at step (\d+)", result.stderr)[-1])
    assert f"{summary['global_step']}/{planned} [" in result.stderr, "the progress bar counts to the planned end"
    rates = [float(rate) for rate in re.findall(r"'learning_rate': '?([0-9.e+-]+)", result.stderr)]
    assert len(rates) == summary["global_step"], "one logged rate per step"
    assert rates[-1] < 0.5 * max(rates), "the learning rate decays toward the end of the budget, not of 1 epoch"


@pytest.mark.slow
def test_epochs_still_bound_a_budgeted_run(tmp_path: Path, corpus_file: Path):
    run_dir = prepared_run(tmp_path / "run", corpus_file)
    invoke("pretrain", "--run-dir", str(run_dir), "--no-tracking",
           *tiny("train.max_steps=null", "train.max_seconds=3600", "train.epochs=1"))  # fmt: skip
    summary = _summary(run_dir)
    assert summary["stopped_by"] == "epochs" and summary["budget_spent_s"] < 3600


@pytest.mark.slow
def test_a_resumed_run_counts_the_time_already_spent(tmp_path: Path, corpus_file: Path):
    run_dir = prepared_run(tmp_path / "run", corpus_file)
    budget = 30.0
    job = tiny("train.max_steps=null", f"train.max_seconds={budget}", "train.save_steps=5")
    command = [sys.executable, "-m", "kantai_batch", "pretrain", "--run-dir", str(run_dir), "--no-tracking", *job]
    proc = subprocess.Popen(command, cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT)},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)  # fmt: skip
    deadline = time.monotonic() + 240
    while not list((run_dir / "checkpoints").glob("checkpoint-*/_COMPLETE")):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-3000:]
        time.sleep(0.2)
    time.sleep(budget / 3)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 143, stderr[-3000:]
    newest = max((run_dir / "checkpoints").glob("checkpoint-*/_COMPLETE"), key=lambda p: int(p.parent.name[11:]))
    spent = read_marker(newest.parent)["train_seconds"]
    assert 0 < spent < budget

    invoke("pretrain", "--run-dir", str(run_dir), "--no-tracking", *job)
    summary = _summary(run_dir)
    assert summary["stopped_by"] == "max_seconds" and spent < summary["budget_spent_s"] < 2 * budget
    # Without the spent time carried over, the resumed run would train for the whole budget again.
    assert summary["train_runtime_s"] < budget - spent / 2, summary


def test_a_run_resumed_after_its_budget_was_spent_takes_no_more_steps(tmp_path: Path, corpus_file: Path):
    run_dir = prepared_run(tmp_path / "run", corpus_file)
    first = tiny("train.max_steps=10", "train.save_steps=10", "train.max_seconds=3600")  # a clock, not a bound
    invoke("pretrain", "--run-dir", str(run_dir), "--no-tracking", *first)
    checkpoint = run_dir / "checkpoints" / "checkpoint-10"
    spent = read_marker(checkpoint)["train_seconds"]
    trained = _summary(run_dir)
    shutil.rmtree(run_dir / "model")  # what a pod retried after its last checkpoint, before the model, finds

    budget = tiny("train.max_steps=null", f"train.max_seconds={spent / 2}")
    invoke("pretrain", "--run-dir", str(run_dir), "--no-tracking", *budget)
    summary = _summary(run_dir)
    assert summary["global_step"] == 10 and summary["resumed_from_step"] == 10
    assert summary["stopped_by"] == "max_seconds" and summary["budget_spent_s"] == pytest.approx(spent)
    assert summary["eval_loss"] == pytest.approx(trained["eval_loss"], rel=1e-5), "the checkpoint's weights"
    assert not (run_dir / "checkpoints" / "checkpoint-11").exists()
