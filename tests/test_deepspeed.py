"""DeepSpeed ZeRO-2/3 on 2 CPU processes through the real launcher: the same promise as DDP, shards in the store."""

from __future__ import annotations

import json
import logging
import shutil
import signal
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import PYTHON, REPO, TINY_LM, Run, assert_bitwise_same_run, checkpoint_steps, ok, train_records
from safetensors.torch import load_file
from test_checkpoint_store import delete, flip_bit, truncate
from test_remote import s3, url  # noqa: F401 (the moto S3 fixtures)
from test_resume_exact import reference

from resumable.checkpoint import MANIFEST, find_latest_checkpoint, verify_checkpoint
from resumable.remote import staging_dir

pytestmark = pytest.mark.slow
pytest.importorskip("deepspeed")

# 36 blocks on 2 ranks x 4 = 5 micro-batches per rank per epoch: with accumulation 2 each epoch ends on a window of
# one micro-batch. 3 steps per epoch, 9 in all; retention pools on, so pruning runs under DeepSpeed too.
DS_LM = [*TINY_LM, "--gradient_accumulation_steps", "2", "--save_total_limit", "2", "--keep_best", "1"]
CHECKPOINTS_CLI = str(REPO / "scripts" / "checkpoints.py")


def zero(stage: int) -> str:
    return f"deepspeed_zero{stage}"


