"""A run's whole life around the happy path: a stop on an eval step or the last step, a branch from an older
checkpoint, starting over, extending a finished run, an elastic resume with another global batch, data changed
under a checkpoint. Each ends exactly as the contract in the README's "Resume semantics" says."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from conftest import (
    PYTHON,
    REPO,
    TINY_LM,
    Run,
    assert_bitwise_same_run,
    checkpoint_steps,
    logged_steps,
    ok,
    train_records,
)
from test_resume_exact import reference

pytestmark = pytest.mark.slow


def evals(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines() if "eval/loss" in line]


def manifest(out: Path, step: int) -> dict:
    return json.loads((out / "checkpoints" / f"step-{step:08d}" / "manifest.json").read_text())


def final_metrics(out: Path) -> dict:
    return json.loads((out / "final_metrics.json").read_text())


def abandoned(out: Path) -> list[Path]:
    return sorted((out / "abandoned").iterdir()) if (out / "abandoned").is_dir() else []


def test_a_stop_on_the_last_step_defers_its_evaluation_and_the_rerun_ends_like_the_uninterrupted_run(
    tmp_path, tmp_path_factory, cache_dir
):
    args = [*TINY_LM, "--max_steps", "12", "--eval_steps", "10"]
    ref = reference(tmp_path_factory, cache_dir, args)
    result = Run([*args, "--max_steps_per_run", "12"], tmp_path, cache_dir).run_expecting(75)
    assert "its evaluation runs first on resume" in result.stdout + result.stderr
    assert not (tmp_path / "COMPLETE").exists()
    ok(Run([*args, "--max_steps_per_run", "12"], tmp_path, cache_dir).run())  # the command its stop message names
    assert_bitwise_same_run(ref, tmp_path)
    assert evals(tmp_path) == evals(ref)
    assert final_metrics(tmp_path) == final_metrics(ref)  # last evaluation, best metric and best step included
    assert final_metrics(tmp_path)["best_step"] == 12
    # the evaluation re-run on resume is recorded in the checkpoint it belongs to (retention ranks by it)
    m = manifest(tmp_path, 12)
    assert m["metrics_step"] == 12 and m["metrics"]["eval/loss"] == final_metrics(ref)["eval/loss"]
    progress = json.loads((tmp_path / "checkpoints" / "step-00000012" / "progress.json").read_text())
    assert progress["eval_pending"] is False and progress["best_step"] == 12


def test_a_stop_on_an_eval_step_mid_run_keeps_every_evaluation_and_the_best_pool(tmp_path, tmp_path_factory, cache_dir):
    ref = reference(tmp_path_factory, cache_dir, TINY_LM)  # evaluations at 5, 10, ..., 25 and 27
    Run([*TINY_LM, "--max_steps_per_run", "10"], tmp_path, cache_dir).run_expecting(75)
    assert manifest(tmp_path, 10)["metrics_step"] == 5  # stopped before step 10's evaluation
    ok(Run(TINY_LM, tmp_path, cache_dir).run())
    assert_bitwise_same_run(ref, tmp_path)
    assert evals(tmp_path) == evals(ref)
    assert manifest(tmp_path, 10)["metrics_step"] == 10
    assert final_metrics(tmp_path) == final_metrics(ref)


def test_resuming_an_older_checkpoint_starts_a_branch_that_is_kept_and_continued(tmp_path, tmp_path_factory, cache_dir):
    args = [*TINY_LM, "--max_steps", "20", "--eval_steps", "4", "--save_total_limit", "2"]
    ref = reference(tmp_path_factory, cache_dir, args)
    Run([*args, "--max_steps_per_run", "18"], tmp_path, cache_dir).run_expecting(75)
    before = checkpoint_steps(tmp_path)
    best = min(evals(tmp_path), key=lambda r: r["eval/loss"])["step"]
    assert best < max(before)
    branch = [*args, "--resume_from_checkpoint", "best"]
    result = Run([*branch, "--max_steps_per_run", "1"], tmp_path, cache_dir).run_expecting(75)
    warning = [ln for ln in result.stderr.splitlines() if " WARNING branching from" in ln]
    assert len(warning) == 1 and f"step-{best:08d}" in warning[0]
    (aside,) = abandoned(tmp_path)
    moved = sorted(int(p.name[5:]) for p in (aside / "checkpoints").iterdir())
    assert moved == [s for s in before if s > best]  # moved, not deleted
    assert logged_steps(aside)[-1] == max(before)  # with the log of the abandoned line
    assert checkpoint_steps(tmp_path)[-1] == best + 1  # the branch's own checkpoint survived retention
    # the same command again continues the branch: it neither branches again nor goes back to the old line
    result = ok(Run(branch, tmp_path, cache_dir).run())
    assert "continuing the branch" in result.stderr and len(abandoned(tmp_path)) == 1
    assert logged_steps(tmp_path) == list(range(1, 21))
    assert_bitwise_same_run(ref, tmp_path)  # same settings: the branch retrains exactly what was abandoned


def test_an_explicit_checkpoint_path_acts_once_so_a_requeued_command_continues(tmp_path, cache_dir):
    args = [*TINY_LM, "--max_steps", "14"]
    Run([*args, "--max_steps_per_run", "9"], tmp_path, cache_dir).run_expecting(75)
    path = str(tmp_path / "checkpoints" / "step-00000004")
    again = [*args, "--resume_from_checkpoint", path, "--max_steps_per_run", "4"]
    Run(again, tmp_path, cache_dir).run_expecting(75)  # branch at 4, stop at 8
    result = Run(again, tmp_path, cache_dir).run_expecting(75)  # continues at 8 (a requeue), stops at 12
    assert "Resuming from" in result.stdout + result.stderr and "step-00000008: step 8" in result.stdout + result.stderr
    ok(Run(again, tmp_path, cache_dir).run())
    assert logged_steps(tmp_path) == list(range(1, 15)) and len(abandoned(tmp_path)) == 1


def test_starting_over_moves_the_old_run_aside_and_never_mixes_two_runs(tmp_path, cache_dir):
    Run([*TINY_LM, "--max_steps", "8", "--max_steps_per_run", "5"], tmp_path, cache_dir).run_expecting(75)
    old = checkpoint_steps(tmp_path)
    changed = [*TINY_LM, "--max_steps", "6", "--seed", "8"]
    refused = Run(changed, tmp_path, cache_dir).run_expecting(2)
    assert "--resume_from_checkpoint none" in refused.stderr and "Traceback" not in refused.stderr
    result = ok(Run([*changed, "--resume_from_checkpoint", "none"], tmp_path, cache_dir).run())
    assert "Resuming" not in result.stdout + result.stderr and "WARNING starting over" in result.stderr
    (aside,) = abandoned(tmp_path)
    assert sorted(int(p.name[5:]) for p in (aside / "checkpoints").iterdir()) == old  # nothing deleted
    assert len((aside / "train_log.jsonl").read_text().splitlines()) >= 5
    seeds = {manifest(tmp_path, s)["settings"]["seed"] for s in checkpoint_steps(tmp_path)}
    assert seeds == {8} and logged_steps(tmp_path) == list(range(1, 7))  # one run per folder
    # the same command again does not start over a second time
    again = ok(Run([*changed, "--resume_from_checkpoint", "none"], tmp_path, cache_dir).run())
    assert "already complete" in again.stderr and len(abandoned(tmp_path)) == 1


def test_a_finished_run_asked_for_more_continues_and_otherwise_checks_its_settings(tmp_path, cache_dir):
    ok(Run([*TINY_LM, "--max_steps", "10"], tmp_path, cache_dir).run())
    same = ok(Run([*TINY_LM, "--max_steps", "10"], tmp_path, cache_dir).run())
    assert "already complete" in same.stderr
    refused = Run([*TINY_LM, "--max_steps", "10", "--seed", "8"], tmp_path, cache_dir).run_expecting(2)
    assert "seed" in refused.stderr and "Traceback" not in refused.stderr
    more = ok(Run([*TINY_LM, "--max_steps", "14"], tmp_path, cache_dir).run())
    assert "WARNING the run now ends at step 14, not 10" in more.stderr
    assert "Resuming from" in more.stdout + more.stderr and "step-00000010: step 10" in more.stdout + more.stderr
    assert logged_steps(tmp_path) == list(range(1, 15)) and final_metrics(tmp_path)["step"] == 14
    lrs = [r["lr"] for r in train_records(tmp_path)]
    # the linear schedule rebuilt for 14 steps (3 of warmup) gives step 11 its rate: no wasted zero-LR update
    assert lrs[10] == pytest.approx(0.003 * (14 - 10) / (14 - 3), rel=1e-9)
    epochs = ok(Run([*TINY_LM], tmp_path, cache_dir).run())  # 3 epochs asked: 27 steps, more than the 14 done
    assert "ends at step 27, not 14" in epochs.stderr and final_metrics(tmp_path)["step"] == 27


def test_an_elastic_resume_with_another_global_batch_trains_every_epoch_and_aligns_windows(tmp_path, cache_dir):
    args = [*TINY_LM, "--record_samples"]  # 9 batches of 4 per epoch, 27 steps in 3 epochs
    Run([*args, "--max_steps_per_run", "14"], tmp_path, cache_dir).run_expecting(75)  # epoch 1, 5 batches in
    result = ok(Run([*args, "--gradient_accumulation_steps", "2"], tmp_path, cache_dir).run())
    assert "global batch changed" in result.stdout + result.stderr
    metrics = final_metrics(tmp_path)
    assert metrics["epoch"] == 3 and metrics["samples_seen"] == 3 * 36  # not ended early
    micro = [json.loads(line) for line in (tmp_path / "samples" / "rank0.jsonl").read_text().splitlines()]
    per_step = {}
    for record in micro:
        per_step[record["step"]] = per_step.get(record["step"], 0) + 1
    assert per_step[15] == 2 and per_step[16] == 2  # windows [5, 6] and [7, 8], not a 1-batch step scaled by 1/2
    assert max(per_step) == 14 + 2 + 5  # the rest of epoch 1 (2 steps) and epoch 2 (5 steps)


def test_training_data_changed_under_a_checkpoint_is_refused_in_one_line(tmp_path, cache_dir):
    lines = [ln for ln in (Path(subprocess.__file__)).read_text().splitlines() if ln.strip()]
    data = tmp_path / "train.txt"
    data.write_text("\n".join(lines) + "\n")
    args = [*TINY_LM, "--train_file", str(data), "--max_train_samples", "200", "--num_train_epochs", "1"]
    out = tmp_path / "out"
    Run([*args, "--max_steps_per_run", "40"], out, cache_dir).run_expecting(75)
    data.write_text("\n".join(lines[: len(lines) // 10]) + "\n")  # edited in place: a tenth of it left
    result = Run(args, out, cache_dir).run(timeout=120)  # it used to spin forever here
    assert result.returncode == 2, result.stderr[-3000:]
    error = [ln for ln in result.stderr.splitlines() if ln.startswith("error:")]
    assert len(error) == 1 and "training data changed" in error[0] and "--train_file" in error[0]
    assert "Traceback" not in result.stderr and checkpoint_steps(out)[-1] == 40
    assert (out / "train.log").read_text().splitlines()[-1].endswith(f"ERROR {error[0]}")  # why the run stopped


def test_slurm_job_output_dir_defaults_to_the_presets_own(tmp_path):
    preset = REPO / "configs" / "codebert_defect_t4.yaml"
    expected = next(
        ln.split(":", 1)[1].strip() for ln in preset.read_text().splitlines() if ln.startswith("output_dir")
    )
    script = 'source scripts/slurm/common.sh && echo "OUT=$OUTPUT_DIR"'
    env = {"PATH": str(Path(PYTHON).parent) + ":/usr/bin:/bin", "REPO_DIR": str(REPO), "TRAIN_CONFIG": str(preset),
           "SCRATCH": str(tmp_path), "HOME": str(tmp_path)}  # fmt: skip
    result = subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True, cwd=REPO, timeout=60)
    assert f"OUT={expected}" in result.stdout, result.stdout + result.stderr
