"""The Slurm job scripts (scripts/slurm/) on a real single-node Slurm: USR1 -> checkpoint -> requeue -> resume,
bit for bit; and, without Slurm, a signal that comes while the training process is still starting."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, TINY_LM, assert_bitwise_same_run, checkpoint_steps, logged_steps, ok
from test_preemption import DDP_LM
from test_resume_exact import reference

pytestmark = pytest.mark.slow

SLURM_SCRIPTS = REPO / "tests" / "slurm"
SBIN_PATH = os.environ.get("PATH", "") + ":/usr/sbin:/sbin"  # the daemons live in sbin, not on every PATH


def _install_slurm() -> str:
    """Install Slurm if missing (CI runs as root on a fresh machine); return why it is unavailable, or ''."""
    if shutil.which("slurmctld", path=SBIN_PATH):
        return ""
    if os.geteuid() != 0:
        return "needs Slurm (slurmctld) installed, or root to install it and run a throw-away cluster"
    if not shutil.which("apt-get"):
        return "slurmctld missing and no apt-get to install slurm-wlm"
    install = ["apt-get", "install", "-y", "-q", "--no-install-recommends", "slurm-wlm", "munge"]
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for attempt in ([install], [["apt-get", "update", "-q"], install]):  # update only if the plain install fails
        if all(subprocess.run(cmd, env=env, capture_output=True, timeout=600).returncode == 0 for cmd in attempt):
            break
    return "" if shutil.which("slurmctld", path=SBIN_PATH) else "apt-get could not install slurm-wlm and munge"


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    """A throw-away Slurm cluster on localhost; yields the environment its clients need (SLURM_CONF)."""
    why = _install_slurm()
    if why:
        pytest.skip(why)
    if os.geteuid() != 0:
        pytest.skip("starting a throw-away Slurm cluster (munged, slurmctld, slurmd) needs root")
    base = tmp_path_factory.mktemp("slurm")
    # LINK_ETC=0: leave /etc/slurm alone; clients and jobs find the cluster through SLURM_CONF.
    env = {**os.environ, "BASE": str(base), "LINK_ETC": "0", "PATH": SBIN_PATH, "SLURM_CONF": str(base / "slurm.conf")}
    up = subprocess.run(["bash", SLURM_SCRIPTS / "slurm-up.sh"], env=env, capture_output=True, text=True, timeout=300)
    try:
        assert up.returncode == 0, f"slurm-up.sh failed:\n{up.stdout}\n{up.stderr}"
        yield env
    finally:
        # slurm-down.sh cancels the jobs first: slurmd dying would not stop them
        subprocess.run(["bash", SLURM_SCRIPTS / "slurm-down.sh"], env=env, capture_output=True, timeout=120)


def job_env(base_env: dict, tmp_path: Path, cache_dir: Path, out: Path, args: list[str]) -> dict:
    """The job scripts' settings (scripts/slurm/common.sh) for a tiny run with the training flags `args`."""
    env = {
        **base_env,
        "REPO_DIR": str(REPO),
        "VENV": sys.prefix,  # the environment running these tests
        "TRAIN_CONFIG": "",  # flags only, exactly the reference run's
        "TRAIN_ARGS": " ".join([*args, "--cache_dir", str(cache_dir)]),
        "OUTPUT_DIR": str(out),
        "SCRATCH": str(tmp_path / "scratch"),
    }
    env.pop("ACCELERATE_USE_CPU", None)  # as in conftest.Run: the launch config alone decides
    return env


def wait_until(condition, timeout: float, what: str, check=lambda: None):
    """Poll `condition` until it returns something truthy; `check` may raise to fail early."""
    deadline = time.monotonic() + timeout
    while not (result := condition()):
        check()
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.05)
    return result


def job_state(env: dict, job: str) -> str:
    out = subprocess.run(["squeue", "-h", "-t", "all", "-j", job, "-o", "%T"], env=env, capture_output=True, text=True)
    return out.stdout.strip()


def read_status(output_dir: Path) -> dict | None:
    try:
        return json.loads((output_dir / "run_status.json").read_text())
    except (OSError, ValueError):  # not written yet, or being replaced
        return None


def diagnostics(base: Path, job_log: Path) -> str:
    parts = []
    for path in (job_log, base / "slurmctld.log", base / "slurmd.log"):
        text = path.read_text(errors="replace") if path.exists() else "(missing)"
        parts.append(f"----- {path}\n{text[-6000:]}")
    return "\n".join(parts)


