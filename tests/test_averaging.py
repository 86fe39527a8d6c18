"""--ema_decay: the weight average is part of the checkpoint (kill anywhere, resume: bitwise the same average),
evaluated beside the raw model, and final/ holds it with the raw model in final_raw/."""

from __future__ import annotations

import json
import subprocess

import pytest
import torch
from conftest import (
    PYTHON,
    REPO,
    TINY_LM,
    Run,
    assert_bitwise_same_run,
    checkpoint_steps,
    final_weights,
    ok,
    train_records,
)
from safetensors.torch import load_file

CHECKPOINTS = str(REPO / "scripts" / "checkpoints.py")
EMA = [*TINY_LM, "--ema_decay", "0.9", "--metric_for_best_model", "eval_ema/loss"]


def eval_records(out):
    return [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines() if "eval/loss" in line]


@pytest.mark.slow
@pytest.mark.parametrize("launcher,kill_at", [("python", 11), ("cpu_ddp", 7)], ids=["1-process", "2-process-ddp"])
def test_a_run_with_an_ema_killed_anywhere_ends_with_the_same_average_bitwise(launcher, kill_at, tmp_path,
                                                                              cache_dir):  # fmt: skip
    ref = tmp_path / "ref"
    ok(Run(EMA, ref, cache_dir, launcher).run())
    out = tmp_path / "killed"
    Run(EMA, out, cache_dir, launcher).kill_at_step(kill_at)
    resumed = max(checkpoint_steps(out))
    assert 0 < resumed < train_records(ref)[-1]["step"]
    ok(Run(EMA, out, cache_dir, launcher).run())
    assert_bitwise_same_run(ref, out)  # final/ (the average), every loss and LR
    assert eval_records(out) == eval_records(ref)  # eval_ema/* included
    raw_ref, raw = (load_file(str(d / "final_raw" / "model.safetensors")) for d in (ref, out))
    assert all(torch.equal(raw_ref[k], raw[k]) for k in raw_ref)
    average = final_weights(out)
    assert any(not torch.equal(average[k], raw[k]) for k in raw), "final/ must be the average, not the raw model"
    last = max(checkpoint_steps(out))
    saved = load_file(str(out / "checkpoints" / f"step-{last:08d}" / "ema.safetensors"))
    assert all(torch.equal(saved[k], average[k]) for k in saved)
    assert "eval_ema/loss" in eval_records(out)[0]


def test_ema_flags_are_checked_in_one_line(tmp_path, cache_dir):
    for flags, message in {
        ("--ema_decay", "1"): "--ema_decay must be in [0, 1), got 1.0",
        ("--ema_decay", "0", "--metric_for_best_model", "eval_ema/loss"): "is not a causal_lm metric",
    }.items():
        result = Run([*TINY_LM, *flags], tmp_path / "bad", cache_dir).run_expecting(2)
        assert message in result.stderr and "Traceback" not in result.stderr, result.stderr[-2000:]


def test_a_checkpoint_without_an_average_is_not_resumed_with_one(tmp_path, cache_dir):
    out = tmp_path / "run"
    Run([*TINY_LM, "--max_steps_per_run", "4"], out, cache_dir).run_expecting(75)
    result = Run([*TINY_LM, "--ema_decay", "0.9"], out, cache_dir).run_expecting(2)
    assert "ema_decay" in result.stderr and "Traceback" not in result.stderr


def test_export_picks_the_average_by_default_and_the_raw_weights_when_asked(tmp_path, cache_dir):
    out = tmp_path / "run"
    ok(Run([*EMA, "--max_steps", "6"], out, cache_dir).run())
    ckpt = out / "checkpoints" / "step-00000006"

    def export(*flags: str) -> dict:
        target = tmp_path / f"export-{'-'.join(flags) or 'default'}"
        cmd = [PYTHON, CHECKPOINTS, "export", str(ckpt), "--to", str(target), "--cache_dir", str(cache_dir), *flags]
        return ok(subprocess.run(cmd, capture_output=True, text=True)) and load_file(str(target / "model.safetensors"))

    for exported, folder in ((export(), "final"), (export("--weights", "raw"), "final_raw")):
        expected = load_file(str(out / folder / "model.safetensors"))
        assert exported.keys() == expected.keys()
        assert all(torch.equal(exported[k], expected[k]) for k in expected), folder
    plain = tmp_path / "plain"
    ok(Run([*TINY_LM, "--max_steps", "4"], plain, cache_dir).run())
    cmd = [PYTHON, CHECKPOINTS, "export", str(plain / "checkpoints" / "step-00000004"), "--to", str(tmp_path / "x"),
           "--cache_dir", str(cache_dir), "--weights", "ema"]  # fmt: skip
    result = subprocess.run(cmd, capture_output=True, text=True)
    assert result.returncode == 2 and "holds no weight average" in result.stderr and "Traceback" not in result.stderr
