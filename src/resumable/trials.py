"""The offline sweep runner's state, all under its --output_dir: which trials exist, who runs them, how they ended.

    DIR/sweep.json                 the sweep (config and the flags after --): a rerun must be the same sweep
    DIR/trials/trial-0001.json     params, status, owner (host, pid, process group, heartbeat), metric history
    DIR/trials/trial-0001.log      the trial's output
    DIR/trials/trial-0001/         the trial's --output_dir (checkpoints: an interrupted trial resumes from them)

Every claim happens under one `flock` on DIR/.lock and every record is written by an atomic rename, so runners on
the same DIR (a Slurm job array) share the work: a trial is claimed by exactly one live runner. A running trial's
heartbeat is the mtime of `trial-N.heartbeat`, touched without the lock. A trial whose runner died is taken over:
on the same host once that runner's process is gone (its leftover training, found by the attempt tag every process
of the trial carries, gets SIGTERM, checkpoints and is waited for), on another host once its heartbeat is older
than --stale_after seconds. A runner that finds its trial taken over stops its own training and lets go.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import random
import signal
import socket
import time
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from resumable.errors import UserError
from resumable.logs import get_logger
from resumable.sweep_spec import same_sweep

log = get_logger(__name__)
OPEN = ("running", "requeue")  # not over: resumed by the next runner that finds it
# W&B's run states, for the sweep engine
STATES = {"running": "running", "requeue": "preempted", "finished": "finished", "stopped": "finished",
          "diverged": "failed", "failed": "failed"}  # fmt: skip
TAG = "RESUMABLE_TRIAL_ATTEMPT"  # in every process of a trial attempt: how a takeover finds what is left of it


@dataclass
class Trial:
    id: str
    index: int
    params: dict[str, Any]
    status: str = "running"
    owner: dict[str, Any] = field(default_factory=dict)
    heartbeat: float = 0.0
    attempts: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)  # {"step": s, metric: value} per evaluation
    exit_code: int | None = None
    seconds: float = 0.0  # wall time over all attempts
    note: str = ""


def _process_start(pid: int) -> str:
    """A process's start time (jiffies since boot): tells a live pid from a reused one."""
    with contextlib.suppress(OSError, IndexError):
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[19]
    return ""


def tagged(attempt: str) -> dict[int, int]:
    """Live processes of a trial attempt on this host (they carry TAG=attempt): pid -> parent pid."""
    needle, found = f"{TAG}={attempt}".encode(), {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        with contextlib.suppress(OSError, IndexError, ValueError):
            if needle in (Path("/proc") / entry / "environ").read_bytes().split(b"\0"):
                stat = (Path("/proc") / entry / "stat").read_text().rsplit(")", 1)[1].split()
                if stat[0] != "Z":
                    found[int(entry)] = int(stat[1])
    return found


def kill_attempt(attempt: str) -> None:
    """SIGKILL whatever is left of a trial attempt on this host."""
    for pid in tagged(attempt):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)


