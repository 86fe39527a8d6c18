"""The `make train` job end to end (at reduced steps): outputs, completion, re-runs, resume choices."""

from __future__ import annotations

import json
import subprocess

import pytest
from conftest import ACCELERATE, REPO, TINY_LM, TRAIN, Run, checkpoint_steps, ok

pytestmark = pytest.mark.slow


def test_make_train_job_at_reduced_steps_completes_with_all_outputs(tmp_path, cache_dir):
    out = tmp_path / "tiny_lm"
    cmd = [
        ACCELERATE,
        "launch",
        "--config_file",
        "accelerate_configs/cpu.yaml",
        TRAIN,
        "--config",
        "configs/tiny_lm.yaml",
    ]
    args = ["--max_steps", "12", "--eval_steps", "6", "--checkpointing_steps", "5", "--max_eval_samples", "32"]
    env_cmd = [*cmd, *args, "--output_dir", str(out), "--cache_dir", str(cache_dir)]
    ok(subprocess.run(env_cmd, capture_output=True, text=True, cwd=REPO, timeout=600))
    for name in ("final/model.safetensors", "final/config.json", "final/tokenizer.json", "final_metrics.json",
                 "loss_curve.png", "COMPLETE", "run_status.json"):  # fmt: skip
        assert (out / name).is_file(), name
    assert (out / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert list((out / "runs").rglob("events.out.tfevents.*")), "tensorboard is the default tracker"
    metrics = json.loads((out / "final_metrics.json").read_text())
    assert metrics["step"] == 12 and "eval/perplexity" in metrics and "baseline/unigram_perplexity" in metrics
    assert checkpoint_steps(out) == [6, 10, 12]  # saved 5, 6 (new best), 10, 12; tiny_lm keeps the newest 3
    manifest = json.loads((out / "checkpoints" / "step-00000012" / "manifest.json").read_text())
    assert manifest["step"] == 12 and manifest["epoch"] == 0
    # The same command again: already complete, exit 0, nothing trained or rewritten.
    before = (out / "final" / "model.safetensors").stat().st_mtime_ns
    again = ok(subprocess.run(env_cmd, capture_output=True, text=True, cwd=REPO, timeout=300))
    assert "already complete" in again.stderr
    assert (out / "final" / "model.safetensors").stat().st_mtime_ns == before


def test_final_model_reloads_with_from_pretrained(tmp_path, cache_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ok(Run([*TINY_LM, "--num_train_epochs", "1"], tmp_path, cache_dir).run())
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "final")
    tok = AutoTokenizer.from_pretrained(tmp_path / "final")
    ids = tok("import os\n", return_tensors="pt")["input_ids"]
    assert model(ids).logits.shape[-1] == len(tok)


def test_explicit_checkpoint_path_resumes_from_it(tmp_path, cache_dir):
    args = [*TINY_LM, "--max_steps", "10"]
    Run([*args, "--max_steps_per_run", "9"], tmp_path, cache_dir).run_expecting(75)
    older = tmp_path / "checkpoints" / "step-00000004"
    result = ok(Run([*args, "--resume_from_checkpoint", str(older)], tmp_path, cache_dir).run())
    assert f"Resuming from {older}: step 4" in result.stdout + result.stderr


def test_all_checkpoints_corrupt_refuses_to_silently_start_over(tmp_path, cache_dir):
    args = [*TINY_LM, "--max_steps", "8"]
    Run([*args, "--max_steps_per_run", "5"], tmp_path, cache_dir).run_expecting(75)
    for folder in (tmp_path / "checkpoints").glob("step-*"):
        with open(folder / "optimizer.bin", "r+b") as fh:
            fh.seek(100)
            byte = fh.read(1)
            fh.seek(100)
            fh.write(bytes([byte[0] ^ 1]))
    result = Run(args, tmp_path, cache_dir).run()
    assert result.returncode == 2
    assert "none is valid" in result.stderr and "--resume_from_checkpoint none" in result.stderr
    assert "Traceback" not in result.stderr


def test_save_total_limit_keeps_newest_and_best(tmp_path, cache_dir):
    ok(Run([*TINY_LM, "--checkpointing_steps", "2", "--save_total_limit", "2"], tmp_path, cache_dir).run())
    steps = checkpoint_steps(tmp_path)
    best = json.loads((tmp_path / "final_metrics.json").read_text())["best_step"]
    assert steps[-1] == 27 and best in steps
    assert len(set(steps) - {best}) <= 2


def test_wandb_offline_resume_continues_the_same_run(tmp_path, cache_dir):
    """The tracker run id lives in the checkpoint: a resumed run logs into the same wandb run."""
    args = [*TINY_LM, "--report_to", "wandb", "--num_train_epochs", "1"]
    env = {"WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    Run([*args, "--max_steps_per_run", "4"], tmp_path, cache_dir, env=env).run_expecting(75)
    ok(Run(args, tmp_path, cache_dir, env=env).run())
    runs = sorted(p.name for p in (tmp_path / "wandb").glob("offline-run-*"))
    run_id = json.loads((tmp_path / "checkpoints" / "step-00000004" / "progress.json").read_text())["tracker_run_id"]
    assert len(runs) == 2 and all(name.endswith(f"-{run_id}") for name in runs)


def test_resume_from_best_picks_the_checkpoint_with_the_best_metric_at_its_step(tmp_path, cache_dir):
    args = [*TINY_LM, "--max_steps", "20", "--eval_steps", "4", "--checkpointing_steps", "4"]
    Run([*args, "--max_steps_per_run", "18"], tmp_path, cache_dir).run_expecting(75)
    evals = [
        json.loads(line) for line in (tmp_path / "train_log.jsonl").read_text().splitlines() if "eval/loss" in line
    ]
    best = min(evals, key=lambda r: r["eval/loss"])["step"]
    result = ok(Run([*args, "--resume_from_checkpoint", "best"], tmp_path, cache_dir).run())
    assert f"step-{best:08d}: step {best}," in result.stdout + result.stderr
