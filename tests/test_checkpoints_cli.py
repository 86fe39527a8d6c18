"""scripts/checkpoints.py: list, verify, inspect, prune and export a run's checkpoints, with one-line errors."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import os
import pickle
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import PYTHON, REPO, TINY_LM, Run, ok
from safetensors.torch import load_file

SCRIPT = str(REPO / "scripts" / "checkpoints.py")
STEPS = ["step-00000004", "step-00000005", "step-00000008"]  # periodic, new best at the step-5 eval, last


def _load_script():
    spec = importlib.util.spec_from_file_location("checkpoints_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


CHECKPOINTS = _load_script()


def cli(*args: str | Path) -> subprocess.CompletedProcess:
    """Run the script's main in this process (a new python would spend 2 s importing torch per call)."""
    argv, out, err = [str(a) for a in args], io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = CHECKPOINTS.main(argv)
        except SystemExit as exit_:  # --help, user errors
            code = exit_.code or 0
    return subprocess.CompletedProcess(argv, code, out.getvalue(), err.getvalue())


def row(stdout: str, name: str) -> str:
    return next(line for line in stdout.splitlines() if line.startswith(name))


def flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.fixture(scope="module")
def trained(tmp_path_factory, cache_dir) -> Path:
    """One tiny complete run: checkpoints at steps 4, 5 (evaluated, best so far) and 8 (evaluated, best)."""
    out = tmp_path_factory.mktemp("cli_run") / "run"
    ok(Run([*TINY_LM, "--max_steps", "8", "--checkpointing_steps", "4"], out, cache_dir).run())
    assert sorted(p.name for p in (out / "checkpoints").glob("step-*")) == STEPS
    return out


@pytest.fixture
def run(trained, tmp_path) -> Path:
    """A private copy of the run to damage or prune."""
    shutil.copytree(trained, tmp_path / "run")
    return tmp_path / "run"


@pytest.mark.slow
def test_list_shows_every_checkpoint_with_its_metric_size_validity_and_pools(run):
    result = ok(cli("list", run))
    for name in STEPS:
        assert "yes" in row(result.stdout, name)
    assert row(result.stdout, "step-00000008").endswith("best, newest, rolling")
    assert "6.1" in row(result.stdout, "step-00000005")  # eval/loss measured at that very step
    assert "run: complete" in result.stdout
    # the checkpoints/ folder works too; a rolling pool of 1 leaves the others prunable
    result = ok(cli("list", run / "checkpoints", "--keep_last", "1"))
    assert row(result.stdout, "step-00000004").endswith("(prunable)")
    (run / "COMPLETE").unlink()
    assert "run: not complete" in ok(cli("list", run)).stdout


@pytest.mark.slow
def test_verify_passes_then_names_the_corrupted_file(run):
    result = ok(cli("verify", run))
    assert "3 checkpoint(s), 0 invalid" in result.stdout and "MB/s" in result.stdout
    flip_byte(run / "checkpoints" / "step-00000008" / "optimizer.bin")
    result = cli("verify", run)
    assert result.returncode == 1, result.stderr
    assert "optimizer.bin sha256 mismatch" in row(result.stdout, "step-00000008")
    assert "ok" in row(result.stdout, "step-00000004")
    assert ok(cli("verify", run, "--quick")).returncode == 0  # sizes only: a flipped bit goes unseen


@pytest.mark.slow
def test_inspect_shows_tensors_optimizer_scheduler_and_progress(run):
    result = ok(cli("inspect", run / "checkpoints" / "step-00000008"))
    out = result.stdout
    assert "valid" in out.splitlines()[0]
    assert "transformer.wte.weight" in out and "(512, 32)" in out and "F32" in out
    assert "group 0:" in out and "initial_lr=0.003" in out and "state: 16 entries, step 8" in out
    assert "last_epoch 8" in out and "last lr [0, 0]" in out
    assert "samples_seen=32" in out and "best_step=8" in out
    assert "random_states_0.pkl" in out.splitlines()[-1]  # listed, never opened


class Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.slow
def test_inspect_refuses_a_planted_pickle_without_running_it(run, tmp_path):
    folder = run / "checkpoints" / "step-00000008"
    marker = tmp_path / "pwned"
    torch.save({"state": Payload(marker)}, folder / "optimizer.bin")
    (folder / "scheduler.bin").write_bytes(pickle.dumps(Payload(marker)))
    result = cli("inspect", folder)
    assert result.returncode == 1 and not marker.exists()
    assert result.stdout.count("refused") == 2 and "weights_only" not in result.stdout


@pytest.mark.slow
def test_prune_is_a_dry_run_until_yes_and_keeps_the_newest_and_the_best(run):
    checkpoints = run / "checkpoints"
    # --greater_is_better makes the higher loss at step 5 "best": newest and best are then different checkpoints
    args = ("prune", run, "--keep", "1", "--greater_is_better")
    result = ok(cli(*args))
    assert "dry run: 1 checkpoint(s)" in result.stdout and "would delete  step-00000004" in result.stdout
    assert sorted(p.name for p in checkpoints.iterdir()) == STEPS
    result = ok(cli(*args, "--yes"))
    assert "deleted 1 checkpoint(s)" in result.stdout
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step-00000005", "step-00000008"]
    assert "best" in row(result.stdout, "keep    step-00000005") and "newest" in row(
        result.stdout, "keep    step-00000008"
    )
    # an invalid checkpoint is mentioned and left alone, even though no pool wants it
    flip_byte(checkpoints / "step-00000005" / "model.safetensors")
    result = ok(cli(*args, "--yes"))
    assert "sha256 mismatch" in row(result.stdout, "leave   step-00000005")
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step-00000005", "step-00000008"]


@pytest.mark.slow
def test_export_writes_a_model_that_loads_with_the_checkpoint_weights(run, tmp_path, cache_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = run / "checkpoints" / "step-00000005"
    ok(cli("export", folder, "--to", tmp_path / "exported"))
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "exported")
    saved, state = load_file(str(folder / "model.safetensors")), model.state_dict()
    for name, tensor in saved.items():
        assert torch.equal(state[name], tensor), name
    assert torch.equal(state["lm_head.weight"], saved["transformer.wte.weight"])  # tied, dropped by accelerate's save
    assert len(AutoTokenizer.from_pretrained(tmp_path / "exported")) == 512
    result = cli("export", folder, "--to", tmp_path / "exported")
    assert result.returncode == 2 and "--force" in result.stderr
    # without final/: the config comes from the manifest's settings, the tokenizer from the training's cache
    final_config = json.loads((run / "final" / "config.json").read_text())
    shutil.rmtree(run / "final")
    result = cli("export", folder, "--to", tmp_path / "rebuilt", "--cache_dir", tmp_path / "empty_cache")
    assert result.returncode == 2 and "--tokenizer DIR" in result.stderr and "Traceback" not in result.stderr
    ok(cli("export", folder, "--to", tmp_path / "rebuilt", "--cache_dir", cache_dir))
    assert json.loads((tmp_path / "rebuilt" / "config.json").read_text()) == final_config
    rebuilt = load_file(str(tmp_path / "rebuilt" / "model.safetensors"))
    assert all(torch.equal(rebuilt[name], saved[name]) for name in saved)


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["list", "/no/such/run"], "/no/such/run: no such run directory"),
        (["inspect", "s3://bucket/run/checkpoints/step-00000001"], "for a remote run, pass the run URL"),
        (["inspect", "/no/such/step-00000001"], "no such checkpoint folder"),
        (["prune", str(REPO), "--keep", "1"], "not a run directory"),
        (["prune", "/tmp", "--keep", "0"], "--keep: must be >= 1"),
        (["export", "/tmp"], "required: --to"),
        (["inspect", str(REPO)], "not a checkpoint folder"),
    ],
)
def test_bad_input_is_one_line_on_stderr_with_exit_2(args, expected):
    result = cli(*args)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and expected in result.stderr and "Traceback" not in result.stderr


