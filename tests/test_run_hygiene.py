"""What a user sees and trusts: levelled logs kept in train.log, no library noise, a run that stops on NaN instead of
saving it, TensorBoard showing each step once after a kill, and flag mistakes caught at parse time."""

from __future__ import annotations

import json
import math
import re
import subprocess

import pytest
from conftest import PYTHON, REPO, TINY_LM, TRAIN, Run, checkpoint_steps, final_weights, train_records

from resumable.config import parse_config
from resumable.errors import UserError


def test_every_log_line_has_a_level_and_train_log_keeps_them_across_runs(tmp_path, cache_dir):
    out = tmp_path / "run"
    first = Run([*TINY_LM, "--max_steps", "4", "--checkpointing_steps", "2"], out, cache_dir).run_expecting(0)
    lines = [line for line in first.stderr.splitlines() if " INFO " in line or " WARNING " in line]
    assert any("Data: 36 training" in line for line in lines), first.stderr
    assert any("parameters" in line and "steps in total" in line for line in lines), first.stderr
    # a corrupted newest checkpoint is skipped with a WARNING; the rerun asks for more steps so it resumes
    newest = sorted((out / "checkpoints").glob("step-*"))[-1]
    (newest / "progress.json").write_text("{}")
    second = Run([*TINY_LM, "--max_steps", "6", "--checkpointing_steps", "2"], out, cache_dir).run_expecting(0)
    assert any(" WARNING " in line and "skipping checkpoint" in line for line in second.stderr.splitlines())
    log = (out / "train.log").read_text().splitlines()
    assert sum("fresh start" in line for line in log) == 1 and any("skipping checkpoint" in line for line in log)
    assert all(line.split(" ")[2] in ("DEBUG", "INFO", "WARNING", "ERROR") for line in log), log


def test_start_up_says_it_builds_the_corpus_and_tokenizer_once_and_tokenizes(tmp_path):
    def info(result) -> list[str]:
        return [line.split(" INFO ", 1)[1] for line in result.stderr.splitlines() if " INFO " in line]

    fresh = tmp_path / "fresh_cache"  # nothing built yet: the slow first start-up must say what it is doing
    first = info(Run([*TINY_LM, "--max_steps", "1"], tmp_path / "a", fresh).run_expecting(0))
    order = ["Building the embedded LM corpus", "Training a byte-level BPE tokenizer", "Tokenizing", "Data:", "Model:"]
    found = [next(i for i, line in enumerate(first) if line.startswith(what)) for what in order]
    assert found == sorted(found), first
    again = info(Run([*TINY_LM, "--max_steps", "1"], tmp_path / "b", fresh).run_expecting(0))
    assert not any(line.startswith(("Building", "Training a")) for line in again), again  # both cached


def test_library_noise_a_user_cannot_act_on_is_silenced(tmp_path, cache_dir):
    result = Run([*TINY_LM, "--max_steps", "4", "--checkpointing_steps", "2"], tmp_path, cache_dir).run_expecting(0)
    for noise in ("Removed shared tensor", "loss_type=None", "Writing model shards"):
        assert noise not in result.stderr, result.stderr


@pytest.mark.parametrize("writer", ["sync", "async"])
def test_a_nan_loss_stops_before_the_update_and_saves_nothing_after_it(tmp_path, cache_dir, writer):
    # async: the step-4 checkpoint is still being written (2 s longer) when step 5 diverges; the stop waits for it
    extra, slow = (["--async_save"], {"RESUMABLE_DELAY": "async_write:2"}) if writer == "async" else ([], {})
    env = {"RESUMABLE_FAULT": "nan_loss:5", **slow}
    run = Run([*TINY_LM, "--checkpointing_steps", "2", *extra], tmp_path, cache_dir, env=env)
    result = run.run_expecting(3)
    errors = [line for line in result.stderr.splitlines() if " ERROR " in line]
    assert len(errors) == 1 and "step 5" in errors[0] and "step-00000004" in errors[0], result.stderr
    assert "Traceback" not in result.stderr
    assert checkpoint_steps(tmp_path) == [2, 4]
    assert json.loads((tmp_path / "run_status.json").read_text())["status"] == "diverged"
    # what the line advises: the same command with a lower --learning_rate resumes from that checkpoint
    again = Run([*TINY_LM, "--checkpointing_steps", "2", "--learning_rate", "0.001"], tmp_path, cache_dir)
    assert "Resuming from" in again.run_expecting(0).stderr and train_records(tmp_path)[4]["step"] == 5


