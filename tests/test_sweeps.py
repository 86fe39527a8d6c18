"""sweeps/*.yaml and scripts/sweep.py: every swept parameter is a real flag with valid values; a run started by
`wandb agent` trains in its own output dir, reports a preemption and resumes bitwise; the offline runner, killed
anywhere and run again, ends with the same trials and results as an uninterrupted sweep, and runners share a DIR."""

from __future__ import annotations

import csv
import json
import os
import signal
import struct
import subprocess
import time
from pathlib import Path

import pytest
import yaml
from conftest import PYTHON, REPO, TINY_LM, Run, assert_bitwise_same_run, logged_steps, ok, train_records

from resumable.errors import UserError
from resumable.sweep_spec import agent_command, check_sweep, load_sweep

SWEEPS = sorted((REPO / "sweeps").glob("*.yaml"))
SWEEP = str(REPO / "scripts" / "sweep.py")
GRID = REPO / "sweeps" / "lr_batch_grid.yaml"


def tiny_flags(cache_dir: Path, *swept: str, steps: int = 40) -> list[str]:
    """TINY_LM without the flags a sweep sets, `steps` steps (~1 s), and the session's cache."""
    flags, i = [], 0
    while i < len(TINY_LM):
        if TINY_LM[i].lstrip("-") in swept:
            i += 2
            continue
        flags.append(TINY_LM[i])
        i += 1
    return [*flags, "--max_steps", str(steps), "--cache_dir", str(cache_dir)]


def test_the_repo_ships_the_three_sweeps_of_the_study():
    assert {p.stem for p in SWEEPS} >= {"lr_batch_grid", "lr_bayes_hyperband", "ablations"}
    bayes = load_sweep(str(REPO / "sweeps" / "lr_bayes_hyperband.yaml"))
    assert bayes["method"] == "bayes" and bayes["early_terminate"]["type"] == "hyperband"


