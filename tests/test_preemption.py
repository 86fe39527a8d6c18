"""Signals and budgets: every rank stops at the same step, saves a regular checkpoint, exits 'run me again'."""

from __future__ import annotations

import json
import os
import random
import signal
import time
from pathlib import Path

import pytest
from conftest import TINY_LM, Run, assert_bitwise_same_run, checkpoint_steps, logged_steps, ok, train_records
from test_resume_exact import reference

from resumable.checkpoint import verify_checkpoint

pytestmark = pytest.mark.slow
DDP_LM = [*TINY_LM, "--max_train_samples", "72"]  # 2 ranks x 9 batches of 4


def run_status(out: Path) -> dict:
    return json.loads((out / "run_status.json").read_text())


def assert_stopped_with_checkpoint_at_last_step(out: Path) -> int:
    """The run saved a valid checkpoint exactly at the step it stopped and said 'run me again'."""
    stop_step = logged_steps(out)[-1]
    assert checkpoint_steps(out)[-1] == stop_step
    assert verify_checkpoint(out / "checkpoints" / f"step-{stop_step:08d}") is None
    status = run_status(out)
    assert (status["status"], status["exit_code"], status["step"]) == ("requeue", 75, stop_step)
    assert not (out / "COMPLETE").exists()
    return stop_step


def rank_pid(run: Run, rank: int) -> int:
    for pid in run.pids():
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in env and b"LOCAL_RANK=" + str(rank).encode() in env:
            return pid
    raise AssertionError(f"no process with RANK={rank}")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1, signal.SIGINT])
def test_signal_at_a_random_step_checkpoints_there_exits_75_and_resumes_bitwise(
    sig, tmp_path, tmp_path_factory, cache_dir
):
    ref = reference(tmp_path_factory, cache_dir, TINY_LM)
    run = Run(TINY_LM, tmp_path, cache_dir)  # the training process itself, as `python scripts/train.py`
    run.start()
    run.wait_for_step(random.Random(int(sig)).randint(2, 20))
    run.proc.send_signal(sig)
    assert run.proc.wait(timeout=60) == 75
    stop_step = assert_stopped_with_checkpoint_at_last_step(tmp_path)
    assert stop_step < 27
    ok(Run(TINY_LM, tmp_path, cache_dir).run())
    assert_bitwise_same_run(ref, tmp_path)


def stop_ddp_run_and_resume(tmp_path, tmp_path_factory, cache_dir, at_step: int, deliver) -> int:
    """Start a 2-process run, `deliver(run)` a signal after `at_step`, check the stop, resume, compare bitwise."""
    ref = reference(tmp_path_factory, cache_dir, DDP_LM, launcher="cpu_ddp")
    run = Run(DDP_LM, tmp_path, cache_dir, launcher="cpu_ddp")
    run.start()
    run.wait_for_step(at_step)
    deliver(run)
    output, _ = run.proc.communicate(timeout=90)
    stop_step = assert_stopped_with_checkpoint_at_last_step(tmp_path)
    # every rank passed the final barrier before the process group went away, and exited 75 (torchrun still prints
    # its own ChildFailedError for any non-zero exit: run_status.json carries the verdict)
    assert "process group has not been initialized" not in output, output[-3000:]
    assert "(exitcode: 1)" not in output, output[-3000:]
    files = json.loads((tmp_path / "checkpoints" / f"step-{stop_step:08d}" / "manifest.json").read_text())["files"]
    assert {"random_states_0.pkl", "random_states_1.pkl"} <= set(files)  # both ranks saved at that step
    ok(Run(DDP_LM, tmp_path, cache_dir, launcher="cpu_ddp").run())
    assert_bitwise_same_run(ref, tmp_path)
    return stop_step


def test_sigterm_to_every_process_of_a_2_process_launch(tmp_path, tmp_path_factory, cache_dir):
    """What Slurm's scancel and a time limit do: signal the launcher and both workers."""
    stop_ddp_run_and_resume(tmp_path, tmp_path_factory, cache_dir, 11, lambda run: run.signal_all(signal.SIGTERM))


def test_signal_to_rank_1_only_stops_every_rank_at_the_same_step(tmp_path, tmp_path_factory, cache_dir):
    def to_rank_1(run):
        os.kill(rank_pid(run, 1), signal.SIGUSR1)

    stop_ddp_run_and_resume(tmp_path, tmp_path_factory, cache_dir, 6, to_rank_1)