@pytest.mark.parametrize(
    ("script", "launcher", "args"),
    [
        ("train.sbatch", "python", TINY_LM),
        # The multi-node script on one node with 2 DDP processes: srun's forwarding, torchrun's workers.
        ("train_multinode.sbatch", "cpu_ddp", DDP_LM),
    ],
    ids=["single-node", "multinode-script-ddp"],
)
def test_usr1_checkpoints_requeues_and_resumes_bitwise(
    slurm, tmp_path, tmp_path_factory, cache_dir, script, launcher, args
):
    out, job_log = tmp_path / "slurm_run", tmp_path / "job.out"
    env = job_env(slurm, tmp_path, cache_dir, out, args)
    sbatch = ["sbatch", "--parsable", f"--output={job_log}"]
    if launcher == "cpu_ddp":
        env.update(ACCELERATE_CONFIG="accelerate_configs/cpu_ddp.yaml", GPUS_PER_NODE="2")
        sbatch.append("--nodes=1")
    sbatch.append(f"scripts/slurm/{script}")
    job = ok(subprocess.run(sbatch, env=env, capture_output=True, text=True, cwd=REPO, timeout=60)).stdout.strip()

    def fail_if_ended():  # early, instead of waiting for a timeout
        if job_state(env, job) in ("FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL"):
            raise AssertionError(f"job {job} ended early: {job_state(env, job)}")

    try:
        wait_until(lambda: len(logged_steps(out)) >= 3, 180, "the job to log 3 steps", fail_if_ended)
        # --signal=B:USR1@lead comes at slurmctld's periodic sweep, up to ~30 s late: deliver it directly.
        ok(subprocess.run(["scancel", "--signal=USR1", "--batch", job], env=env, capture_output=True, text=True))
        stopped = wait_until(
            lambda: (s := read_status(out)) and s["status"] == "requeue" and s, 120, "the stop", fail_if_ended
        )
        checkpoints_at_stop = checkpoint_steps(out)
        # The uninterrupted run, shared with test_resume_exact.py and test_preemption.py (trained here if this
        # file runs alone, while the requeued job waits for its credential to expire: cred_expire=5).
        ref = reference(tmp_path_factory, cache_dir, args, launcher)
        wait_until(lambda: job_state(env, job) == "COMPLETED", 180, "the requeued job to finish", fail_if_ended)
        log = job_log.read_text()

        assert "SIGUSR1" in stopped["reason"] and 3 <= stopped["step"] < logged_steps(ref)[-1]
        assert stopped["step"] in checkpoints_at_stop, "a checkpoint at the step where it stopped"
        assert f"checkpoint step-{stopped['step']:08d} saved" in log
        assert re.findall(r"SLURM_RESTART_COUNT=(\d+)", log) == ["0", "1"], "one run, then one requeued run"
        verdicts = re.findall(r"^=== (SUCCESS|FAILURE|REQUEUED)", log, flags=re.M)
        assert verdicts == ["REQUEUED", "SUCCESS"], log[-3000:]
        assert f"Resuming from {out}/checkpoints/step-{stopped['step']:08d}" in log
        assert (out / "COMPLETE").exists() and read_status(out)["status"] == "finished"
        assert_bitwise_same_run(ref, out)
    except BaseException:
        print(diagnostics(Path(slurm["BASE"]), job_log))
        raise
    finally:
        subprocess.run(["scancel", job], env=env, capture_output=True)


