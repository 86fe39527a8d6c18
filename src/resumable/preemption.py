"""Stop requests: signals and budgets set a flag; the loop acts on it at an optimizer-step boundary.

The handler never saves (saving inside a handler can deadlock on locks the interrupted code holds, and the RNG
would be captured mid-step). All ranks must agree to stop at the same step: the flag travels in the one
all-reduce the loop already does every step for the loss, so agreement costs no extra collective.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import sys
import time
from pathlib import Path

from resumable.errors import UserError

EXIT_FINISHED = 0
EXIT_REQUEUE = 75  # EX_TEMPFAIL: a checkpoint was saved, run the same command again to continue
RUN_STATUS_FILE = "run_status.json"
ATTEMPT_ENV = "RESUMABLE_ATTEMPT"


def parse_signals(text: str) -> list[signal.Signals]:
    """'SIGTERM,USR1' -> [SIGTERM, SIGUSR1]; empty string -> []."""
    out = []
    for name in filter(None, (s.strip().upper() for s in text.split(","))):
        name = name if name.startswith("SIG") else "SIG" + name
        if not hasattr(signal.Signals, name) or name in ("SIGKILL", "SIGSTOP"):
            raise UserError(f"--stop_signals: {name} is not a signal that can be caught")
        out.append(signal.Signals[name])
    return out


def _process_start() -> float:
    """This process's start on the monotonic clock: a budget also covers the seconds spent importing."""
    import psutil

    age = time.time() - psutil.Process().create_time()
    return time.monotonic() - max(age, 0.0)


EXIT_RESERVE_S = 1.0  # fixed part of --max_run_time's reserve: negligible against real budgets (hours)


class StopRequest:
    """Why this run should stop at the next step boundary (None: keep going)."""

    def __init__(
        self,
        signals: list[signal.Signals],
        max_run_time: float | None = None,
        max_steps_per_run: int = 0,
        started: float | None = None,
    ):
        self.signals = signals
        self.max_run_time = max_run_time
        self.max_steps_per_run = max_steps_per_run
        self.started = _process_start() if started is None else started
        self.reason: str | None = None
        self.signal_time: float | None = None
        self.slowest_save = 0.0  # seconds; the budget leaves room for one more save of this length
        self.slowest_step = 0.0
        self.slowest_eval = 0.0

    def install(self) -> StopRequest:
        for sig in self.signals:
            signal.signal(sig, self._on_signal)
        return self

    def _on_signal(self, signum: int, frame) -> None:
        name = signal.Signals(signum).name
        if self.reason is not None and signum == signal.SIGINT:
            # Second Ctrl+C: the user means it. The commit protocol keeps the last checkpoint safe.
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            raise KeyboardInterrupt
        if self.reason is None:
            self.reason = f"received {name}"
            self.signal_time = time.monotonic()
            # print, not logging: a handler may interrupt code that holds the logging module's locks
            now = time.strftime("%Y-%m-%d %H:%M:%S")
            print(
                f"{now} WARNING {name} received: will checkpoint and stop at the end of this step",
                file=sys.stderr,
                flush=True,
            )

    def note_step(self, seconds: float) -> None:
        self.slowest_step = max(self.slowest_step, seconds)

    def note_save(self, seconds: float) -> None:
        self.slowest_save = max(self.slowest_save, seconds)

    def note_eval(self, seconds: float) -> None:
        self.slowest_eval = max(self.slowest_eval, seconds)

    def check_budgets(self, steps_this_run: int, eval_due: bool = False) -> None:
        """Turn an exhausted budget into a stop request (local decision; ranks agree through the step all-reduce)."""
        if self.reason is not None:
            return
        if self.max_steps_per_run and steps_this_run >= self.max_steps_per_run:
            self.reason = f"--max_steps_per_run {self.max_steps_per_run} reached"
        elif self.max_run_time is not None:
            elapsed = time.monotonic() - self.started
            # Leave room for the evaluation due now, one more step and the save, with a 1.5x margin for noise, and a
            # second for the exit itself (status file, teardown) and a machine busier than the steps measured so far.
            reserve = self.slowest_step + self.slowest_save + (self.slowest_eval if eval_due else 0.0)
            if elapsed + 1.5 * reserve + EXIT_RESERVE_S >= self.max_run_time:
                self.reason = f"--max_run_time budget ({self.max_run_time:.0f}s) nearly used"

    def eval_should_stop(self) -> bool:
        """Asked at every evaluation batch: a stop request, or a budget with no room left for the save after it."""
        left = None if self.max_run_time is None else self.max_run_time - (time.monotonic() - self.started)
        if self.reason is None and left is not None and left <= 1.5 * self.slowest_save:
            self.reason = f"--max_run_time budget ({self.max_run_time:.0f}s) nearly used during evaluation"
        return self.reason is not None

    @property
    def local_flag(self) -> bool:
        return self.reason is not None


