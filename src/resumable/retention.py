"""Retention pools: which checkpoints to keep. A checkpoint wanted by any pool stays.

Pools: `rolling` (the newest N valid ones), `newest` (the newest valid one, always), `epoch` (epoch-end
checkpoints, every k-th epoch), `best` (the k best by the tracked metric, measured at that very step).
Pruning runs only after a successful commit, and deletes by renaming to `.trash-*` first, so a crash mid-delete
never leaves a half-deleted folder that looks like a checkpoint.
"""

from __future__ import annotations

import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from resumable.checkpoint import list_checkpoints, read_manifest, verify_checkpoint


@dataclass(frozen=True)
class RetentionPolicy:
    keep_last: int | None = None  # rolling pool size; None keeps every checkpoint
    keep_epoch_every: int = 0  # keep the epoch-end checkpoint of every k-th epoch; 0: no epoch pool
    keep_best: int = 1  # the k best by `metric`; 0: no best pool
    metric: str = "eval/loss"
    greater_is_better: bool = False

    @classmethod
    def from_config(cls, cfg) -> RetentionPolicy:
        return cls(
            keep_last=cfg.save_total_limit,
            keep_epoch_every=cfg.keep_epoch_every,
            keep_best=cfg.keep_best,
            metric=cfg.metric_for_best_model,
            greater_is_better=bool(cfg.greater_is_better),
        )


@dataclass(frozen=True)
class CheckpointInfo:
    name: str
    step: int
    epochs_done: int | None  # set when saved at the end of an epoch
    metric: float | None  # the tracked metric evaluated at this step, if it was


def describe(folder: Path, metric: str) -> CheckpointInfo:
    m = read_manifest(folder)
    value = m.get("metrics", {}).get(metric) if m.get("metrics_step") == m["step"] else None
    return CheckpointInfo(folder.name, m["step"], m.get("epochs_done"), value)


def pools(valid: list[CheckpointInfo], policy: RetentionPolicy) -> dict[str, set[str]]:
    """Checkpoint name -> the pools that want it. `valid` holds only verified checkpoints."""
    ordered = sorted(valid, key=lambda c: c.step)
    wanted: dict[str, set[str]] = {c.name: set() for c in ordered}
    if not ordered:
        return wanted
    wanted[ordered[-1].name].add("newest")
    rolling = ordered if policy.keep_last is None else ordered[max(0, len(ordered) - policy.keep_last) :]  # 0: none
    for c in rolling:
        wanted[c.name].add("rolling")
    if policy.keep_epoch_every:
        for c in ordered:
            if c.epochs_done and c.epochs_done % policy.keep_epoch_every == 0:
                wanted[c.name].add("epoch")
    # a NaN metric (a diverged evaluation) is never best: sorted among numbers it could push the real best out
    scored = [c for c in ordered if c.metric is not None and math.isfinite(c.metric)]
    if policy.keep_best and scored:
        sign = -1 if policy.greater_is_better else 1
        for c in sorted(scored, key=lambda c: (sign * c.metric, -c.step))[: policy.keep_best]:
            wanted[c.name].add("best")
    return wanted


def best_checkpoint(checkpoints_dir: Path, policy: RetentionPolicy) -> Path | None:
    """The valid checkpoint with the best metric evaluated at its own step."""
    valid = [describe(f, policy.metric) for f in list_checkpoints(checkpoints_dir) if verify_checkpoint(f) is None]
    best = [name for name, p in pools(valid, RetentionPolicy(keep_best=1, **_metric(policy))).items() if "best" in p]
    return checkpoints_dir / best[0] if best else None


def _metric(policy: RetentionPolicy) -> dict:
    return {"metric": policy.metric, "greater_is_better": policy.greater_is_better}


def remove_checkpoint(folder: Path) -> None:
    """Rename out of sight first (atomic), then delete: a crash leaves `.trash-*`, never a broken `step-*`."""
    trash = folder.with_name(f".trash-{folder.name}")
    shutil.rmtree(trash, ignore_errors=True)
    os.replace(folder, trash)
    shutil.rmtree(trash)


def prune_checkpoints(checkpoints_dir: Path, policy: RetentionPolicy) -> list[str]:
    """Delete valid checkpoints no pool wants, and leftovers of crashed saves. Main process, after a commit only.

    Invalid `step-*` folders are left alone: they are skipped on resume with a warning, and `checkpoints.py
    verify` reports them; deleting evidence of corruption is the user's call.
    """
    for junk in checkpoints_dir.glob(".t*-step-*"):  # .tmp-* and .trash-* from interrupted commits or deletes
        shutil.rmtree(junk, ignore_errors=True)
    folders = list_checkpoints(checkpoints_dir)
    valid = [describe(f, policy.metric) for f in folders if verify_checkpoint(f, deep=False) is None]
    doomed = [name for name, wanted_by in pools(valid, policy).items() if not wanted_by]
    for name in doomed:
        remove_checkpoint(checkpoints_dir / name)
    return doomed