def test_signal_before_the_training_listens_is_held_until_it_does(tmp_path, cache_dir):
    """No Slurm needed: USR1 to the job shell while accelerate is still starting must neither kill the training
    process (default action) nor be lost; it is delivered once the handler is installed, and the job stops."""
    out, job_log = tmp_path / "out", tmp_path / "job.out"
    outside_slurm = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env = job_env(outside_slurm, tmp_path, cache_dir, out, TINY_LM)
    with open(job_log, "w") as fh:
        # its own session: on failure, one killpg stops the shell, the launcher and the training process
        cmd = ["bash", "scripts/slurm/train.sbatch"]
        shell = subprocess.Popen(cmd, env=env, stdout=fh, stderr=fh, cwd=REPO, start_new_session=True)
    try:
        wait_until(lambda: "SLURM_RESTART_COUNT=0" in job_log.read_text(), 60, "the job header")  # traps are set
        os.kill(shell.pid, signal.SIGUSR1)
        assert shell.wait(timeout=180) == 75
        log = job_log.read_text()
        assert "[signal_training] SIGUSR1 -> training process" in log
        status = read_status(out)  # written: the training process lived to checkpoint, so USR1 was not fatal
        assert status["status"] == "requeue" and "SIGUSR1" in status["reason"]
        assert status["step"] in checkpoint_steps(out)
        verdicts = re.findall(r"^=== (?:SUCCESS|FAILURE|REQUEUED|STOPPED).*", log, flags=re.M)
        assert len(verdicts) == 1, verdicts
        assert verdicts[0].startswith("=== STOPPED: checkpointed (requeue at step ") and "SIGUSR1" in verdicts[0]
        assert verdicts[0].endswith("not a Slurm job: run it again to continue")
    except BaseException:
        print(job_log.read_text())
        raise
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(shell.pid, signal.SIGKILL)


def test_a_sweep_job_array_shares_the_trials_and_a_usr1_requeues_a_task_that_resumes_its_trial(
    slurm, tmp_path, cache_dir
):
    from test_sweeps import GRID, runner, tiny_flags, trial

    sweep_dir, job_log = tmp_path / "sweep", tmp_path / "job-%a.out"
    extra = tiny_flags(cache_dir, "learning_rate", "per_device_train_batch_size", steps=150)
    env = {**job_env(slurm, tmp_path, cache_dir, sweep_dir, []), "SWEEP": str(GRID), "SWEEP_DIR": str(sweep_dir),
           "SWEEP_ARGS": "--count 3 --poll 0.2", "SWEEP_EXTRA": " ".join(extra)}  # fmt: skip
    cmd = ["sbatch", "--parsable", "--array=0-1", f"--output={job_log}", "scripts/slurm/sweep.sbatch"]
    job = ok(subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=REPO, timeout=60)).stdout.strip()
    tasks = [f"{job}_0", f"{job}_1"]

    def running_trial():  # a trial past step 20 of 150, and the array task whose runner runs it
        for path in sorted((sweep_dir / "trials").glob("trial-*.json")):
            t = json.loads(path.read_text())
            steps = logged_steps(sweep_dir / "trials" / t["id"])
            if t["status"] == "running" and steps and 20 <= steps[-1] < 120:
                with contextlib.suppress(OSError):
                    environ = Path(f"/proc/{t['owner']['pid']}/environ").read_bytes().split(b"\0")
                    task = next(e.split(b"=")[1].decode() for e in environ if e.startswith(b"SLURM_ARRAY_TASK_ID="))
                    return t["id"], f"{job}_{task}"
        return None

    try:
        name, task = wait_until(running_trial, 240, "a trial mid-way")
        ok(subprocess.run(["scancel", "--signal=USR1", "--batch", task], env=env, capture_output=True, text=True))
        for t in tasks:
            wait_until(lambda t=t: job_state(env, t) == "COMPLETED", 400, f"task {t} to complete")
        logs = "".join(p.read_text() for p in tmp_path.glob("job-*.out"))
        assert "=== REQUEUED" in logs and logs.count("=== SUCCESS") >= 2, logs[-4000:]
        trials = [trial(sweep_dir, f"trial-{i:04d}") for i in (1, 2, 3)]
        assert [t["status"] for t in trials] == ["finished"] * 3
        interrupted = trial(sweep_dir, name)
        assert interrupted["attempts"] == 2 and all(t["attempts"] == 1 for t in trials if t["id"] != name)
        assert "Resuming from" in (sweep_dir / "trials" / name / "train.log").read_text()
        ref = tmp_path / "ref"  # the same sweep, uninterrupted, outside Slurm
        ok(subprocess.run(runner(ref, cache_dir, "--count", "3", steps=150).cmd, capture_output=True, text=True,
                          cwd=REPO, timeout=600))  # fmt: skip
        for i in (1, 2, 3):
            assert_bitwise_same_run(ref / "trials" / f"trial-{i:04d}", sweep_dir / "trials" / f"trial-{i:04d}")
    except BaseException:
        for path in tmp_path.glob("job-*.out"):
            print(f"----- {path}\n{path.read_text()[-4000:]}")
        print(diagnostics(Path(slurm["BASE"]), tmp_path / "none"))
        raise
    finally:
        subprocess.run(["scancel", job], env=env, capture_output=True)