def shard_files(stage: int) -> set[str]:
    """What each rank of 2 must have written into a checkpoint for it to be a ZeRO one."""
    optim = {f"pytorch_model/zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in (0, 1)}
    if stage == 3:
        return optim | {f"pytorch_model/zero_pp_rank_{r}_mp_rank_00_model_states.pt" for r in (0, 1)}
    return optim | {"pytorch_model/mp_rank_00_model_states.pt"}


@pytest.mark.parametrize("stage", [2, 3])
def test_a_zero_launch_really_runs_deepspeed_and_trains_like_ddp(stage, tmp_path_factory, cache_dir):
    ref = reference(tmp_path_factory, cache_dir, DS_LM, launcher=zero(stage))
    for step in checkpoint_steps(ref):
        manifest = json.loads((ref / "checkpoints" / f"step-{step:08d}" / MANIFEST).read_text())
        assert manifest["layout"] == f"deepspeed-zero{stage}" and manifest["world_size"] == 2
        assert shard_files(stage) <= set(manifest["files"]), "each rank's ZeRO shard is in the manifest"
        assert {"scheduler.bin", "random_states_0.pkl", "random_states_1.pkl"} <= set(manifest["files"])
    # The loop scales each window by its real size and DeepSpeed clips to --max_grad_norm: ZeRO-2 makes the same
    # updates as DDP (float sums in another order, hence the tolerance; a short last window divided by 2 would be
    # far off). ZeRO-3 shares that code, but builds the model under deepspeed.zero.Init (accelerate turns it on for
    # every ZeRO-3 launch), so its initial weights, and losses, are its own: only the schedule is compared.
    ours = train_records(ref)
    theirs = train_records(reference(tmp_path_factory, cache_dir, DS_LM, launcher="cpu_ddp"))
    assert [r["step"] for r in ours] == list(range(1, 10)) == [r["step"] for r in theirs]
    assert [r["lr"] for r in ours] == [r["lr"] for r in theirs]
    if stage == 2:
        for a, b in zip(ours, theirs):
            assert a["train/loss"] == pytest.approx(b["train/loss"], rel=1e-5)
    # counted before ZeRO-3 empties them; weight decay chosen by the real shapes, not ZeRO-3's (0,) placeholders
    assert "Model: 30,176 parameters (weight decay on 6 of 16 tensors)" in (ref / "train.log").read_text()


def _stop_first_run(stage: int, out: Path, cache_dir: Path) -> None:
    """ZeRO-2: the step budget stops it; ZeRO-3: a SIGTERM to every process. Either way exit 75, checkpointed."""
    if stage == 2:  # torchrun reports the workers' 75 as 1: run_status.json says what they returned
        assert Run([*DS_LM, "--max_steps_per_run", "2"], out, cache_dir, zero(stage)).run().returncode != 0
    else:
        run = Run(DS_LM, out, cache_dir, zero(stage))
        run.start()
        run.wait_for_step(2)
        run.signal_all(signal.SIGTERM)
        assert run.proc.wait(timeout=120) != 0
    status = json.loads((out / "run_status.json").read_text())
    assert status["exit_code"] == 75 and status["status"] == "requeue", status
    assert checkpoint_steps(out)


@pytest.mark.parametrize("stage", [2, 3])
def test_sigkill_under_zero_resumes_bitwise_even_past_a_corrupted_shard(stage, tmp_path, tmp_path_factory, cache_dir):
    ref = reference(tmp_path_factory, cache_dir, DS_LM, launcher=zero(stage))
    out = tmp_path / "run"
    _stop_first_run(stage, out, cache_dir)
    Run(DS_LM, out, cache_dir, zero(stage)).kill_at_step(7)
    survivors = checkpoint_steps(out)
    assert len(survivors) == 2 or survivors == [4, 5, 6][: len(survivors)], survivors  # pools pruned the rest
    # rank 1's optimizer shard of the newest checkpoint is damaged: the resume falls back to the one before
    newest = out / "checkpoints" / f"step-{survivors[-1]:08d}"
    flip_bit(newest / "pytorch_model" / "zero_pp_rank_1_mp_rank_00_optim_states.pt")
    result = ok(Run(DS_LM, out, cache_dir, zero(stage)).run())
    log = result.stdout + result.stderr
    assert f"WARNING skipping checkpoint {newest}: pytorch_model/zero_pp_rank_1_mp_rank_00_optim_states.pt" in log
    assert "Traceback" not in log
    assert_bitwise_same_run(ref, out)


def test_zero3_final_and_export_are_one_consolidated_model_equal_to_the_trained_weights(
    tmp_path, tmp_path_factory, cache_dir
):
    from transformers import AutoModelForCausalLM

    ref = reference(tmp_path_factory, cache_dir, DS_LM, launcher=zero(3))
    final = load_file(str(ref / "final" / "model.safetensors"))
    assert sorted(p.name for p in (ref / "final").glob("*.safetensors")) == ["model.safetensors"]  # not shards
    last = ref / "checkpoints" / "step-00000009"
    ok(subprocess.run([PYTHON, CHECKPOINTS_CLI, "export", str(last), "--to", str(tmp_path / "x")], capture_output=True,
                      text=True))  # fmt: skip
    exported = load_file(str(tmp_path / "x" / "model.safetensors"))
    assert final.keys() == exported.keys()
    for name in final:  # the fp32 master weights from the optimizer shards == the gathered parameters
        assert final[name].numel() > 0 and torch.equal(final[name], exported[name]), name
    for folder in (ref / "final", tmp_path / "x"):
        model = AutoModelForCausalLM.from_pretrained(folder)
        for name, tensor in model.state_dict().items():
            if name in final:
                assert torch.equal(tensor, final[name]), name


def test_the_checkpoint_cli_lists_verifies_inspects_and_prunes_zero_checkpoints(tmp_path, tmp_path_factory, cache_dir):
    ref = reference(tmp_path_factory, cache_dir, DS_LM, launcher=zero(2))
    run = tmp_path / "run"
    shutil.copytree(ref, run)

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([PYTHON, CHECKPOINTS_CLI, *args], capture_output=True, text=True)

    listed = ok(cli("list", str(run)))
    assert "step-00000009" in listed.stdout
    ok(cli("verify", str(run)))
    inspected = ok(cli("inspect", str(run / "checkpoints" / "step-00000009")))
    assert "valid" in inspected.stdout and "deepspeed-zero2" in inspected.stdout
    for name in shard_files(2):
        assert name in inspected.stdout
    truncate(run / "checkpoints" / "step-00000009" / "pytorch_model" / "mp_rank_00_model_states.pt")
    failed = cli("verify", str(run))
    assert failed.returncode == 1 and "pytorch_model/mp_rank_00_model_states.pt" in failed.stdout + failed.stderr
    pruned = ok(cli("prune", str(run), "--keep", "1", "--keep_best", "1", "--yes"))
    assert "invalid, never pruned" in pruned.stdout and (run / "checkpoints" / "step-00000009").is_dir()


SHARDS = ["pytorch_model/mp_rank_00_model_states.pt", "pytorch_model/zero_pp_rank_0_mp_rank_00_optim_states.pt",
          "pytorch_model/zero_pp_rank_1_mp_rank_00_optim_states.pt", "scheduler.bin", "latest"]  # fmt: skip


@pytest.mark.parametrize("damage", [truncate, flip_bit, delete], ids=lambda f: f.__name__)
@pytest.mark.parametrize("name", SHARDS)
def test_a_damaged_zero_shard_is_skipped_with_a_warning_naming_it(
    name, damage, tmp_path, tmp_path_factory, cache_dir, caplog
):
    ref = reference(tmp_path_factory, cache_dir, DS_LM, launcher=zero(2))
    store = tmp_path / "checkpoints"
    shutil.copytree(ref / "checkpoints", store)
    newest, older = (store / f"step-{s:08d}" for s in reversed(checkpoint_steps(ref)[-2:]))
    damage(newest / name)
    assert name in verify_checkpoint(newest)
    with caplog.at_level(logging.WARNING, logger="resumable"):
        assert find_latest_checkpoint(store) == older
    assert any(name in r.getMessage() and newest.name in r.getMessage() for r in caplog.records)


def test_a_zero_checkpoint_on_another_process_count_or_backend_is_refused_in_one_line(
    tmp_path, tmp_path_factory, cache_dir
):
    ref = reference(tmp_path_factory, cache_dir, DS_LM, launcher=zero(2))
    out = tmp_path / "run"
    shutil.copytree(ref, out)
    (out / "COMPLETE").unlink()  # an unfinished run (asking for more steps would extend it: same check)
    before = sorted(p.name for p in (out / "checkpoints").iterdir())
    # (under DeepSpeed even one process runs under torchrun, which reports the worker's exit 2 as 1)
    one = Run(DS_LM, out, cache_dir, zero(2), launch_args=("--num_processes", "1")).run_expecting(1)
    assert "holds deepspeed-zero2 shards of 2 processes and this launch has 1: resume it with --num_processes 2" in (
        one.stderr
    )
    ddp = Run(DS_LM, out, cache_dir, "cpu_ddp").run_expecting(1)  # torchrun reports the workers' exit 2 as 1
    assert "was saved under deepspeed-zero2 and this launch is ddp" in ddp.stderr
    for result in (one, ddp):
        ours = result.stderr.split("elastic/multiprocessing/api.py")[0]  # torchrun's own report follows
        assert "Traceback" not in ours and "exitcode: 2" in result.stderr
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == before


def test_a_zero_run_on_an_s3_output_dir_resumes_bitwise_from_the_bucket(tmp_path, tmp_path_factory, cache_dir, s3, url):  # noqa: F811
    ref = reference(tmp_path_factory, cache_dir, DS_LM, launcher=zero(2))
    assert Run([*DS_LM, "--max_steps_per_run", "5"], url, cache_dir, zero(2)).run().returncode != 0
    assert s3.exists(f"{url}/checkpoints/step-00000005/manifest.json")
    shutil.rmtree(staging_dir(url, cache_dir))  # a new machine: only the bucket has the run
    result = ok(Run(DS_LM, url, cache_dir, zero(2)).run())
    assert "Resuming from" in result.stdout + result.stderr
    s3.get(f"{url}/train_log.jsonl", str(tmp_path / "train_log.jsonl"))
    s3.get(f"{url}/final/", str(tmp_path / "final"), recursive=True)
    assert_bitwise_same_run(ref, tmp_path)
    remote = s3.find(f"{url}/checkpoints/step-00000009")
    assert any(path.endswith("pytorch_model/zero_pp_rank_1_mp_rank_00_optim_states.pt") for path in remote)


def test_non_finite_gradients_stop_a_zero_run_before_anything_is_saved(tmp_path, cache_dir):
    """The loss is finite, its gradients are not: DeepSpeed finds that inside its step (our loop sees no norm
    before it) and skips the update; the run stops as for a NaN loss instead of training on without a word."""
    out = tmp_path / "run"
    result = Run(DS_LM, out, cache_dir, zero(2), env={"RESUMABLE_FAULT": "nan_grad:5"}).run()
    status = json.loads((out / "run_status.json").read_text())
    assert result.returncode != 0 and (status["status"], status["exit_code"]) == ("diverged", 3), status
    assert "step 5: non-finite gradients (DeepSpeed skipped the update)" in status["reason"]
    assert "--nan_policy skip_step" not in (out / "train.log").read_text()  # refused under DeepSpeed: not advised
    assert max(checkpoint_steps(out)) < 5


def test_a_planted_pickle_in_a_zero_shard_is_refused_before_deepspeed_unpickles_it(
    tmp_path, tmp_path_factory, cache_dir
):
    from test_checkpoint_store import Payload

    from resumable.checkpoint import _sha256, manifest_digest

    ref = reference(tmp_path_factory, cache_dir, DS_LM, launcher=zero(2))
    out = tmp_path / "run"
    shutil.copytree(ref, out)
    (out / "COMPLETE").unlink()
    marker, name = tmp_path / "pwned", "pytorch_model/zero_pp_rank_1_mp_rank_00_optim_states.pt"
    folder = out / "checkpoints" / "step-00000009"
    torch.save({"optimizer_state_dict": Payload(marker)}, folder / name)
    manifest = json.loads((folder / MANIFEST).read_text())  # re-signed: only safe loading can stop it
    manifest["files"][name] = {"size": (folder / name).stat().st_size, "sha256": _sha256(folder / name)}
    manifest["manifest_sha256"] = manifest_digest(manifest)
    (folder / MANIFEST).write_text(json.dumps(manifest))
    result = Run([*DS_LM, "--max_steps", "12"], out, cache_dir, zero(2)).run()
    assert result.returncode != 0 and not marker.exists(), "the payload ran"
    assert f"error: {folder / name}: refused before DeepSpeed unpickles it" in result.stderr
    exported = subprocess.run([PYTHON, CHECKPOINTS_CLI, "export", str(folder), "--to", str(tmp_path / "x")],
                              capture_output=True, text=True)  # fmt: skip
    assert exported.returncode != 0 and not marker.exists() and "refused before DeepSpeed" in exported.stderr
