"""Run a W&B sweep offline: W&B's own sweep engine (grid, random, bayes; hyperband early termination) proposes the
trials, each trial runs the sweep's command, and everything is kept under --output_dir. No W&B account needed.

    python scripts/sweep.py sweeps/lr_batch_grid.yaml --output_dir outputs/sweep --count 4
    python scripts/sweep.py sweeps/ablations.yaml --output_dir outputs/ablations -- --max_steps 50   # smoke test

Kill it at any moment (mid-trial included) and run the same command again: finished trials are not rerun, the
interrupted trial resumes from its newest checkpoint, and the sweep ends as an uninterrupted one would. Several
runners on the same --output_dir (a Slurm job array: scripts/slurm/sweep.sbatch) share the trials, none twice.
Flags after `--` are appended to every trial's command. The end: results.md, results.csv, results.png.

Exit codes: 0 the sweep is done, 1 a trial failed (see trials/trial-N.log), 75 stopped by a signal (run the same
command again to continue), 2 bad input.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))  # run from a checkout without installing

from resumable.errors import UserError, exit_on_user_error
from resumable.logs import get_logger, setup_logging
from resumable.preemption import EXIT_FINISHED, EXIT_REQUEUE, RUN_STATUS_FILE

log = get_logger("resumable.sweep")
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, as scripts/train.py's flags
        raise UserError(message)


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    parser = _Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sweep", help="a W&B sweep config, e.g. sweeps/lr_batch_grid.yaml")
    parser.add_argument("--output_dir", required=True, help="the sweep's state, every trial's output dir, results")
    parser.add_argument("--count", type=int, help="trials in the sweep in all (required unless it is a grid)")
    parser.add_argument("--stale_after", type=float, default=120.0, help="seconds without a heartbeat after "
                        "which another host's trial counts as abandoned and is taken over")  # fmt: skip
    parser.add_argument("--retry_failed", action="store_true", help="run failed trials again (from their "
                        "checkpoints)")  # fmt: skip
    parser.add_argument("--poll", type=float, default=2.0, help="seconds between looks at a running trial "
                        "(heartbeat, metrics, hyperband)")  # fmt: skip
    args = parser.parse_args(argv)
    if args.count is not None and args.count < 1:
        raise UserError(f"--count must be >= 1, got {args.count}")
    return args, extra


def history(run_dir: Path, metric: str) -> list[dict]:
    """Every evaluation's {"step", metric} from the trial's train_log.jsonl (what W&B's history would hold)."""
    path, found = run_dir / "train_log.jsonl", []
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
            except ValueError:  # the line being written
                continue
            if metric in record:
                found.append({"step": record["step"], metric: record[metric]})
    return found


def run_status(run_dir: Path, attempt: str) -> str:
    """How this attempt of the trial ended by its own record ("finished", "requeue", or "" when it wrote none)."""
    try:
        record = json.loads((run_dir / RUN_STATUS_FILE).read_text())
    except (OSError, ValueError):
        return ""
    return record.get("status", "") if record.get("attempt") == attempt else ""


@exit_on_user_error
def main(argv: list[str] | None = None) -> int:
    # --- the sweep
    args, extra = parse_args(list(sys.argv[1:] if argv is None else argv))
    setup_logging("info")
    warnings.filterwarnings("ignore", message="Valid config keys have changed in V2")  # the sweeps engine's pydantic
    from resumable.sweep_results import final_metric, write_results
    from resumable.sweep_spec import agent_command, check_sweep, load_sweep
    from resumable.trials import TAG, SweepDir, kill_attempt

    if "WANDB_MODE" not in os.environ:  # a trial logging to W&B writes its run locally (`wandb sync` uploads it)
        os.environ["WANDB_MODE"] = "offline"
    sweep = load_sweep(args.sweep)
    if sweep["method"] != "grid" and args.count is None:
        raise UserError(f"--count is required for a {sweep['method']} sweep (it never runs out of proposals)")
    check_sweep(sweep, args.sweep, extra)
    metric = sweep["metric"]["name"]
    store = SweepDir(Path(args.output_dir), sweep, extra, args.stale_after)
    log.info(f"Sweep {args.sweep} ({sweep['method']}, {metric} {sweep['metric'].get('goal', 'minimize')}) in "
             f"{args.output_dir}: {args.count or 'every'} trial(s); W&B mode {os.environ['WANDB_MODE']}")  # fmt: skip

    # --- stop requests: handed to the running trial, which checkpoints and exits; the runner then stops too
    current: dict = {"proc": None, "attempt": None}
    stopping: list[str] = []

    def forward(signum: int) -> None:
        proc = current["proc"]
        if proc is None or proc.poll() is not None:
            return
        if signum == signal.SIGINT and stopping.count("SIGINT") > 1:  # a second Ctrl+C: the user means it
            kill_attempt(current["attempt"])  # the trial's newest checkpoint stays; it resumes from there
        else:  # TERM for Ctrl+C: the launch wrapper forwards TERM and USR1 (an INT would end the wrapper alone)
            os.kill(proc.pid, signal.SIGTERM if signum == signal.SIGINT else signum)

    def on_signal(signum, frame):
        stopping.append(signal.Signals(signum).name)
        forward(signum)

    for sig in STOP_SIGNALS:
        signal.signal(sig, on_signal)
    env = {k: v for k, v in os.environ.items() if k not in ("WANDB_RUN_ID", "WANDB_SWEEP_ID")}  # not an agent's
    env.update(PYTHONUNBUFFERED="1", TQDM_DISABLE="1")  # trial logs: lines, not progress bars
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # python, accelerate: ours

    # --- trials, until nothing is left for this runner
    failed, retry = 0, {t.id for t in store.trials() if t.status == "failed"} if args.retry_failed else set()
    while not stopping:
        trial = store.claim(args.count, retry)
        if trial is None:
            break
        retry.discard(trial.id)  # once per run of the runner: a failure that always happens is not retried forever
        run_dir, attempt = store.run_dir(trial), trial.owner["attempt"]
        if stopping:  # a stop while claiming: hand the trial back before it starts
            trial.status = "requeue"
            with store.locked():
                store.save(trial)
            break
        command = agent_command(sweep, trial.params) + extra + ["--output_dir", str(run_dir)]
        shown = ", ".join(f"{k}={v}" for k, v in trial.params.items())
        how = "new" if trial.attempts == 1 else f"attempt {trial.attempts}, resuming from its checkpoints"
        log.info(f"{trial.id} ({how}): {shown}; log {store.log_file(trial)}")
        t0, stop_early, lost = time.monotonic(), False, False
        with open(store.log_file(trial), "a") as out:  # every process of the attempt carries its tag
            proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                    env=dict(env, RESUMABLE_ATTEMPT=attempt, **{TAG: attempt}))  # fmt: skip
        current.update(proc=proc, attempt=attempt)
        if stopping:  # it came while the process was being started
            forward(signal.Signals[stopping[-1]])
        while proc.poll() is None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=args.poll)
            store.heartbeat(trial)
            trial.history = history(run_dir, metric)
            if not lost and not store.still_mine(trial):  # taken over (this runner looked dead): let go
                lost = True
                log.warning(f"{trial.id}: another runner took it over; stopping this runner's attempt")
                os.kill(proc.pid, signal.SIGTERM)
            if not (stop_early or stopping or lost) and store.should_stop(trial):
                stop_early = True
                log.info(f"{trial.id}: hyperband stops it at step {trial.history[-1]['step']}")
                os.kill(proc.pid, signal.SIGTERM)
        current["proc"] = None
        if lost:
            continue
        status = run_status(run_dir, attempt)
        trial.history, trial.exit_code = history(run_dir, metric), proc.returncode
        trial.seconds += time.monotonic() - t0
        if stop_early and status in ("requeue", "finished"):
            trial.status = "stopped"
        elif status == "finished" and proc.returncode == EXIT_FINISHED:
            trial.status = "finished"
        elif status == "diverged":  # a result (this configuration diverges), not a failure to retry
            trial.status = "diverged"
        elif status == "requeue" or stopping:  # a stop (even one that came before its handler): resume it later
            trial.status = "requeue"
        else:
            trial.status, failed = "failed", failed + 1
        value = final_metric(trial, metric)
        log.info(f"{trial.id}: {trial.status} (exit {proc.returncode}) after {trial.seconds:.0f} s; {metric} "
                 f"{'n/a' if value is None else f'{value:.4f}'}")  # fmt: skip
        with store.locked():
            if store.still_mine(trial):
                store.save(trial)

    # --- results
    with store.locked():
        trials = store.trials()
        written = write_results(store.root, trials, sweep)
    open_trials = [t.id for t in trials if t.status in ("running", "requeue")]
    done = sum(t.status in ("finished", "stopped", "diverged") for t in trials)
    log.info(f"{done} of {len(trials)} trial(s) done; results: {', '.join(str(p) for p in written)}")
    if stopping and open_trials:
        log.warning(f"Stopped ({stopping[0]}); run the same command to continue ({', '.join(open_trials)} open)")
        return EXIT_REQUEUE
    if open_trials:
        log.info(f"{', '.join(open_trials)} still run(s) under another runner")
    if failed or any(t.status == "failed" for t in trials):
        log.error("some trials failed (see their trials/trial-N.log; --retry_failed runs them again)")
        return 1
    return EXIT_FINISHED


if __name__ == "__main__":
    sys.exit(main())
