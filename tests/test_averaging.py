"""--ema_decay and --swa_start_epoch: the weight average is part of the checkpoint (kill anywhere, resume: bitwise
the same average), evaluated beside the raw model, and final/ holds it with the raw model in final_raw/."""

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
# 3 epochs of 9 steps (5 in 2 processes): epochs 1 and 2 are averaged, at a constant rate from epoch 1 on
SWA = [*TINY_LM, "--swa_start_epoch", "1", "--swa_lr", "0.001", "--metric_for_best_model", "eval_swa/loss"]


def eval_records(out):
    return [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines() if "eval/loss" in line]


@pytest.mark.slow
@pytest.mark.parametrize(
    "flags,launcher,kill_at",
    [(EMA, "python", 11), (EMA, "cpu_ddp", 7), (SWA, "python", 20), (SWA, "cpu_ddp", 12)],
    ids=["ema-1-process", "ema-2-process-ddp", "swa-1-process", "swa-2-process-ddp"],
)
def test_a_run_with_an_average_killed_anywhere_ends_with_the_same_average_bitwise(flags, launcher, kill_at, tmp_path,
                                                                                  cache_dir):  # fmt: skip
    kind = "ema" if flags is EMA else "swa"
    ref = tmp_path / "ref"
    ok(Run(flags, ref, cache_dir, launcher).run())
    out = tmp_path / "killed"
    Run(flags, out, cache_dir, launcher).kill_at_step(kill_at)
    resumed = max(checkpoint_steps(out))
    assert 0 < resumed < train_records(ref)[-1]["step"]
    ok(Run(flags, out, cache_dir, launcher).run())
    assert_bitwise_same_run(ref, out)  # final/ (the average), every loss and LR
    assert eval_records(out) == eval_records(ref)  # eval_ema/* or eval_swa/* included
    raw_ref, raw = (load_file(str(d / "final_raw" / "model.safetensors")) for d in (ref, out))
    assert all(torch.equal(raw_ref[k], raw[k]) for k in raw_ref)
    average = final_weights(out)
    assert any(not torch.equal(average[k], raw[k]) for k in raw), "final/ must be the average, not the raw model"
    last = max(checkpoint_steps(out))
    saved = load_file(str(out / "checkpoints" / f"step-{last:08d}" / f"{kind}.safetensors"))
    assert all(torch.equal(saved[k], average[k]) for k in saved)
    assert f"eval_{kind}/loss" in eval_records(out)[0]


def test_swa_averages_the_epoch_end_weights_at_a_constant_rate_from_its_start_epoch(tmp_path, cache_dir):
    out = tmp_path / "run"
    ok(Run(SWA, out, cache_dir).run())
    assert {9, 18, 27} <= set(checkpoint_steps(out))  # epoch ends are always checkpointed
    rates = {r["step"]: r["lr"] for r in train_records(out)}
    assert all(rates[s] == 0.001 for s in range(10, 28)) and rates[9] != 0.001, rates
    ends = [load_file(str(out / "checkpoints" / f"step-{s:08d}" / "model.safetensors")) for s in (18, 27)]
    average = final_weights(out)
    for name, tensor in average.items():  # the mean of the two epoch-end weights (in fp32, as averaged)
        if name in ends[0]:
            expected = ends[0][name].float().lerp(ends[1][name].float(), 0.5)
            assert torch.equal(tensor, expected.to(tensor.dtype)), name
    evals = eval_records(out)
    before = [r for r in evals if r["step"] < 18]
    assert before and all(r["eval_swa/loss"] == r["eval/loss"] for r in before)  # nothing averaged yet: the model
    assert evals[-1]["eval_swa/loss"] != evals[-1]["eval/loss"]


def test_ema_flags_are_checked_in_one_line(tmp_path, cache_dir):
    for flags, message in {
        ("--ema_decay", "1"): "--ema_decay must be in [0, 1), got 1.0",
        ("--ema_decay", "0", "--metric_for_best_model", "eval_ema/loss"): "is not a causal_lm metric",
        ("--swa_start_epoch", "1", "--metric_for_best_model", "eval_ema/loss"): "is not a causal_lm metric",
        ("--swa_lr", "0.01"): "--swa_lr needs --swa_start_epoch",
        ("--swa_start_epoch", "3"): "--swa_start_epoch 3: the run ends 3 epoch(s) (0..2), so none would be averaged",
        ("--swa_start_epoch", "-1"): "--swa_start_epoch must be >= 0",
        ("--swa_start_epoch", "0", "--ema_decay", "0.9"): "--ema_decay and --swa_start_epoch: choose one",
        ("--swa_start_epoch", "0", "--swa_lr", "0"): "--swa_lr must be > 0",
    }.items():
        result = Run([*TINY_LM, *flags], tmp_path / "bad", cache_dir).run_expecting(2)
        assert message in result.stderr and "Traceback" not in result.stderr, result.stderr[-2000:]


def test_a_checkpoint_without_an_average_is_not_resumed_with_one(tmp_path, cache_dir):
    out = tmp_path / "run"
    Run([*TINY_LM, "--max_steps_per_run", "4"], out, cache_dir).run_expecting(75)
    result = Run([*TINY_LM, "--ema_decay", "0.9"], out, cache_dir).run_expecting(2)
    assert "ema_decay" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("flags", [EMA, SWA], ids=["ema", "swa"])
def test_export_picks_the_average_by_default_and_the_raw_weights_when_asked(flags, tmp_path, cache_dir):
    kind = "ema" if flags is EMA else "swa"
    out = tmp_path / "run"
    ok(Run([*flags, "--max_steps", "20"], out, cache_dir).run())
    ckpt = out / "checkpoints" / "step-00000020"

    def export(*flags: str, checkpoint=ckpt) -> subprocess.CompletedProcess:
        target = tmp_path / f"export-{checkpoint.name}-{'-'.join(flags) or 'default'}"
        cmd = [PYTHON, CHECKPOINTS, "export", str(checkpoint), "--to", str(target), "--cache_dir", str(cache_dir),
               *flags]  # fmt: skip
        result = subprocess.run(cmd, capture_output=True, text=True)
        result.weights = load_file(str(target / "model.safetensors")) if result.returncode == 0 else None
        return result

    for exported, folder in ((export(), "final"), (export("--weights", kind), "final"),
                             (export("--weights", "raw"), "final_raw")):  # fmt: skip
        expected = load_file(str(out / folder / "model.safetensors"))
        assert ok(exported).weights.keys() == expected.keys()
        assert all(torch.equal(exported.weights[k], expected[k]) for k in expected), folder
    other = "swa" if kind == "ema" else "ema"
    result = export("--weights", other)
    assert result.returncode == 2 and f"holds no {other} weight average" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
    if kind == "swa":  # step 8: before the first epoch end that is averaged
        early = out / "checkpoints" / "step-00000008"
        raw_early = load_file(str(early / "model.safetensors"))
        default = export(checkpoint=early)
        assert all(torch.equal(ok(default).weights[k], raw_early[k]) for k in raw_early)  # nothing to average yet
        result = export("--weights", "swa", checkpoint=early)
        assert (
            result.returncode == 2 and "has averaged nothing yet" in result.stderr and "Traceback" not in result.stderr
        )