def test_skip_step_skips_the_poisoned_update_counts_it_and_finishes_finite(tmp_path, cache_dir):
    args = [*TINY_LM, "--nan_policy", "skip_step", "--max_steps", "8"]
    result = Run(args, tmp_path, cache_dir, env={"RESUMABLE_FAULT": "nan_loss:3"}).run_expecting(0)
    assert any(" WARNING " in line and "step 3" in line and "skipped" in line for line in result.stderr.splitlines())
    losses = {r["step"]: r["train/loss"] for r in train_records(tmp_path) if "train/loss" in r}
    assert losses[3] is None and all(math.isfinite(v) for s, v in losses.items() if s != 3)  # valid JSON: null
    assert "NaN" not in (tmp_path / "train_log.jsonl").read_text()
    assert all(t.isfinite().all() for t in final_weights(tmp_path).values())
    progress = json.loads((tmp_path / "checkpoints" / "step-00000008" / "progress.json").read_text())
    assert progress["skipped_steps"] == 1 and progress["nonfinite_in_a_row"] == 0


def test_skip_step_gives_up_after_too_many_in_a_row(tmp_path, cache_dir):
    args = [*TINY_LM, "--nan_policy", "skip_step", "--max_nan_skips", "0", "--log_level", "warning"]
    result = Run(args, tmp_path, cache_dir, env={"RESUMABLE_FAULT": "nan_loss:2"}).run_expecting(3)
    assert "--max_nan_skips 0" in result.stderr
    # --log_level warning: the ERROR line, and no INFO line on the console or in train.log
    assert " INFO " not in result.stderr and " ERROR step 2: " in result.stderr
    assert " INFO " not in (tmp_path / "train.log").read_text()


def tensorboard_steps(out) -> tuple[list[int], int]:
    from tensorboard.backend.event_processing.event_multiplexer import EventMultiplexer

    mux = EventMultiplexer().AddRunsFromDirectory(str(out / "runs"))
    mux.Reload()
    runs = [name for name in mux.Runs() if "train/loss" in mux.Runs()[name].get("scalars", [])]
    steps = [event.step for run in runs for event in mux.Scalars(run, "train/loss")]
    return steps, len(mux.Runs())


def test_tensorboard_shows_each_step_once_and_one_run_after_a_kill(tmp_path, cache_dir):
    args = [*TINY_LM, "--report_to", "tensorboard", "--logging_steps", "1", "--checkpointing_steps", "4"]
    run = Run(args, tmp_path, cache_dir)
    run.kill_at_step(7)
    Run(args, tmp_path, cache_dir).run_expecting(0)
    steps, runs = tensorboard_steps(tmp_path)
    assert sorted(steps) == list(range(1, 28)), steps
    assert runs == 1


@pytest.mark.parametrize(
    "flags, named",
    [
        (["--lr_scheduler_type", "foo"], "--lr_scheduler_type"),
        (["--lr_scheduler_type", "reduce_lr_on_plateau"], "--lr_scheduler_type"),
        (["--nan_policy", "never"], "--nan_policy"),
        (["--log_level", "loud"], "--log_level"),
        (["--adam_epsilon", "0"], "--adam_epsilon must be > 0"),
        (["--learning_rate", "1e39"], "--learning_rate must be below 3e38"),
        (["--learning_rate", "inf"], "--learning_rate must be finite"),
        (["--adam_beta2", "1"], "--adam_beta2 must be in [0, 1)"),
    ],
)
def test_flag_values_that_cannot_work_fail_at_parse_time_in_one_line(tmp_path, flags, named):
    result = subprocess.run(
        [PYTHON, TRAIN, "--output_dir", str(tmp_path / "o"), *flags], capture_output=True, text=True, cwd=REPO
    )
    assert result.returncode == 2 and named in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "o").exists()


def test_a_tracker_that_is_not_installed_is_an_error_and_all_takes_what_is_there(monkeypatch, tmp_path):
    import resumable.trackers as trackers

    monkeypatch.setattr(trackers, "is_installed", lambda name: name == "tensorboard")
    with pytest.raises(UserError, match=r"--report_to wandb: wandb is not installed \(pip install -e '\.\[wandb\]'\)"):
        parse_config(["--output_dir", str(tmp_path), "--report_to", "wandb"])
    assert trackers.choose_trackers("all") == ["tensorboard"]
    assert "wandb not installed" in trackers.describe("all", ["tensorboard"])