def test_a_user_error_in_a_new_process_is_one_line_without_traceback(tmp_path):
    result = subprocess.run([PYTHON, SCRIPT, "verify", str(tmp_path / "nope")], capture_output=True, text=True)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr == f"error: {tmp_path / 'nope'}: no such run directory\n"


@pytest.mark.parametrize("command", ["list", "verify", "inspect", "prune", "export"])
def test_help_works_for_every_subcommand(command):
    result = ok(cli(command, "--help"))
    assert result.stdout.startswith(f"usage: checkpoints.py {command}")


@pytest.mark.slow
def test_list_and_prune_follow_the_retention_the_run_recorded(tmp_path, cache_dir):
    out = tmp_path / "run"
    args = ["--checkpointing_steps", "0", "--keep_epoch_every", "1", "--keep_best", "0"]  # epoch ends: 9, 18, 27
    ok(Run([*TINY_LM, *args], out, cache_dir).run())
    assert "epoch" in row(ok(cli("list", out)).stdout, "step-00000009")
    result = ok(cli("prune", out, "--keep", "1", "--yes"))
    assert "deleted 0 checkpoint(s)" in result.stdout
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [f"step-{s:08d}" for s in (9, 18, 27)]
    ok(cli("prune", out, "--keep", "1", "--keep_epoch_every", "0", "--yes"))  # a flag given overrides the record
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000027"]


# --- exit codes: 1 = a checkpoint is corrupted or unloadable (README), on the committed format-1 checkpoint


@pytest.fixture
def damaged(tmp_path) -> Path:
    """The committed fixture's run, its only checkpoint with one flipped bit in optimizer.bin (sizes still match)."""
    from checkpoint_fixture import STEP, copy_fixture_run

    out = copy_fixture_run(tmp_path / "run")
    flip_byte(out / "checkpoints" / STEP / "optimizer.bin")
    return out


@pytest.mark.parametrize("command", ["list --deep", "verify", "inspect", "export"])
def test_a_corrupted_checkpoint_exits_1_from_every_command_that_reads_it(damaged, tmp_path, command):
    folder = damaged / "checkpoints" / "step-00000003"
    args = {"inspect": [folder], "export": [folder, "--to", tmp_path / "x"]}.get(command, [damaged])
    result = cli(*command.split(), *args)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "optimizer.bin sha256 mismatch" in result.stdout + result.stderr and "Traceback" not in result.stderr
    if command == "export":
        assert result.stderr == f"error: {folder}: not a valid checkpoint (optimizer.bin sha256 mismatch (corrupted))\n"
        assert not (tmp_path / "x").exists()


def test_list_exits_1_when_its_size_check_finds_a_damaged_checkpoint(damaged):
    assert ok(cli("list", damaged)).returncode == 0  # a flipped bit keeps the size: only --deep sees it
    path = damaged / "checkpoints" / "step-00000003" / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-10])
    result = cli("list", damaged)
    assert result.returncode == 1 and "model.safetensors has" in row(result.stdout, "step-00000003")


def test_prune_leaves_a_corrupted_checkpoint_alone_and_exits_0(damaged):
    result = ok(cli("prune", damaged, "--keep", "1"))
    assert "sha256 mismatch" in row(result.stdout, "leave   step-00000003")


def test_inspect_into_a_closed_pipe_ends_quietly(tmp_path):
    """`inspect ... | head -1`: the reader goes away; no BrokenPipeError traceback, the exit status of SIGPIPE."""
    from checkpoint_fixture import FIXTURE, STEP

    cmd = [PYTHON, SCRIPT, "inspect", str(FIXTURE / "run" / "checkpoints" / STEP)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # before it writes anything: its first print meets a closed pipe
    stderr = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == 141 and stderr == ""


def test_the_run_status_reader_prints_usage_for_help_and_exits_0():
    result = subprocess.run([PYTHON, "-m", "resumable.preemption", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.startswith("usage: python -m resumable.preemption")
    assert "OUTPUT_DIR" in result.stdout and "75" in result.stdout and result.stderr == ""
    result = subprocess.run([PYTHON, "-m", "resumable.preemption"], capture_output=True, text=True)
    assert result.returncode == 2 and "OUTPUT_DIR" in result.stderr
