"""The core promise: SIGKILL a run anywhere, run the same command again, and get the uninterrupted run bit for bit."""

from __future__ import annotations

import json

import pytest
from conftest import TINY_CLS, TINY_LM, Run, assert_bitwise_same_run, checkpoint_steps, ok, train_records

pytestmark = pytest.mark.slow

_references: dict[tuple, object] = {}


def reference(tmp_path_factory, cache_dir, args: list[str], launcher: str = "python"):
    """The uninterrupted run for `args`, trained once per session and shared by the tests that compare to it."""
    key = (tuple(args), launcher)
    if key not in _references:
        out = tmp_path_factory.mktemp("reference")
        ok(Run(args, out, cache_dir, launcher).run())
        _references[key] = out
    return _references[key]


def kill_and_resume(tmp_path, cache_dir, args, kill_after_step, launcher="python", resume_args=()):
    out = tmp_path / "killed"
    Run(args, out, cache_dir, launcher).kill_at_step(kill_after_step)
    assert not (out / "COMPLETE").exists()
    survivors = checkpoint_steps(out)
    result = ok(Run([*args, *resume_args], out, cache_dir, launcher).run())
    return out, survivors, result


def test_resume_mid_epoch_in_a_later_epoch_is_bitwise_exact(tmp_path, tmp_path_factory, cache_dir):
    ref = reference(tmp_path_factory, cache_dir, TINY_LM)
    out, survivors, result = kill_and_resume(tmp_path, cache_dir, TINY_LM, kill_after_step=15)
    # 9 steps per epoch: checkpoint 12 (or 16) is inside the second epoch, not at its start
    resumed = max(survivors)
    assert resumed % 9 != 0 and resumed > 9
    line = next(ln for ln in result.stderr.splitlines() + result.stdout.splitlines() if "Resuming from" in ln)
    assert f"step-{resumed:08d}: step {resumed}, epoch 1, batch {resumed - 9}/9" in line
    assert f"fast-forwarded {resumed - 9} batches in" in line
    assert_bitwise_same_run(ref, out)


def test_resume_at_an_epoch_boundary_is_bitwise_exact(tmp_path, tmp_path_factory, cache_dir):
    ref = reference(tmp_path_factory, cache_dir, TINY_LM)
    args = [*TINY_LM, "--checkpointing_steps", "0", "--keep_best", "0"]  # checkpoints only at epoch ends: 9, 18
    out, survivors, _ = kill_and_resume(tmp_path, cache_dir, args, kill_after_step=11)
    assert max(survivors) in (9, 18)
    assert_bitwise_same_run(ref, out)


def test_checkpointing_frequency_does_not_change_training(tmp_path, tmp_path_factory, cache_dir):
    ref = reference(tmp_path_factory, cache_dir, TINY_LM)
    ok(Run([*TINY_LM, "--checkpointing_steps", "1"], tmp_path, cache_dir).run())
    assert_bitwise_same_run(ref, tmp_path)


def test_accumulation_with_odd_batches_per_epoch_resumes_bitwise(tmp_path, tmp_path_factory, cache_dir):
    args = [*TINY_LM, "--gradient_accumulation_steps", "2", "--checkpointing_steps", "3"]  # 5 steps/epoch
    ref = reference(tmp_path_factory, cache_dir, args)
    assert len(train_records(ref)) == 15  # 9 micro-batches -> 4 full windows + 1 short one, per epoch
    out, survivors, _ = kill_and_resume(tmp_path, cache_dir, args, kill_after_step=8)
    assert max(survivors) in (5, 6, 9)
    assert_bitwise_same_run(ref, out)


def test_short_last_window_is_scaled_like_a_full_batch(tmp_path, cache_dir):
    """Accumulating 2 x 4 must match one batch of 8, including the epoch's last window of a single micro-batch.

    Float sums differ in order, so this equivalence (not a resume) is checked to 1e-5. A last window divided by
    gradient_accumulation_steps instead of its real size would be off by 2x there.
    """
    no_dropout = "n_layer=1,n_embd=32,n_head=2,resid_pdrop=0.0,embd_pdrop=0.0,attn_pdrop=0.0"
    base = [*TINY_LM, "--config_overrides", no_dropout, "--num_train_epochs", "2", "--eval_steps", "0"]
    ok(Run([*base, "--gradient_accumulation_steps", "2"], tmp_path / "acc", cache_dir).run())
    ok(Run([*base, "--per_device_train_batch_size", "8"], tmp_path / "big", cache_dir).run())
    acc, big = train_records(tmp_path / "acc"), train_records(tmp_path / "big")
    assert len(acc) == len(big) == 10
    for a, b in zip(acc, big):
        assert a["train/loss"] == pytest.approx(b["train/loss"], rel=1e-5)