@pytest.mark.parametrize("path", SWEEPS, ids=[p.stem for p in SWEEPS])
def test_every_parameter_of_every_sweep_is_a_flag_with_valid_values(path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")  # the commands report to W&B
    monkeypatch.chdir(REPO)  # the commands' paths are relative to the repository, as for `wandb agent`
    sweep = load_sweep(str(path))
    check_sweep(sweep, str(path), [])  # every value (grid: every combination) parses and passes the flag checks
    command = agent_command(sweep, {k: "X" for k in sweep["parameters"]})
    assert command[-len(sweep["parameters"]) :] == [f"--{k}=X" for k in sweep["parameters"]]


def test_a_sweep_with_a_bad_parameter_is_refused_in_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.chdir(REPO)
    base = yaml.safe_load(GRID.read_text())
    cases = {
        "learning_rat": "parameter 'learning_rat' is not a flag",
        "output_dir": "parameter 'output_dir' is not a flag",
        "learning_rate=-1": "the trial learning_rate=-1.0, per_device_train_batch_size=8 would not start: "
        "--learning_rate must be > 0",
    }
    for case, message in cases.items():
        sweep = json.loads(json.dumps(base))
        name, _, value = case.partition("=")
        if value:
            sweep["parameters"][name]["values"].append(float(value))
        else:
            sweep["parameters"][name] = {"values": [1]}
        path = tmp_path / "bad.yaml"
        path.write_text(yaml.safe_dump(sweep))
        with pytest.raises(UserError, match=message.replace("(", r"\(")):
            check_sweep(load_sweep(str(path)), str(path), [])
    with pytest.raises(UserError, match="would override the swept parameter 'learning_rate'"):
        check_sweep(load_sweep(str(GRID)), str(GRID), ["--learning_rate", "0.1"])
    result = subprocess.run([PYTHON, SWEEP, str(REPO / "sweeps" / "lr_bayes_hyperband.yaml"), "--output_dir",
                             str(tmp_path / "s")], capture_output=True, text=True, cwd=REPO)  # fmt: skip
    assert result.returncode == 2 and "--count is required for a bayes sweep" in result.stderr
    assert "Traceback" not in result.stderr


def agent_built(sweep: dict, params: dict, run_id: str, sweep_id: str, wandb_dir: Path) -> tuple[list[str], dict]:
    """The command line and environment wandb's own agent code (Agent._command_run) builds for one run."""
    import wandb.wandb_agent as wa

    got: dict = {}
    saved = dict(os.environ)

    class Recorder:  # stands in for the process the agent would start
        def __init__(self, **kwargs):
            got.update(kwargs)

    original, wa.AgentProcess = wa.AgentProcess, Recorder
    try:
        os.environ.update(WANDB_SWEEP_ID=sweep_id, WANDB_DIR=str(wandb_dir))
        agent = wa.Agent.__new__(wa.Agent)
        agent._sweep_command, agent._function, agent._in_jupyter = sweep["command"], None, False
        agent._forward_signals, agent._run_processes = False, {}
        agent._command_run({"run_id": run_id, "program": sweep["program"],
                            "args": {k: {"value": v} for k, v in params.items()}})  # fmt: skip
    finally:
        wa.AgentProcess = original
        os.environ.clear()
        os.environ.update(saved)
    return got["command"], got["env"]


def test_the_runner_builds_the_command_wandb_agent_builds(tmp_path):
    sweep = load_sweep(str(GRID))
    params = {"learning_rate": 0.002, "per_device_train_batch_size": 16}
    command, env = agent_built(sweep, params, "r1", "s1", tmp_path)
    assert agent_command(sweep, params) == command
    assert env["WANDB_RUN_ID"] == "r1" and env["WANDB_SWEEP_ID"] == "s1"


def wandb_records(wandb_dir: Path, run_id: str) -> list:
    """The records in the offline run files of `run_id` (W&B's leveldb-style log of protobuf records)."""
    from wandb.proto import wandb_internal_pb2 as pb

    records = []
    for path in sorted(wandb_dir.glob(f"wandb/offline-run-*-{run_id}/run-{run_id}.wandb")):
        data, pos, parts = path.read_bytes(), 7, b""  # 7: ":W&B" ident, magic, version
        while pos + 7 <= len(data):
            block_left = 32768 - pos % 32768
            if block_left < 7:  # a block's tail too short for a header is padding
                pos += block_left
                continue
            _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
            if length == 0 and kind == 0:
                break
            parts += data[pos + 7 : pos + 7 + length]
            pos += 7 + length
            if kind in (1, 4):  # FULL or LAST: one whole record
                record = pb.Record()
                record.ParseFromString(parts)
                records.append(record)
                parts = b""
    return records


def kinds(records: list) -> list[str]:
    return [r.WhichOneof("record_type") for r in records]


@pytest.mark.slow
def test_a_run_under_wandb_agent_trains_in_its_own_dir_marks_a_preemption_and_resumes_bitwise(tmp_path, cache_dir):
    import sweeps

    sweep = load_sweep(str(GRID))
    base = tmp_path / "outputs"
    command = sweep["command"]
    command[command.index("outputs/sweeps/lr_batch_grid")] = str(base)
    command[command.index("${args}") : command.index("${args}")] = tiny_flags(
        cache_dir, *sweep["parameters"], "report_to"
    )
    proposal = sweeps.next_run({k: v for k, v in sweep.items() if k not in ("command", "program")}, [])
    params = {k: v["value"] for k, v in proposal.config.items()}
    wandb_dir = tmp_path / "wandb_dir"

    def agent_run(run_id: str) -> Run:
        cmd, env = agent_built(sweep, params, run_id, "sw1", wandb_dir)
        path = f"{Path(PYTHON).parent}{os.pathsep}{env['PATH']}"  # the agent runs in the activated venv
        run = Run([], base / "sweep-sw1" / run_id, cache_dir, env={**env, "WANDB_MODE": "offline", "PATH": path})
        run.cmd = cmd
        return run

    reference = agent_run("ref")
    ok(reference.run())
    run = agent_run("abc")
    run.start()
    run.wait_for_step(9)
    run.proc.send_signal(signal.SIGUSR1)  # a scheduler's stop (Slurm's signal lead) reaching the agent's run
    run.proc.wait(timeout=120)
    out = base / "sweep-sw1" / "abc"
    status = json.loads((out / "run_status.json").read_text())
    assert status["status"] == "requeue" and 9 <= status["step"] < 40, status
    assert "preempting" in kinds(wandb_records(wandb_dir, "abc")), "the W&B run was not marked preempting"
    assert "preempting" not in kinds(wandb_records(wandb_dir, "ref"))
    ok(agent_run("abc").run())  # the agent's resume: the same command and run id
    assert_bitwise_same_run(base / "sweep-sw1" / "ref", out)
    records = wandb_records(wandb_dir, "abc")
    swept = {
        u.key: json.loads(u.value_json)
        for r in records
        if r.WhichOneof("record_type") == "run"
        for u in r.run.config.update
    }  # fmt: skip  (the agent's parameters, locked in the run's config)
    assert {k: swept[k] for k in params} == params
    lr = {r["step"]: r["lr"] for r in train_records(out)}
    assert lr[4] == params["learning_rate"]  # warmup (3 steps) done, linear decay not begun: the peak itself
    assert f"global batch {params['per_device_train_batch_size']}," in (out / "train.log").read_text()
    assert (out / "tracker_run_id").read_text() == "abc"
    assert sorted(p.name for p in (base / "sweep-sw1").iterdir()) == ["abc", "ref"]  # nothing outside run dirs


def runner(out: Path, cache_dir: Path, *flags: str, steps: int = 40) -> Run:
    run = Run([], out, cache_dir)
    run.cmd = [PYTHON, SWEEP, str(GRID), "--output_dir", str(out), *flags, "--",
               *tiny_flags(cache_dir, "learning_rate", "per_device_train_batch_size", steps=steps)]  # fmt: skip
    return run


def results(out: Path) -> list[dict]:
    rows = list(csv.DictReader((out / "results.csv").open()))
    return [{k: v for k, v in r.items() if k != "minutes"} for r in rows]


def trial(out: Path, name: str) -> dict:
    return json.loads((out / "trials" / f"{name}.json").read_text())


@pytest.mark.slow
def test_the_offline_runner_killed_mid_trial_and_rerun_ends_as_an_uninterrupted_sweep(tmp_path, cache_dir):
    ref = tmp_path / "ref"
    ok(runner(ref, cache_dir, "--count", "3").run())
    assert [r["status"] for r in results(ref)] == ["finished"] * 3
    out = tmp_path / "killed"
    killed = runner(out, cache_dir, "--count", "3", "--poll", "0.2")
    killed.start()
    killed.output_dir = out / "trials" / "trial-0002"
    killed.wait_for_step(10)  # trial 1 is done, trial 2 mid-way (its newest checkpoint: step 8 or later)
    killed.signal_all(signal.SIGKILL)  # the runner and its trial's processes, at once (a node lost)
    killed.proc.wait(timeout=30)
    time.sleep(0.5)
    assert not killed.pids()
    first = (out / "trials" / "trial-0001" / "train_log.jsonl").read_text()
    assert trial(out, "trial-0002")["status"] == "running"
    again = ok(runner(out, cache_dir, "--count", "3").run())
    assert "trial-0002 (attempt 2, resuming from its checkpoints)" in again.stderr
    assert "trial-0001 (" not in again.stderr  # a finished trial is not rerun
    assert (out / "trials" / "trial-0001" / "train_log.jsonl").read_text() == first
    assert results(out) == results(ref)  # the same trials, parameters, metrics, in the same order
    for name in ("trial-0001", "trial-0002", "trial-0003"):
        assert_bitwise_same_run(ref / "trials" / name, out / "trials" / name)
        assert trial(out, name)["params"] == trial(ref, name)["params"]
    assert trial(out, "trial-0002")["attempts"] == 2
    assert (out / "results.png").stat().st_size > 0 and "| trial |" in (out / "results.md").read_text()


@pytest.mark.slow
def test_two_runners_on_one_dir_share_the_trials_and_run_none_twice(tmp_path, cache_dir):
    out = tmp_path / "shared"
    runners = [runner(out, cache_dir, "--count", "3", "--poll", "0.2", steps=16) for _ in range(2)]
    for r in runners:
        r.start()
    for r in runners:
        r.proc.wait(timeout=600)
        assert r.proc.returncode == 0, r.proc.stdout.read()[-3000:]
    trials = [trial(out, f"trial-{i:04d}") for i in (1, 2, 3)]
    assert all(t["status"] == "finished" and t["attempts"] == 1 for t in trials)
    assert len({t["owner"]["pid"] for t in trials}) == 2  # both runners took trials
    for i in (1, 2, 3):
        log = (out / "trials" / f"trial-{i:04d}" / "train.log").read_text()
        assert log.count("(fresh start)") == 1 and "resuming" not in log
        assert logged_steps(out / "trials" / f"trial-{i:04d}") == list(range(1, 17))
    assert len(results(out)) == 3
    params = [tuple(sorted(t["params"].items())) for t in trials]
    assert len(set(params)) == 3  # three different grid points


def test_a_runner_refuses_a_dir_that_holds_another_sweep(tmp_path, cache_dir):
    out = tmp_path / "s"
    from resumable.trials import SweepDir

    SweepDir(out, load_sweep(str(GRID)), ["--max_steps", "5"], 120)
    result = subprocess.run(runner(out, cache_dir, "--count", "1").cmd, capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 2 and "holds another sweep" in result.stderr and "Traceback" not in result.stderr