def test_wandb_without_a_key_or_offline_mode_is_an_error_and_all_leaves_it_out(monkeypatch, tmp_path):
    import resumable.trackers as trackers

    monkeypatch.setattr(trackers, "is_installed", lambda name: True)
    for var in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_BASE_URL"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb"))
    with pytest.raises(UserError, match=r"^--report_to wandb: wandb is not logged in \(run `wandb login`"):
        parse_config(["--output_dir", str(tmp_path), "--report_to", "wandb"])
    assert trackers.choose_trackers("all") == ["tensorboard"]
    assert "wandb not logged in" in trackers.describe("all", ["tensorboard"])
    (tmp_path / "netrc").write_text("machine api.wandb.ai\n  login user\n  password abc\n")  # what wandb login writes
    assert trackers.choose_trackers("wandb") == ["wandb"]
    (tmp_path / "netrc").unlink()
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert trackers.choose_trackers("all") == ["tensorboard", "wandb"]


def test_a_skipped_update_under_fp16_ends_the_loss_scaler_iteration_and_lowers_its_scale():
    """Without it the next step's unscale_ (gradient clipping) raises 'unscale_() has already been called'."""
    from types import SimpleNamespace

    import torch

    from resumable.divergence import skip_update

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    before = [p.detach().clone() for p in model.parameters()]
    scaler.scale(model(torch.ones(2, 4)).sum() * float("nan")).backward()
    scaler.unscale_(optimizer)  # what accelerator.clip_grad_norm_ does under fp16
    skip_update(SimpleNamespace(scaler=scaler))
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters())) and scaler.get_scale() == 512.0
    optimizer.zero_grad()
    scaler.scale(model(torch.ones(2, 4)).sum()).backward()
    scaler.unscale_(optimizer)  # raised before skip_update existed
    scaler.step(optimizer)
    scaler.update()
    assert not all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_resuming_with_a_lower_learning_rate_continues_the_schedule_from_the_new_peak(tmp_path, cache_dir):
    """What the divergence message advises: resume the last good checkpoint with a lower --learning_rate."""
    args = [*TINY_LM, "--max_steps", "10"]
    Run([*args, "--max_steps_per_run", "4"], tmp_path, cache_dir).run_expecting(75)
    result = Run([*args, "--learning_rate", "0.001"], tmp_path, cache_dir).run_expecting(0)
    assert "WARNING --learning_rate 0.001 differs from the checkpoint's 0.003" in result.stderr
    lrs = [r["lr"] for r in train_records(tmp_path)]
    assert lrs[3] == pytest.approx(0.003 * (10 - 3) / (10 - 3), rel=1e-9)  # step 4, before the stop
    assert lrs[4:] == pytest.approx([0.001 * (10 - s) / (10 - 3) for s in range(4, 10)], rel=1e-9)


def test_train_py_help_lists_every_flag_with_its_doc_and_exits_0():
    from resumable.config import field_names

    result = subprocess.run([PYTHON, TRAIN, "--help"], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert all(f"--{name}" in result.stdout for name in field_names())
    assert "run the same command again to resume" in result.stdout and "Exit codes: 0 finished" in result.stdout


def test_the_progress_bar_shows_the_loss_and_lr_of_the_step_it_counts(tmp_path, cache_dir):
    env = {"TQDM_MININTERVAL": "0", "TQDM_MINITERS": "1"}  # render every step, not once a second
    result = Run([*TINY_LM, "--max_steps", "6"], tmp_path, cache_dir, env=env).run_expecting(0)
    shown = re.findall(r"(\d+)/6 \[[^\]]*loss=([\d.]+), lr=([\d.e+-]+)\]", result.stderr)
    records = {r["step"]: r for r in train_records(tmp_path)}
    assert {int(step) for step, _, _ in shown} >= {2, 3, 4, 5, 6}, result.stderr[-2000:]
    for step, loss, lr in shown:
        assert loss == f"{records[int(step)]['train/loss']:.4f}" and lr == f"{records[int(step)]['lr']:.2e}", step
