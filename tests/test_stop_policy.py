"""How a run decides to stop and says how it ended: budgets that leave room for an evaluation, a status file that
many processes may write at once, a wrapper that trusts only its own attempt's status, the planned total steps."""

from __future__ import annotations

import json
import multiprocessing
import time

from resumable.checkpoint import Progress
from resumable.config import parse_config
from resumable.preemption import StopRequest, main, write_run_status
from resumable.resume_plan import plan_total_steps


def _write_many(folder: str, n: int) -> int:
    failures = 0
    for i in range(n):
        try:
            write_run_status(folder, "requeue", 75, i)
        except OSError:
            failures += 1
    return failures


def test_run_status_survives_many_processes_writing_it_at_once(tmp_path):
    with multiprocessing.get_context("fork").Pool(6) as pool:
        failures = pool.starmap(_write_many, [(str(tmp_path), 400)] * 6)
    assert failures == [0] * 6
    assert json.loads((tmp_path / "run_status.json").read_text())["status"] == "requeue"
    assert [p.name for p in tmp_path.iterdir()] == ["run_status.json"]  # no temporary file left behind


def budget(seconds_used: float, budget_s: float = 100.0) -> StopRequest:
    return StopRequest([], max_run_time=budget_s, started=time.monotonic() - seconds_used)


def test_the_time_budget_leaves_room_for_the_evaluation_due_at_this_step():
    stop = budget(80)
    stop.note_step(5), stop.note_save(5), stop.note_eval(10)
    stop.check_budgets(1, eval_due=False)  # 80 s + 1.5 x (step + save) = 95 s: room left
    assert stop.reason is None
    stop.check_budgets(1, eval_due=True)  # + 1.5 x the evaluation = 110 s: stop now, the evaluation is deferred
    assert "max_run_time" in stop.reason


def test_a_budget_running_out_during_evaluation_cuts_it_short_with_room_for_the_save():
    stop = budget(50)
    stop.note_save(2)
    assert stop.eval_should_stop() is False
    late = budget(97.5)
    late.note_save(2)  # 97.5 s + 1.5 x 2 s > 100 s
    assert late.eval_should_stop() is True and "during evaluation" in late.reason


def test_a_wrapper_ignores_a_status_written_by_another_attempt(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("RESUMABLE_ATTEMPT", "job-1")
    write_run_status(tmp_path, "requeue", 75, 8)
    assert main([str(tmp_path), "--attempt", "job-1"]) == 75
    assert main([str(tmp_path), "--attempt", "job-2"]) == 1
    assert "another attempt" in capsys.readouterr().err
    assert main([str(tmp_path)]) == 75  # without --attempt: the newest status, whoever wrote it


def test_total_steps_after_an_elastic_resume_finish_the_planned_epochs(tmp_path):
    cfg = parse_config(["--output_dir", str(tmp_path), "--num_train_epochs", "3"])
    # stopped at step 13 of a 1 x 4 x 1 layout (9 batches/epoch): epoch 1, 4 batches (16 samples) in
    saved = Progress(step=13, epoch=1, batches_in_epoch=4, samples_in_epoch=16, world_size=1,
                     per_device_train_batch_size=4, gradient_accumulation_steps=1)  # fmt: skip
    assert plan_total_steps(cfg, 9, (1, 4, 1), saved) == 27  # same layout: the plan is unchanged
    # now 1 x 8 x 1: 5 batches per epoch; 16 samples = 2 batches in, 3 left; then one more epoch of 5
    assert plan_total_steps(cfg, 5, (1, 8, 1), saved) == 13 + 3 + 5
    # accumulation 2 on the same batches: windows of the 5 batches left (3 steps), then 5 steps per epoch
    assert plan_total_steps(cfg, 9, (1, 4, 2), saved) == 13 + 3 + 5
    assert plan_total_steps(cfg, 9, (1, 4, 2), None) == 15  # a fresh start plans 3 x ceil(9 / 2)
