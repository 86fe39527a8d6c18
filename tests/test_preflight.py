"""Pre-flight: one report of OK/WARN/FAIL lines, exit 0 when ready, 1 on a blocker, 2 on a bad flag; its checkpoint
size estimate matches what training really writes."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from collections import namedtuple
from pathlib import Path

import pytest
import torch
from conftest import PYTHON, REPO, TINY_LM, TRAIN, ok

from resumable.config import parse_config
from resumable.disk_space import check_disk, check_writable, estimate_checkpoint_bytes, require_disk
from resumable.errors import EnvironmentFailure
from resumable.preflight import check_accelerate_config, check_gpu, check_versions
from resumable.preflight_inputs import check_data, check_model
from resumable.signal_lead import check_slurm, measured_costs, parse_signal_lead

PREFLIGHT = str(REPO / "scripts" / "preflight.py")
CONFIGS = REPO / "accelerate_configs"
LINE = re.compile(r"^(OK  |WARN|FAIL)  [a-z ]+: \S")
Usage = namedtuple("Usage", "total used free")


def preflight(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}  # never probe the network from a test
    for var in ("SLURM_JOB_ID", "ACCELERATE_CONFIG"):
        env.pop(var, None)
    return subprocess.run([PYTHON, PREFLIGHT, *args], env=env, capture_output=True, text=True, timeout=300, cwd=REPO)


def tiny(tmp_path: Path, *extra: str):
    return parse_config([*TINY_LM, "--output_dir", str(tmp_path / "out"), *extra])


# --- the command


def test_the_tiny_preset_is_ready_with_one_line_per_check_and_leaves_nothing_on_disk(tmp_path):
    out = tmp_path / "new" / "run"
    result = preflight("--config", "configs/tiny_lm.yaml", "--output_dir", str(out),
                       "--accelerate_config", str(CONFIGS / "cpu.yaml"))  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    *lines, summary = result.stdout.strip().splitlines()
    assert summary.startswith("READY"), summary
    assert all(LINE.match(line) for line in lines), lines
    assert not [line for line in lines if line.startswith("FAIL")]
    checks = {line[6:].split(":")[0] for line in lines}
    assert {"versions", "gpu", "launch", "precision", "output dir", "disk", "data", "model"} <= checks
    assert not (tmp_path / "new").exists()  # the writability probe removed the folders it made


def test_an_output_dir_that_cannot_be_created_is_a_blocker(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("a file where a folder must go")
    result = preflight("--config", "configs/tiny_lm.yaml", "--output_dir", str(blocker / "out"))
    assert result.returncode == 1, result.stdout + result.stderr
    assert f"FAIL  output dir: {blocker / 'out'}: {blocker} is not a directory" in result.stdout
    assert result.stdout.strip().splitlines()[-1].startswith("NOT READY: 1 blocker")


@pytest.mark.parametrize(
    "args, message",
    [
        (["--learning_rat", "1"], "error: command line: unknown key 'learning_rat' (did you mean 'learning_rate'?)"),
        (["--accelerate_config", "nope.yaml"], "error: --accelerate_config nope.yaml: file not found"),
        (["--slurm_signal_lead", "soon"], "error: --slurm_signal_lead 'soon': expected a number of seconds, e.g. 120"),
        (["--accelerate_config"], "error: --accelerate_config needs a value"),
        (["--accelerate_config="], "error: --accelerate_config needs a value"),
    ],
)
def test_a_bad_flag_exits_2_with_one_line_naming_it(tmp_path, args, message):
    result = preflight("--config", "configs/tiny_lm.yaml", "--output_dir", str(tmp_path / "out"), *args)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [message]
    assert result.stdout == ""


def test_help_lists_the_preflight_flags_and_the_training_flags():
    result = preflight("--help")
    assert result.returncode == 0, result.stderr
    assert "--accelerate_config" in result.stdout and "--slurm_signal_lead" in result.stdout
    assert "--output_dir" in result.stdout and "--save_total_limit" in result.stdout


# --- output dir and free space


def test_a_read_only_output_dir_is_a_blocker(tmp_path):
    mount = tmp_path / "ro"
    mount.mkdir()
    if subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(mount)], capture_output=True
    ).returncode:
        pytest.skip("cannot mount a read-only tmpfs here (needs root)")
    try:
        finding = check_writable(mount / "out")
    finally:
        subprocess.run(["umount", str(mount)], check=True)
    assert finding.level == "FAIL"
    assert finding.message.startswith(f"{mount / 'out'}: not writable (cannot create it in {mount}): Read-only file")


def test_free_space_must_hold_the_kept_checkpoints_plus_the_one_being_written(tmp_path, monkeypatch):
    cfg = tiny(tmp_path, "--save_total_limit", "2", "--keep_best", "1")
    needed = (2 + 1 + 1) * 1_000_000  # 2 rolling + 1 best + 1 being written, 1 MB each
    monkeypatch.setattr(shutil, "disk_usage", lambda path: Usage(10**12, 0, needed - 1))
    short = check_disk(cfg, checkpoint_bytes=1_000_000)
    assert [f.level for f in short] == ["OK", "FAIL"]
    assert short[1].message.startswith("4.0 MB free < 4.0 MB needed = (2 rolling + 1 best kept + 1 being written)")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: Usage(10**12, 0, needed))
    assert [f.level for f in check_disk(cfg, checkpoint_bytes=1_000_000)] == ["OK", "OK"]


def test_train_py_start_check_raises_an_environment_failure_when_the_disk_is_too_small(tmp_path, monkeypatch):
    cfg = tiny(tmp_path, "--save_total_limit", "1")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: Usage(10**12, 0, 1000))
    with pytest.raises(EnvironmentFailure, match=r"^disk: 1\.0 KB free < .* needed"):
        require_disk(cfg, num_parameters=10**6)


def test_train_py_start_check_only_warns_when_one_checkpoint_fits_but_not_every_kept_one(tmp_path, monkeypatch, caplog):
    cfg = tiny(tmp_path, "--save_total_limit", "3")
    one = estimate_checkpoint_bytes(cfg, 10**6)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: Usage(10**12, 0, 2 * one))
    with caplog.at_level("WARNING", logger="resumable"):
        require_disk(cfg, num_parameters=10**6)  # no exception: the run can make progress
    assert any("needed" in r.getMessage() and "exit 74" in r.getMessage() for r in caplog.records), caplog.text


def test_without_a_rolling_limit_the_kept_count_comes_from_max_steps_else_it_warns_unbounded(tmp_path):
    unbounded = check_disk(tiny(tmp_path), checkpoint_bytes=1000)
    assert unbounded[1].level == "WARN" and "unbounded" in unbounded[1].message
    # saves at 10, 20, ..., 100 and at the evaluations 25 and 75 (a new best is saved): 12 checkpoints
    planned = tiny(tmp_path, "--max_steps", "100", "--checkpointing_steps", "10", "--eval_steps", "25")
    finding = check_disk(planned, checkpoint_bytes=1000)[1]
    assert (
        finding.level == "OK"
        and "(no --save_total_limit: all 12 checkpoints of 100 steps kept + 1 being written)" in finding.message
    )


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, cache_dir) -> tuple[Path, list[str]]:
    """A tiny run of 4 steps that checkpoints at steps 2 and 4 (its train_log records step times)."""
    out = tmp_path_factory.mktemp("trained") / "run"
    args = [
        *TINY_LM,
        "--max_steps",
        "4",
        "--checkpointing_steps",
        "2",
        "--eval_steps",
        "4",
        "--cache_dir",
        str(cache_dir),
    ]
    ok(subprocess.run([PYTHON, TRAIN, *args, "--output_dir", str(out)], capture_output=True, text=True, timeout=300))
    return out, args


def test_the_checkpoint_size_estimate_is_within_25_percent_of_a_real_checkpoint(trained_run):
    out, args = trained_run
    real = sum(f.stat().st_size for f in (out / "checkpoints" / "step-00000004").rglob("*") if f.is_file())
    estimate = estimate_checkpoint_bytes(parse_config([*args, "--output_dir", str(out)]))
    assert 0.75 * real <= estimate <= 1.25 * real, (estimate, real)


# --- launch config and hardware


def test_fp16_without_cuda_is_a_blocker(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    launch, precision = check_accelerate_config(tiny(tmp_path), CONFIGS / "t4.yaml", "--accelerate_config")
    assert launch.level == "OK" and "not distributed: 1 process" in launch.message
    assert precision.level == "FAIL"
    assert (
        precision.message == "fp16 (launch config) needs a CUDA GPU, no CUDA GPU here: set mixed_precision bf16 or no"
    )


def test_bf16_is_a_blocker_on_a_gpu_without_it_and_fine_on_cpu(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla T4")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    precision = check_accelerate_config(tiny(tmp_path), CONFIGS / "single_gpu.yaml")[1]
    assert precision.level == "FAIL" and "not supported by Tesla T4" in precision.message
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    precision = check_accelerate_config(tiny(tmp_path, "--mixed_precision", "bf16"), None, "no config")[1]
    assert precision.level == "OK" and precision.message == "bf16 on CPU (--mixed_precision)"


def test_a_multi_process_config_is_really_distributed_on_cpu_and_needs_its_gpus_on_cuda(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    launch = check_accelerate_config(tiny(tmp_path), CONFIGS / "cpu_ddp.yaml")[0]
    assert launch.level == "OK" and "really distributed: 2 CPU processes" in launch.message
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    launch = check_accelerate_config(tiny(tmp_path), CONFIGS / "multi_gpu.yaml")[0]
    assert launch.level == "FAIL" and "4 processes per machine but 1 GPU(s) here" in launch.message


def test_deepspeed_runs_on_cpu_over_gloo_but_not_with_use_cpu_and_fsdp_needs_a_gpu(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv("ACCELERATE_USE_CPU", raising=False)
    launch = check_accelerate_config(tiny(tmp_path), CONFIGS / "deepspeed_zero3.yaml")[0]
    assert launch.level == "OK" and "DeepSpeed ZeRO-3, 2 CPU processes over gloo" in launch.message
    monkeypatch.setenv("ACCELERATE_USE_CPU", "1")
    launch = check_accelerate_config(tiny(tmp_path), CONFIGS / "deepspeed_zero2.yaml")[0]
    assert launch.level == "FAIL" and "accelerate runs plain DDP" in launch.message
    launch = check_accelerate_config(tiny(tmp_path), CONFIGS / "fsdp.yaml")[0]
    assert launch.level == "FAIL" and "FSDP on CPU does not start" in launch.message


def test_an_unloadable_launch_config_is_a_blocker(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("distributed_type: NO\nnum_processes: 1\nnot_an_accelerate_key: 3\n")
    launch = check_accelerate_config(tiny(tmp_path), bad)[0]
    assert launch.level == "FAIL" and "accelerate cannot load it" in launch.message


def test_the_gpu_line_names_each_gpu_and_its_memory(monkeypatch):
    props = namedtuple("Props", "name total_memory")("NVIDIA H100 80GB HBM3", 80 * 2**30)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: props)
    assert str(check_gpu()) == "OK    gpu: cuda:0 NVIDIA H100 80GB HBM3 80.0 GiB, cuda:1 NVIDIA H100 80GB HBM3 80.0 GiB"


def test_versions_that_differ_from_constraints_are_a_warning(tmp_path):
    pins = tmp_path / "constraints.txt"
    pins.write_text("torch==0.0.1\naccelerate==" + __import__("accelerate").__version__ + "\n")
    first, *rest = check_versions(pins)
    assert first.level == "OK" and first.message.startswith("python ")
    assert [(f.level, f.message.split(" differs")[0].split()[0]) for f in rest] == [("WARN", "torch")]


# --- data, model, tokenizer


def test_a_data_file_without_text_or_without_its_column_is_a_blocker(tmp_path):
    blank = tmp_path / "blank.txt"
    blank.write_text("\n  \n")
    wrong = tmp_path / "wrong.jsonl"
    wrong.write_text(json.dumps({"body": "x = 1"}) + "\n")
    assert check_data(tiny(tmp_path, "--train_file", str(blank)))[0].message == f"--train_file {blank}: no text in it"
    finding = check_data(tiny(tmp_path, "--train_file", str(wrong)))[0]
    assert finding.level == "FAIL" and finding.message == f"--train_file {wrong}: no column 'text' (columns: body)"


def test_a_dataset_or_model_missing_from_the_offline_cache_is_a_blocker(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = tiny(tmp_path, "--cache_dir", str(tmp_path / "cache"))
    cfg.dataset_name = "nobody-here/no-such-dataset"  # set after parsing: any parse-time check stays out of this
    assert check_data(cfg)[0].message.endswith("not in the local cache and HF_HUB_OFFLINE is set")
    cfg.model_name_or_path = "nobody-here/no-such-model"
    model, tokenizer = check_model(cfg)
    assert (model.level, tokenizer.level) == ("FAIL", "FAIL")
    assert (
        model.message
        == "--model_name_or_path nobody-here/no-such-model: not in the local cache and HF_HUB_OFFLINE is set"
    )


def test_a_model_in_a_local_folder_loads_offline(tmp_path, monkeypatch):
    from tokenizers import Tokenizer, models
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    folder = tmp_path / "model"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=4)).save_pretrained(folder)
    vocab = {"<unk>": 0, "a": 1, "b": 2, "c": 3}
    PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))).save_pretrained(
        folder
    )
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = tiny(tmp_path)
    cfg.model_name_or_path = str(folder)
    assert [(f.level, f.message) for f in check_model(cfg)] == [
        ("OK", f"--model_name_or_path {folder}: loads from the local folder"),
        ("OK", f"tokenizer of {folder}: loads from the local folder"),
    ]


# --- Slurm


def test_the_signal_lead_is_read_as_sbatch_and_scontrol_write_it():
    assert parse_signal_lead("#SBATCH --time=1:00:00\n#SBATCH --signal=B:USR1@120\n") == 120
    assert parse_signal_lead("scancel --signal=USR1 --batch\n#SBATCH --signal=B:USR1@200") == 200
    assert parse_signal_lead("   Signal=USR1@90 Requeue=1") == 90
    assert parse_signal_lead("sbatch --signal=USR1 job.sh") == 60  # sbatch's default lead
    assert parse_signal_lead("JobId=1 JobName=x") is None


def test_a_lead_shorter_than_one_save_is_a_blocker_and_below_the_rule_a_warning(tmp_path, monkeypatch):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    cfg = tiny(tmp_path)  # no earlier run in its output dir: the save cost is the README's 4 s/GB estimate
    assert check_slurm(cfg, None, 10**10) == []  # not under Slurm and no lead given: nothing to check
    levels = {lead: check_slurm(cfg, lead, 10**10)[0] for lead in (30, 60, 80)}  # 10 GB: 40 s to save
    assert [f.level for f in levels.values()] == ["FAIL", "WARN", "OK"]
    assert levels[30].message == (
        "signal lead 30 s (--slurm_signal_lead) vs 2 x (step time not measured yet (0 s) + 40.0 s per save "
        "(10.0 GB at 4 s/GB)) = 80 s: raise --signal to @81"
    )


def test_the_slurm_check_uses_step_and_save_times_measured_in_the_output_dir(trained_run):
    out, args = trained_run
    step_s, save_s = measured_costs(out)
    assert 0 < step_s < 30 and 0 < save_s < 30
    finding = check_slurm(parse_config([*args, "--output_dir", str(out)]), 120, 10**12)[0]
    assert finding.level == "OK" and "per step (measured)" in finding.message
    assert f"per save (measured in {out})" in finding.message


def test_planned_saves_are_counted_not_listed_so_a_huge_max_steps_costs_nothing(tmp_path):
    from resumable.disk_space import planned_saves

    for n, every, evals in [(100, 10, 25), (7, 3, 2), (12, 4, 6), (5, 0, 0), (9, 9, 0)]:
        cfg = tiny(tmp_path, "--max_steps", str(n), "--checkpointing_steps", str(every), "--eval_steps", str(evals))
        listed = {s for e in (every, evals) if e for s in range(e, n + 1, e)} | {n}
        assert planned_saves(cfg) == len(listed), (n, every, evals)
    huge = tiny(tmp_path, "--max_steps", str(10**21), "--checkpointing_steps", "500", "--eval_steps", "0")
    assert planned_saves(huge) == 2 * 10**18  # it used to build a set of that many steps and run out of memory