class SweepDir:
    def __init__(self, root: Path, sweep: dict, extra: list[str], stale_after: float):
        self.root, self.sweep, self.extra, self.stale_after = root, sweep, extra, stale_after
        self.trials_dir = root / "trials"
        self.host, self.pid = socket.gethostname(), os.getpid()
        try:
            self.trials_dir.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise UserError(f"--output_dir {root}: cannot create it ({err.strerror})") from None
        with self.locked():
            record = {"sweep": sweep, "extra": extra}
            path = root / "sweep.json"
            if path.is_file():
                old = json.loads(path.read_text())
                if not same_sweep(old, record):
                    raise UserError(f"--output_dir {root} holds another sweep (other parameters, command or flags "
                                    "after --); use a new --output_dir, or the same command as before")  # fmt: skip
            else:
                self._write(path, record)

    @contextlib.contextmanager
    def locked(self):
        with open(self.root / ".lock", "a+") as fh:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX)  # released when the file closes, also if this process dies
            except OSError as err:  # e.g. Lustre mounted without flock
                raise UserError(f"--output_dir {self.root}: its filesystem cannot lock files ({err.strerror}); "
                                "runners could claim the same trial: use a folder on a filesystem with flock") from None  # fmt: skip
            yield

    def _write(self, path: Path, data: dict) -> None:
        tmp = path.with_name(f".{path.name}.{self.host}.{self.pid}.tmp")
        with open(tmp, "w") as fh:
            fh.write(json.dumps(data, indent=1, sort_keys=True, default=str))
            fh.flush()
            os.fsync(fh.fileno())  # a crash must not leave an empty record behind the rename
        os.replace(tmp, path)

    def trials(self) -> list[Trial]:
        """Every trial, by number; a record that cannot be read stops the runner (one line) instead of being
        mistaken for a missing trial, whose number would then be handed out again."""
        found = []
        for path in sorted(self.trials_dir.glob("trial-[0-9]*.json")):
            try:
                found.append(Trial(**json.loads(path.read_text())))
            except (OSError, ValueError, TypeError) as err:
                raise UserError(f"{path}: unreadable trial record ({err}); restore it, or move the trial's files "
                                "(trial-N.json, .log, folder) out of the sweep to run it again") from None  # fmt: skip
        return found

    def heartbeat(self, trial: Trial) -> None:
        """Touched by the owner while the trial runs (no lock: a busy lock must not make a live trial look dead)."""
        path = self.trials_dir / f"{trial.id}.heartbeat"
        path.touch()
        trial.heartbeat = path.stat().st_mtime

    def last_heartbeat(self, trial: Trial) -> float:
        try:
            return (self.trials_dir / f"{trial.id}.heartbeat").stat().st_mtime
        except OSError:
            return trial.heartbeat

    def still_mine(self, trial: Trial) -> bool:
        """Whether the record still names this runner's attempt (another runner may have taken the trial over)."""
        try:
            current = json.loads((self.trials_dir / f"{trial.id}.json").read_text())
        except (OSError, ValueError):
            return True
        return current.get("owner", {}).get("attempt") == trial.owner.get("attempt")

    def save(self, trial: Trial) -> None:
        self._write(self.trials_dir / f"{trial.id}.json", asdict(trial))

    def run_dir(self, trial: Trial) -> Path:
        return self.trials_dir / trial.id

    def log_file(self, trial: Trial) -> Path:
        return self.trials_dir / f"{trial.id}.log"

    def owner_gone(self, trial: Trial) -> bool:
        owner = trial.owner
        if owner.get("host") != self.host:
            return time.time() - self.last_heartbeat(trial) > self.stale_after
        pid = owner.get("pid", 0)
        return not pid or _process_start(pid) != owner.get("start")

    def stop_leftovers(self, trial: Trial, timeout: float = 300.0) -> None:
        """What a dead runner's attempt left running on this host gets SIGTERM at its top processes (the launch
        wrapper or train.py, which checkpoint; not DataLoader workers or W&B's service) and is waited for."""
        attempt = trial.owner.get("attempt")
        if trial.owner.get("host") != self.host or not attempt or not (procs := tagged(attempt)):
            return
        log.warning(f"{trial.id}: its runner is gone but its training still runs; stopping it (it checkpoints)")
        for pid in [pid for pid, ppid in procs.items() if ppid not in procs]:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while tagged(attempt) and time.monotonic() < deadline:
            time.sleep(0.5)
        kill_attempt(attempt)

    def claim(self, count: int | None, retry: set[str]) -> Trial | None:
        """The next trial for this runner: an interrupted one first (or a failed one named in `retry`), then a new
        proposal (None: nothing left). A dead runner's leftover training is stopped after the lock is released."""
        with self.locked():
            trials = self.trials()
            for trial in trials:
                takeover = trial.status == "running" and self.owner_gone(trial)
                if trial.status == "requeue" or takeover or (trial.status == "failed" and trial.id in retry):
                    left, trial = dict(trial.owner), self._own(trial)
                    break
            else:
                if count is not None and len(trials) >= count:
                    return None
                params = self._propose(trials)
                if params is None:
                    return None
                index = max((t.index for t in trials), default=0) + 1
                if (self.trials_dir / f"trial-{index:04d}").exists():
                    raise UserError(f"{self.trials_dir / f'trial-{index:04d}'}: a trial folder without its record "
                                    "(trial-N.json); move it out of the sweep or restore the record")  # fmt: skip
                return self._own(Trial(id=f"trial-{index:04d}", index=index, params=params))
        self.stop_leftovers(Trial(id=trial.id, index=trial.index, params={}, owner=left))
        return trial

    def _own(self, trial: Trial) -> Trial:
        trial.status, trial.heartbeat, trial.attempts = "running", time.time(), trial.attempts + 1
        attempt = f"{trial.id}-{trial.attempts}-{self.host}-{self.pid}-{time.time_ns()}"
        trial.owner = {"host": self.host, "pid": self.pid, "start": _process_start(self.pid), "attempt": attempt}
        self.save(trial)
        self.heartbeat(trial)
        return trial

    def _propose(self, trials: list[Trial]) -> dict[str, Any] | None:
        """W&B's sweep engine proposes; its random draws are seeded by the trial's index, so a sweep rerun from
        the same finished trials proposes the same ones."""
        import numpy as np
        import sweeps

        seed = zlib.crc32(f"trial-{len(trials) + 1}".encode())
        np.random.seed(seed)
        random.seed(seed)
        proposal = sweeps.next_run(self.engine_config(), self.engine_runs(trials))
        return None if proposal is None else {k: v["value"] for k, v in proposal.config.items()}

    def engine_config(self) -> dict:
        return {k: v for k, v in self.sweep.items() if k not in ("command", "program", "description", "name")}

    def engine_runs(self, trials: list[Trial]) -> list:
        import sweeps

        metric = self.sweep["metric"]["name"]
        runs = []
        for t in trials:
            last = [h[metric] for h in t.history if metric in h]
            runs.append(sweeps.SweepRun(name=t.id, state=sweeps.RunState(STATES[t.status]),
                                        config={k: {"value": v} for k, v in t.params.items()},
                                        summary_metrics={metric: last[-1]} if last else {},
                                        history=[{metric: h[metric]} for h in t.history if metric in h]))  # fmt: skip
        return runs

    def should_stop(self, trial: Trial) -> bool:
        """Hyperband (`early_terminate`): whether W&B's engine would stop this running trial now."""
        if not self.sweep.get("early_terminate"):
            return False
        import sweeps

        trials = [trial if t.id == trial.id else t for t in self.trials()]
        return any(run.name == trial.id for run in sweeps.stop_runs(self.engine_config(), self.engine_runs(trials)))