def inject_fault(point: str, step: int) -> None:
    """Chaos testing: RESUMABLE_FAULT=point:step delivers a real signal to this process at that point.

    Points are named by the signal: `kill_before_manifest` (SIGKILL, uncatchable), `sigterm_during_save`, ...
    """
    if os.environ.get("RESUMABLE_FAULT") == f"{point}:{step}":
        sig = signal.SIGKILL if point.startswith("kill_") else signal.SIGTERM
        os.kill(os.getpid(), sig)


def inject_delay(point: str) -> None:
    """Chaos testing: RESUMABLE_DELAY=point:seconds[,point:seconds] makes this process sleep at that point, e.g.
    `rank0_commit` (rank 0 hashing a large checkpoint) or `build_corpus` (rank 0 preparing a large corpus)."""
    for spec in filter(None, os.environ.get("RESUMABLE_DELAY", "").split(",")):
        name, _, seconds = spec.partition(":")
        if name == point:
            time.sleep(float(seconds))


def write_run_status(output_dir: str | os.PathLike, status: str, exit_code: int, step: int, **extra) -> None:
    """Record how this run ended. `accelerate launch` turns any non-zero exit into 1, so wrappers read this file."""
    path = Path(output_dir) / RUN_STATUS_FILE
    tmp = path.with_name(f".{RUN_STATUS_FILE}.{os.getpid()}.{secrets.token_hex(4)}.tmp")  # one per writer
    attempt = os.environ.get(ATTEMPT_ENV)  # set by a wrapper, which then trusts only this attempt's status
    record = {
        "status": status,
        "exit_code": exit_code,
        "step": step,
        **extra,
        **({"attempt": attempt} if attempt else {}),
    }
    tmp.write_text(json.dumps(record) + "\n")
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    """`python -m resumable.preemption OUTPUT_DIR [--attempt ID]`: print the last run status, exit with its code.

    0 = finished, 75 = checkpointed and needs another run, 1 = no status (the run crashed before writing one).
    With --attempt, a status written by another attempt (a stale file from an earlier job) counts as none.
    """
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m resumable.preemption",
        description="Print how the run in OUTPUT_DIR last ended (its run_status.json) and exit with that code.",
        epilog="exit codes: 0 finished; 75 checkpointed, run the same command again; 1 no status (the run crashed "
        "or never started, or the status is another attempt's); 2 bad usage",
    )
    parser.add_argument("output_dir", metavar="OUTPUT_DIR", help="the run's --output_dir (local or s3://...)")
    parser.add_argument("--attempt", metavar="ID", help="trust only a status written under RESUMABLE_ATTEMPT=ID")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    attempt = args.attempt
    path = f"{args.output_dir.rstrip('/')}/{RUN_STATUS_FILE}"
    try:
        if "://" in args.output_dir:  # a remote output dir (s3://...): train.py pushes run_status.json there
            import fsspec

            with fsspec.open(path, "r") as fh:
                status = json.loads(fh.read())
        else:
            status = json.loads(Path(path).read_text())
    except Exception:  # missing, unreadable, or the remote unreachable: the wrapper must not requeue blindly
        print(f"no readable {path}: the run crashed or never started", file=sys.stderr)
        return 1
    if attempt is not None and status.get("attempt") != attempt:
        print(
            f"{path} is from another attempt ({status.get('attempt')}): this one crashed before writing one",
            file=sys.stderr,
        )
        return 1
    print(f"{status['status']} at step {status['step']} {status.get('reason', '')}".rstrip())
    return int(status["exit_code"])


if __name__ == "__main__":
    sys.exit(main())
