"""The offline sweep runner's state, all under its --output_dir: which trials exist, who runs them, how they ended.

    DIR/sweep.json                 the sweep (config and the flags after --): a rerun must be the same sweep
    DIR/trials/trial-0001.json     params, status, owner (host, pid, process group, heartbeat), metric history
    DIR/trials/trial-0001.log      the trial's output
    DIR/trials/trial-0001/         the trial's --output_dir (checkpoints: an interrupted trial resumes from them)

Every change happens under one `flock` on DIR/.lock and is written by an atomic rename, so runners on the same DIR
(a Slurm job array) share the work: a trial is claimed by exactly one live runner. A trial whose runner died is
taken over: on the same host once its process is gone (its leftover training processes are stopped first, and
checkpoint), on another host once its heartbeat is older than --stale_after seconds.
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
STATES = {
    "running": "running",
    "requeue": "preempted",
    "finished": "finished",
    "stopped": "finished",
    "failed": "failed",
}  # fmt: skip  (W&B's run states, for the sweep engine)


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


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


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
            fcntl.flock(fh, fcntl.LOCK_EX)  # released when the file closes, also if this process dies
            yield

    def _write(self, path: Path, data: dict) -> None:
        tmp = path.with_name(f".{path.name}.{self.host}.{self.pid}.tmp")
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True, default=str))
        os.replace(tmp, path)

    def trials(self) -> list[Trial]:
        found = []
        for path in sorted(self.trials_dir.glob("trial-*.json")):
            with contextlib.suppress(OSError, ValueError, TypeError):
                found.append(Trial(**json.loads(path.read_text())))
        return found

    def save(self, trial: Trial) -> None:
        self._write(self.trials_dir / f"{trial.id}.json", asdict(trial))

    def run_dir(self, trial: Trial) -> Path:
        return self.trials_dir / trial.id

    def log_file(self, trial: Trial) -> Path:
        return self.trials_dir / f"{trial.id}.log"

    def owner_gone(self, trial: Trial) -> bool:
        owner = trial.owner
        if owner.get("host") != self.host:
            return time.time() - trial.heartbeat > self.stale_after
        pid = owner.get("pid", 0)
        return not pid or _process_start(pid) != owner.get("start")

    def stop_leftovers(self, trial: Trial, timeout: float = 300.0) -> None:
        """The training a dead runner left behind (same host) gets SIGTERM, checkpoints, and is waited for."""
        pgid = trial.owner.get("pgid")
        if trial.owner.get("host") != self.host or not pgid or not group_alive(pgid):
            return
        log.warning(f"{trial.id}: its runner is gone but its training still runs; stopping it (it checkpoints)")
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while group_alive(pgid) and time.monotonic() < deadline:
            time.sleep(0.5)
        if group_alive(pgid):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pgid, signal.SIGKILL)

    def claim(self, count: int | None, retry_failed: bool) -> Trial | None:
        """The next trial for this runner: an interrupted one first, then a new proposal (None: nothing left)."""
        with self.locked():
            trials = self.trials()
            for trial in trials:
                takeover = trial.status == "running" and self.owner_gone(trial)
                if trial.status == "requeue" or takeover or (retry_failed and trial.status == "failed"):
                    if takeover:
                        self.stop_leftovers(trial)
                    return self._own(trial)
            if count is not None and len(trials) >= count:
                return None
            params = self._propose(trials)
            if params is None:
                return None
            index = len(trials) + 1
            return self._own(Trial(id=f"trial-{index:04d}", index=index, params=params))

    def _own(self, trial: Trial) -> Trial:
        trial.status, trial.heartbeat, trial.attempts = "running", time.time(), trial.attempts + 1
        trial.owner = {"host": self.host, "pid": self.pid, "start": _process_start(self.pid)}
        self.save(trial)
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