def test_two_process_ddp_through_the_real_launcher_resumes_bitwise(tmp_path, tmp_path_factory, cache_dir):
    args = [*TINY_LM, "--max_train_samples", "72"]  # 2 ranks x 9 batches of 4
    ref = reference(tmp_path_factory, cache_dir, args, launcher="cpu_ddp")
    manifest = json.loads((ref / "checkpoints" / "step-00000027" / "manifest.json").read_text())
    assert manifest["world_size"] == 2  # really distributed, not two independent runs
    assert {"random_states_0.pkl", "random_states_1.pkl"} <= set(manifest["files"])
    out, survivors, _ = kill_and_resume(tmp_path, cache_dir, args, kill_after_step=14, launcher="cpu_ddp")
    assert max(survivors) > 9
    assert_bitwise_same_run(ref, out)


def test_dataloader_workers_resume_bitwise(tmp_path, tmp_path_factory, cache_dir):
    args = [*TINY_LM, "--dataloader_num_workers", "2"]
    ref = reference(tmp_path_factory, cache_dir, args)
    assert_bitwise_same_run(reference(tmp_path_factory, cache_dir, TINY_LM), ref)  # workers change nothing
    out, _, _ = kill_and_resume(tmp_path, cache_dir, args, kill_after_step=13)
    assert_bitwise_same_run(ref, out)


def test_sequence_classification_resumes_bitwise(tmp_path, tmp_path_factory, cache_dir):
    ref = reference(tmp_path_factory, cache_dir, TINY_CLS)
    out, survivors, _ = kill_and_resume(tmp_path, cache_dir, TINY_CLS, kill_after_step=14)
    assert max(survivors) > 9
    assert_bitwise_same_run(ref, out)
    metrics = json.loads((out / "final_metrics.json").read_text())
    assert {"eval/f1", "eval/accuracy", "eval/precision", "eval/recall", "baseline/majority_f1"} <= metrics.keys()


def test_kill_during_checkpoint_write_resumes_from_previous_complete_one(tmp_path, tmp_path_factory, cache_dir):
    ref = reference(tmp_path_factory, cache_dir, TINY_LM)
    out = tmp_path / "run"
    # A real SIGKILL delivered by the process to itself after the state files are written, before the manifest.
    crashed = Run(TINY_LM, out, cache_dir, env={"RESUMABLE_FAULT": "kill_before_manifest:12"}).run()
    assert crashed.returncode == -9
    assert (out / "checkpoints" / ".tmp-step-00000012" / "model.safetensors").exists()
    survivors = checkpoint_steps(out)
    assert 12 not in survivors and {4, 8, 9} <= set(survivors)
    result = ok(Run(TINY_LM, out, cache_dir).run())
    assert f"Resuming from {out / 'checkpoints' / f'step-{max(survivors):08d}'}" in result.stderr + result.stdout
    assert not (out / "checkpoints" / ".tmp-step-00000012").exists()  # the half-written folder is cleaned up
    assert_bitwise_same_run(ref, out)


@pytest.mark.parametrize("launcher", ["python", "cpu_ddp"])
def test_bf16_mixed_precision_on_cpu_resumes_bitwise(launcher, tmp_path, tmp_path_factory, cache_dir, monkeypatch):
    # One intra-op thread per process, as torchrun sets for the DDP case: with two threads one run in five of the
    # whole suite differed in the last bits from step 14 on (suspected: threaded CPU bf16 kernels; README).
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    data = ["--max_train_samples", "72"] if launcher == "cpu_ddp" else []  # 9 batches per rank either way
    fp32 = [*TINY_LM, *data]
    # one process also runs --deterministic (torch's deterministic algorithms): it must train and resume the same
    args = [*fp32, "--mixed_precision", "bf16", *(["--deterministic", "true"] if launcher == "python" else [])]
    ref = reference(tmp_path_factory, cache_dir, args, launcher=launcher)
    assert "precision bf16" in (ref / "train.log").read_text()
    # really in bf16: the losses differ from the fp32 run's
    assert [r["train/loss"] for r in train_records(ref)] != [
        r["train/loss"] for r in train_records(reference(tmp_path_factory, cache_dir, fp32, launcher=launcher))
    ]
    out, survivors, _ = kill_and_resume(tmp_path, cache_dir, args, kill_after_step=14, launcher=launcher)
    assert max(survivors) > 9
    assert_bitwise_same_run(ref, out)
