"""What a start-up does with what its output dir already holds: continue, branch, start over, extend, or stop.

The contract (README, "Resume semantics"):
- `auto`/`latest` continue from the newest valid checkpoint. A finished run (COMPLETE) says so and exits 0, unless
  asked for more (`--max_steps` / `--num_train_epochs` beyond what it trained): then it continues from its final
  checkpoint, with a WARNING about the LR schedule. Its settings are checked either way.
- `best` or a checkpoint path older than the newest starts a branch: the newer checkpoints (and a finished run's
  final model) are moved to `abandoned/<time>-after-step-N/`, never deleted, so `checkpoints/` always holds one
  line of history, retention ranks it correctly, and every later default run continues the branch.
- `none` starts over: everything the old run wrote is moved to `abandoned/<time>-start-over/`.
- An explicit value acts once: the checkpoints it leads to record it (`Progress.branch`), and the same value again
  continues them, so a requeued job or a re-run of the same command never branches or starts over a second time.
Planning only reads; `apply_plan` (main process, once every process has planned) moves things.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from resumable.checkpoint import (
    Progress,
    check_settings,
    find_latest_checkpoint,
    read_manifest,
    read_progress,
    verify_checkpoint,
)
from resumable.config import RESUME_KEYWORDS, TrainConfig
from resumable.errors import UserError
from resumable.logs import get_logger
from resumable.retention import RetentionPolicy, best_checkpoint

log = get_logger(__name__)
ABANDONED = "abandoned"
COMPLETE = "COMPLETE"  # same name as resumable.export.COMPLETE (export pulls in the metrics and plotting code)
END_FILES = ("final", "final_raw", "final_metrics.json", "loss_curve.png", COMPLETE)  # a finished run's end
RUN_FILES = (COMPLETE, "checkpoints", "train_log.jsonl", "train.log", "samples", "runs", "wandb", "run_status.json")
RUN_FILES += ("tracker_run_id",)  # restore.RUN_ID_FILE
RUN_FILES += END_FILES[:-1]


@dataclass
class ResumePlan:
    resume: Path | None = None  # the checkpoint to load; None: a fresh start
    complete: str | None = None  # set when there is nothing to do: the message saying so
    set_aside: list[Path] = field(default_factory=list)  # moved to abandoned/<label>/ by apply_plan
    label: str = ""
    branch: dict | None = None  # the record this line of checkpoints starts carrying (Progress.branch)
    branch_from_step: int | None = None  # remote checkpoints after this step are set aside too
    extending: dict | None = None  # the COMPLETE record of a finished run asked for more
    warnings: list[str] = field(default_factory=list)
    info: list[str] = field(default_factory=list)


def read_complete(out: Path) -> dict | None:
    """The COMPLETE record of a finished run ({} for one written by an older version), or None."""
    path = out / COMPLETE
    if not path.exists():
        return None
    try:
        record = json.loads(path.read_text())
    except ValueError:
        return {}
    return record if isinstance(record, dict) else {}


def complete_record(cfg: TrainConfig, step: int, epochs: float) -> dict:
    """What COMPLETE holds: enough to tell a later run asking for more, and to check its settings."""
    return {"step": step, "epochs": epochs, "settings": cfg.resume_settings()}


def wants_more(cfg: TrainConfig, done: dict) -> bool:
    """Whether this command asks a finished run for more steps or epochs than it trained."""
    if cfg.max_steps > 0:
        return cfg.max_steps > done.get("step", cfg.max_steps)
    return "epochs" in done and cfg.num_train_epochs > done["epochs"] + 1e-9


def flags_digest(cfg: TrainConfig) -> str:
    """Every flag except those that only say how long this attempt may run: equal for a requeued command."""
    per_attempt = ("config", "resume_from_checkpoint", "max_steps_per_run", "max_run_time", "stop_signals",
                   "ddp_timeout")  # fmt: skip
    flags = {k: v for k, v in sorted(vars(cfg).items()) if k not in per_attempt}
    return hashlib.sha256(json.dumps(flags, default=str).encode()).hexdigest()[:16]


def _key(request: str) -> str:
    return request if request in RESUME_KEYWORDS else str(Path(request).resolve())


def _step(folder: Path) -> int:
    """The step of a `step-N` folder; -1 for any other name (never set aside as part of a line)."""
    m = re.fullmatch(r"step-(\d+)", folder.name)
    return int(m.group(1)) if m else -1


def _branch_of(folder: Path | None) -> dict:
    return (read_progress(folder).branch or {}) if folder is not None else {}


def _stamp(suffix: str) -> str:
    return time.strftime("%Y%m%d-%H%M%S") + "-" + suffix


def plan_resume(cfg: TrainConfig) -> ResumePlan:
    """Decide what this start-up does; raise UserError for a request that cannot be met. Reads only."""
    request, key = cfg.resume_from_checkpoint, _key(cfg.resume_from_checkpoint)
    record = {"request": key, "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "flags": flags_digest(cfg)}
    if request == "none":
        newest = _newest_or_none(cfg.checkpoints_dir)
        if _branch_of(newest).get("flags") == record["flags"] and _branch_of(newest).get("request") == key:
            return _continue(
                cfg, newest, f"continuing the run started over with --resume_from_checkpoint none ({newest.name})"
            )
        present = [p for p in (Path(cfg.output_dir) / n for n in RUN_FILES) if p.exists()]
        plan = ResumePlan(branch=record, set_aside=present, label=_stamp("start-over"), branch_from_step=-1)
        if present:
            plan.warnings.append(
                f"starting over: moved the previous run ({', '.join(p.name for p in present)}) to "
                f"{Path(cfg.output_dir) / ABANDONED / plan.label}; nothing was deleted"
            )
        return plan
    newest = find_latest_checkpoint(cfg.checkpoints_dir)
    if request in ("auto", "latest"):
        return _continue(cfg, newest)
    if newest is not None and _branch_of(newest).get("request") == key:
        note = f"continuing the branch --resume_from_checkpoint {request} started ({newest.name} is its newest)"
        return _continue(cfg, newest, note)
    target = _requested(cfg)
    check_settings(target, cfg.resume_settings())
    plan = _continue(cfg, target) if newest is not None and newest.resolve() == target.resolve() else ResumePlan(target)
    plan.branch = {**record, "from": str(target), "from_step": read_manifest(target)["step"]}
    if newest is None or plan.complete or plan.extending:
        return plan
    out, from_step = Path(cfg.output_dir), plan.branch["from_step"]
    if target.resolve().parent == cfg.checkpoints_dir.resolve():  # an older checkpoint of this run
        newer = [f for f in cfg.checkpoints_dir.iterdir() if f.name.startswith("step-") and _step(f) > from_step]
        plan.set_aside = [p for p in (out / n for n in reversed(END_FILES)) if p.exists()] + sorted(newer)
        plan.label, plan.branch_from_step = _stamp(f"after-step-{from_step}"), from_step
    else:  # another run's checkpoint: this run's own history is not part of the new line
        plan.set_aside = [p for p in (out / n for n in RUN_FILES) if p.exists()]
        plan.label, plan.branch_from_step = _stamp(f"before-{target.name}"), -1
    names = [p.name for p in plan.set_aside]
    plan.warnings.append(
        f"branching from {target} (step {from_step}): moved {', '.join(names)} to {out / ABANDONED / plan.label} "
        "(nothing deleted); later runs continue this branch"
    )
    return plan


def _continue(cfg: TrainConfig, newest: Path | None, note: str = "") -> ResumePlan:
    """Continue the line of checkpoints ending at `newest`: resume, extend a finished run, or nothing to do."""
    plan = ResumePlan(resume=newest, info=[note] if note else [])
    if newest is not None:
        check_settings(newest, cfg.resume_settings())
    done = read_complete(Path(cfg.output_dir))
    if done is None:
        return plan
    saved = done.get("settings")
    if saved is not None and saved != cfg.resume_settings():
        diff = [k for k in sorted(saved.keys() | cfg.resume_settings().keys()) if saved.get(k) != getattr(cfg, k, None)]
        raise UserError(
            f"{Path(cfg.output_dir) / COMPLETE}: the finished run was trained with different {', '.join(diff)}; "
            "use another --output_dir or --resume_from_checkpoint none"
        )
    if not wants_more(cfg, done):
        asked = f"--max_steps {cfg.max_steps}" if cfg.max_steps > 0 else f"--num_train_epochs {cfg.num_train_epochs:g}"
        plan.complete = (
            f"{cfg.output_dir} is already complete at step {done.get('step', '?')} ({asked} asks for no more; "
            f"final model in {Path(cfg.output_dir) / 'final'}); nothing to do."
        )
    elif newest is None:
        raise UserError(f"{cfg.output_dir}: finished run has no valid checkpoint left to continue from")
    else:
        plan.extending = done
    return plan


def _newest_or_none(checkpoints_dir: Path) -> Path | None:
    try:
        return find_latest_checkpoint(checkpoints_dir)
    except UserError:  # none valid: starting over is exactly what the user asked for
        return None


def _requested(cfg: TrainConfig) -> Path:
    if cfg.resume_from_checkpoint == "best":
        best = best_checkpoint(cfg.checkpoints_dir, RetentionPolicy.from_config(cfg))
        if best is None:
            raise UserError(f"--resume_from_checkpoint best: no valid checkpoint in {cfg.checkpoints_dir} has a metric")
        return best
    path, r = Path(cfg.resume_from_checkpoint), cfg.resume_from_checkpoint
    if not path.is_dir():
        raise UserError(f"--resume_from_checkpoint {r}: no such checkpoint directory")
    if not (path / "manifest.json").is_file():
        raise UserError(f"--resume_from_checkpoint {r}: not a complete checkpoint (no manifest.json)")
    reason = verify_checkpoint(path)
    if reason is not None:
        raise UserError(f"--resume_from_checkpoint {path}: not a valid checkpoint ({reason})")
    return path


def apply_plan(plan: ResumePlan, out: Path, mirror=None) -> None:
    """Carry out the moves `plan` decided (main process only): set aside, or un-finish a run being extended."""
    if plan.extending is not None:
        if mirror is not None:
            mirror.unfinish()  # the remote COMPLETE goes first: a kill now leaves a run that resumes
        (out / COMPLETE).unlink(missing_ok=True)
    if plan.set_aside or (mirror is not None and plan.branch_from_step is not None):
        if mirror is not None:
            mirror.unfinish()  # a remote COMPLETE first, as locally (set_aside lists it first)
        dest = out / ABANDONED / plan.label
        while dest.exists() and any(dest.iterdir()) and not (dest / "train_log.jsonl").exists():
            dest = dest.with_name(dest.name + "+")  # a second plan in the same second
        if (out / "train_log.jsonl").exists() and plan.branch_from_step is not None and plan.branch_from_step >= 0:
            dest.mkdir(parents=True, exist_ok=True)
            shutil.copy2(out / "train_log.jsonl", dest / "train_log.jsonl")  # the live one is cut at the branch
        for path in plan.set_aside:
            target = dest / ("checkpoints" if path.name.startswith("step-") else "") / path.name
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(path, target)
        if mirror is not None:
            mirror.set_aside(f"{ABANDONED}/{plan.label}", plan.branch_from_step)


def plan_total_steps(
    cfg: TrainConfig, batches_per_epoch: int | None, layout: tuple[int, int, int], saved: Progress | None
) -> int:
    """Optimizer steps the run ends at. Steps done under another layout (processes x batch x accumulation) are not
    re-counted at the new steps-per-epoch: the run ends after `--num_train_epochs` epochs of data, never early."""
    if cfg.max_steps > 0:  # always so for a stream, whose epochs have no known length
        return cfg.max_steps
    world, batch, ga = layout
    steps_per_epoch = math.ceil(batches_per_epoch / ga)  # a short last window still steps
    planned = math.ceil(cfg.num_train_epochs * steps_per_epoch)
    if saved is None or (not saved.replanned and layout == (saved.world_size, saved.per_device_train_batch_size,
                                                             saved.gradient_accumulation_steps)):  # fmt: skip
        return planned
    same_batch = (saved.world_size, saved.per_device_train_batch_size) == (world, batch)
    skip = saved.batches_in_epoch if same_batch else saved.samples_in_epoch // (world * batch)
    left = cfg.num_train_epochs - saved.epoch  # epochs to go, counting the one in progress
    if left >= 1:
        rest = math.ceil((batches_per_epoch - skip) / ga) + math.ceil((left - 1) * steps_per_epoch)
    else:
        rest = max(0, math.ceil((left * batches_per_epoch - skip) / ga))
    return saved.step + rest


def pull_for_plan(cfg: TrainConfig, mirror) -> None:
    """Remote output dir: bring into the staging folder what planning reads (every process calls it; locked).

    A deleted remote run discards a staging folder that had pushed to it; a finished one brings its COMPLETE (and
    its final checkpoint only when asked for more); otherwise the newest valid checkpoint, and the best for `best`.
    """
    mirror.forget_if_deleted()
    if mirror.fetch_complete():
        if wants_more(cfg, read_complete(mirror.local_dir) or {}):
            mirror.pull_newest()
            mirror.fetch_files(("train_log.jsonl", "train.log"))  # the extension appends to the finished run's logs
        return
    mirror.pull_latest_valid()
    if cfg.resume_from_checkpoint == "best" and (name := mirror.best_remote(RetentionPolicy.from_config(cfg))):
        mirror.pull_checkpoint(name)


def reschedule(scheduler, cfg: TrainConfig, step: int, old_total: int, total_steps: int) -> str:
    """The planned total changed since the checkpoint (a finished run extended, another --max_steps, another global
    batch): set the LR to what the schedule, rebuilt for the new total, gives at `step` (the loaded state holds the
    old schedule's rate, e.g. 0 at the end of a linear decay). Returns the WARNING to print."""
    inner = getattr(scheduler, "scheduler", scheduler)  # accelerate's wrapper around the torch scheduler
    inner.last_epoch -= 1
    inner.step()  # recomputes every group's rate at last_epoch with the new total
    return (
        f"the run now ends at step {total_steps}, not {old_total}: the {cfg.lr_scheduler_type} LR schedule is rebuilt "
        f"for {total_steps} steps and continues from step {step} at lr {inner.get_last_lr()[0]:.3g} (not the same as "
        f"one run of {total_steps} steps from scratch)"
    )
