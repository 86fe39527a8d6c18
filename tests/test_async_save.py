"""--async_save: training waits only for a CPU copy of the state; the write, hash and commit happen in the
background with the same protocol. The checkpoints are byte for byte the synchronous ones, a kill mid-write leaves
the previous checkpoint the newest, a stop waits for the pending save, and kill/resume stays bitwise."""

from __future__ import annotations

import json
import signal
import time

import pytest
from conftest import TINY_LM, Run, assert_bitwise_same_run, checkpoint_steps, ok
from test_preemption import DDP_LM
from test_resume_exact import reference

ASYNC = [*TINY_LM, "--async_save"]
FILES = ("model.safetensors", "optimizer.bin", "scheduler.bin", "random_states_0.pkl")


def test_async_checkpoints_are_byte_for_byte_the_synchronous_ones(tmp_path, tmp_path_factory, cache_dir):
    ref = reference(tmp_path_factory, cache_dir, TINY_LM)
    out = tmp_path / "async"
    ok(Run(ASYNC, out, cache_dir).run())
    assert checkpoint_steps(out) == checkpoint_steps(ref)
    for step in checkpoint_steps(ref):
        a, b = (d / "checkpoints" / f"step-{step:08d}" for d in (ref, out))
        for name in FILES:
            assert (a / name).read_bytes() == (b / name).read_bytes(), (step, name)
        files = [json.loads((d / "manifest.json").read_text())["files"] for d in (a, b)]
        assert {k: v for k, v in files[0].items() if k != "progress.json"} == {
            k: v for k, v in files[1].items() if k != "progress.json"
        }
    assert_bitwise_same_run(ref, out)
    assert not list((out / "checkpoints").glob(".tmp-*"))


def test_the_weight_average_is_written_in_the_background_as_of_its_step(tmp_path, tmp_path_factory, cache_dir):
    # each background write takes 1 s more: training moves the EMA on meanwhile, the file must hold the step's
    ema = [*TINY_LM, "--ema_decay", "0.9"]
    ref = reference(tmp_path_factory, cache_dir, ema)
    out = tmp_path / "async-ema"
    ok(Run([*ema, "--async_save"], out, cache_dir, env={"RESUMABLE_DELAY": "async_write:1"}).run())
    assert checkpoint_steps(out) == checkpoint_steps(ref)
    for step in checkpoint_steps(ref):
        a, b = (d / "checkpoints" / f"step-{step:08d}" / "ema.safetensors" for d in (ref, out))
        assert a.read_bytes() == b.read_bytes(), step
    assert_bitwise_same_run(ref, out)


def tmp_folders(out):
    return sorted(p.name for p in (out / "checkpoints").glob(".tmp-step-*"))


@pytest.mark.slow
def test_a_kill_mid_background_write_leaves_the_previous_checkpoint_newest_and_resumes_bitwise(
    tmp_path, tmp_path_factory, cache_dir
):
    ref = reference(tmp_path_factory, cache_dir, TINY_LM)
    out = tmp_path / "killed"
    run = Run(ASYNC, out, cache_dir, env={"RESUMABLE_DELAY": "async_write:2"})  # each background write: 2 s more
    run.start()
    deadline = time.monotonic() + 120
    while not (checkpoint_steps(out) and tmp_folders(out)) and time.monotonic() < deadline:
        time.sleep(0.02)  # one checkpoint committed, the next one being written
    writing = tmp_folders(out)
    run.signal_all(signal.SIGKILL)
    run.proc.wait(timeout=30)
    committed = checkpoint_steps(out)
    assert writing and committed, (writing, committed)
    assert max(committed) < int(writing[-1].split("-")[-1])  # the one being written is not taken
    result = ok(Run(ASYNC, out, cache_dir).run())
    assert f"Resuming from {out}/checkpoints/step-{max(committed):08d}" in result.stderr + result.stdout
    assert_bitwise_same_run(ref, out)


@pytest.mark.slow
def test_a_stop_request_waits_for_the_pending_background_save(tmp_path, cache_dir):
    out = tmp_path / "stopped"
    run = Run(ASYNC, out, cache_dir, env={"RESUMABLE_DELAY": "async_write:3"})
    run.start()
    deadline = time.monotonic() + 120
    while not tmp_folders(out) and time.monotonic() < deadline:
        time.sleep(0.02)
    pending = int(tmp_folders(out)[-1].split("-")[-1])
    run.proc.send_signal(signal.SIGTERM)  # mid-write: the stop's own save waits for it, then commits
    assert run.proc.wait(timeout=120) == 75
    status = json.loads((out / "run_status.json").read_text())
    assert pending in checkpoint_steps(out) and status["step"] in checkpoint_steps(out)
    assert not tmp_folders(out)


@pytest.mark.slow
def test_an_async_2_process_run_killed_anywhere_resumes_bitwise(tmp_path, tmp_path_factory, cache_dir):
    ref = reference(tmp_path_factory, cache_dir, DDP_LM, "cpu_ddp")
    out = tmp_path / "ddp"
    Run([*DDP_LM, "--async_save"], out, cache_dir, "cpu_ddp").kill_at_step(7)
    assert checkpoint_steps(out)
    ok(Run([*DDP_LM, "--async_save"], out, cache_dir, "cpu_ddp").run())
    assert_bitwise_same_run(ref, out)


def test_async_save_is_refused_in_one_line_where_the_engine_writes_its_own_shards():
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    from resumable.checkpoint_writer import AsyncCheckpointWriter, CheckpointWriter, checkpoint_writer
    from resumable.errors import UserError

    cfg = SimpleNamespace(async_save=True)
    for kind, stage, layout in ((DistributedType.DEEPSPEED, 3, "deepspeed-zero3"), (DistributedType.FSDP, 0, "fsdp")):
        acc = SimpleNamespace(
            distributed_type=kind, state=SimpleNamespace(deepspeed_plugin=SimpleNamespace(zero_stage=stage))
        )
        with pytest.raises(UserError, match=f"--async_save: under {layout} the engine writes its own shards"):
            checkpoint_writer(acc, cfg, None, None)
    ddp = SimpleNamespace(distributed_type=DistributedType.MULTI_CPU, state=None)
    assert type(checkpoint_writer(ddp, cfg, None, None)) is AsyncCheckpointWriter
    assert type(checkpoint_writer(ddp, SimpleNamespace(async_save=False), None, None)) is CheckpointWriter