def test_signal_during_a_save_lets_the_save_finish(tmp_path, tmp_path_factory, cache_dir):
    ref = reference(tmp_path_factory, cache_dir, TINY_LM)
    # SIGTERM arrives while step 8's checkpoint is being committed (state written, manifest not yet)
    result = Run(TINY_LM, tmp_path, cache_dir, env={"RESUMABLE_FAULT": "sigterm_during_save:8"}).run()
    assert result.returncode == 75
    assert verify_checkpoint(tmp_path / "checkpoints" / "step-00000008") is None
    assert assert_stopped_with_checkpoint_at_last_step(tmp_path) == 9  # then stopped at the next step boundary
    ok(Run(TINY_LM, tmp_path, cache_dir).run())
    assert_bitwise_same_run(ref, tmp_path)


def test_signal_during_evaluation_abandons_it_and_the_resumed_run_evaluates_that_step(
    tmp_path, tmp_path_factory, cache_dir
):
    ref = reference(tmp_path_factory, cache_dir, TINY_LM)
    result = Run(TINY_LM, tmp_path, cache_dir, env={"RESUMABLE_FAULT": "sigterm_before_eval:10"}).run()
    assert result.returncode == 75
    assert assert_stopped_with_checkpoint_at_last_step(tmp_path) == 10
    progress = json.loads((tmp_path / "checkpoints" / "step-00000010" / "progress.json").read_text())
    assert progress["eval_pending"] is True
    ok(Run(TINY_LM, tmp_path, cache_dir).run())
    assert_bitwise_same_run(ref, tmp_path)

    def evals(out):
        return [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines() if "eval/loss" in line]

    assert evals(tmp_path) == evals(ref)  # step 10's evaluation happened once, with the same result


def test_second_ctrl_c_aborts_at_once(tmp_path, cache_dir):
    run = Run([*TINY_LM, "--num_train_epochs", "400"], tmp_path, cache_dir)
    run.start()
    run.wait_for_step(3)
    run.proc.send_signal(signal.SIGINT)
    lines = []
    for line in run.proc.stdout:  # wait until the first one was handled, so the two are not merged
        lines.append(line)
        if "SIGINT received" in line:
            break
    run.proc.send_signal(signal.SIGINT)
    rc = run.proc.wait(timeout=60)
    assert rc in (-signal.SIGINT, 128 + signal.SIGINT, 1), rc
    assert not (tmp_path / "run_status.json").exists() or run_status(tmp_path)["status"] != "finished"


def test_max_run_time_stops_before_the_budget_with_a_checkpoint(tmp_path, cache_dir):
    from resumable.config import parse_config
    from resumable.data import load_raw_datasets, load_tokenizer, tokenize_datasets

    cfg = parse_config([*TINY_LM, "--output_dir", str(tmp_path / "warm"), "--cache_dir", str(cache_dir)])
    raw = load_raw_datasets(cfg)
    tokenize_datasets(cfg, raw, load_tokenizer(cfg, raw))  # all cached, as for any run but a user's first
    budget = 12.0
    args = [*TINY_LM, "--num_train_epochs", "400", "--max_run_time", f"{budget:g}s"]
    t0 = time.monotonic()
    result = Run(args, tmp_path, cache_dir).run()
    wall = time.monotonic() - t0
    assert result.returncode == 75, result.stderr[-2000:]
    assert_stopped_with_checkpoint_at_last_step(tmp_path)
    status = run_status(tmp_path)
    assert "max_run_time" in status["reason"]
    assert status["elapsed"] < budget  # measured from the process start, imports included
    assert len(train_records(tmp_path)) < 400 * 9 and wall < 60


def test_max_steps_per_run_chunks_a_run_into_exact_pieces(tmp_path, tmp_path_factory, cache_dir):
    ref = reference(tmp_path_factory, cache_dir, TINY_LM)
    codes = [Run([*TINY_LM, "--max_steps_per_run", "10"], tmp_path, cache_dir).run().returncode for _ in range(3)]
    assert codes == [75, 75, 0]
    assert_bitwise_same_run(ref, tmp_path)


def test_sigterm_to_every_process_of_a_1_process_accelerate_launch(tmp_path, tmp_path_factory, cache_dir):
    """accelerate's single-process launcher neither handles nor forwards SIGTERM; the training process must."""
    ref = reference(tmp_path_factory, cache_dir, TINY_LM)
    run = Run(TINY_LM, tmp_path, cache_dir, launcher="cpu")
    run.start()
    run.wait_for_step(random.Random(1).randint(2, 20))
    run.signal_all(signal.SIGTERM)
    run.proc.wait(timeout=60)
    for _ in range(600):  # the launcher may exit first; the training process finishes its checkpoint
        if not run.pids():
            break
        time.sleep(0.05)
    assert_stopped_with_checkpoint_at_last_step(tmp_path)
    ok(Run(TINY_LM, tmp_path, cache_dir, launcher="cpu").run())
    assert_bitwise_same_run(ref, tmp_path)
