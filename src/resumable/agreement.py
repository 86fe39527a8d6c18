"""One resume decision for every rank: rank 0 plans and verifies, the others follow (why: resumable/ranks.py).

Each rank then finds the chosen checkpoint in its own view of the output dir: the same folder (a shared
filesystem: rank 0's verification stands), or another copy (a node-local staging folder of an s3:// run: pulled
if missing, verified once by the first rank of that node). A rank that cannot use it stops every rank with one
line naming the rank, its host and why.
"""

from __future__ import annotations

import dataclasses
import shutil
import traceback
from pathlib import Path

from resumable.backend import check_layout
from resumable.checkpoint import MANIFEST, read_manifest, read_progress, verify_checkpoint
from resumable.config import TrainConfig
from resumable.errors import EnvironmentFailure, UserError
from resumable.ranks import Ranks, host
from resumable.resume_plan import ResumePlan, plan_resume, pull_for_plan


def agree_on_plan(team: Ranks, cfg: TrainConfig, mirror=None) -> ResumePlan:
    """The plan rank 0 made, with `resume` as this rank sees it; UserError on every rank if any rank cannot follow."""
    shared = _plan_on_main(team, cfg, mirror) if team.is_main else None
    shared = team.broadcast(shared)
    if shared[0] == "error":
        _, code, message = shared
        team.wait()  # every rank has the message before any exits (an early exit breaks a peer's receive)
        raise (EnvironmentFailure if code == EnvironmentFailure.exit_code else UserError)(message)
    _, plan, seen = shared
    if team.world == 1 or plan.resume is None or plan.complete or team.group is None:  # XLA: one shared folder
        return plan
    local = cfg.checkpoints_dir / plan.resume.name if seen["in_store"] else plan.resume
    views = team.all_gather((host(), str(local.absolute())))
    leader = views.index(views[team.rank]) == team.rank and not team.is_main
    try:
        verdict = _check_copy(local, seen, mirror) if leader else None
    except Exception as err:  # an unreachable bucket, an unreadable folder: every rank hears of it, not a hang
        verdict = f"{type(err).__name__}: {str(err).strip().splitlines()[0][:300] if str(err).strip() else ''}"
    problems = [(r, views[r][0], v) for r, v in enumerate(team.all_gather(verdict)) if v is not None]
    if problems:
        rank, where, why = problems[0]
        raise UserError(
            f"rank {rank} on {where} cannot use {plan.resume.name}, the checkpoint rank 0 resumes from ({why}); "
            "every rank must see the same checkpoints: a --output_dir on a filesystem all nodes share, or an s3:// one"
        )
    return dataclasses.replace(plan, resume=local)


def _plan_on_main(team: Ranks, cfg: TrainConfig, mirror) -> tuple:
    try:
        if mirror is not None:
            pull_for_plan(cfg, mirror)
        plan = plan_resume(cfg)
        seen = {}
        if plan.resume is not None and not plan.complete:
            folder = plan.resume
            check_layout(
                folder, read_manifest(folder).get("layout"), read_progress(folder).world_size, team.accelerator
            )
            seen["in_store"] = folder.resolve().parent == cfg.checkpoints_dir.resolve()
            seen["identity"], seen["digest"] = _identity(folder), read_manifest(folder).get("manifest_sha256")
            if mirror is not None and seen["in_store"] and team.world > 1:
                mirror.ensure_pushed(folder)  # the other nodes pull it from there
        return ("plan", plan, seen)
    except UserError as err:  # every rank raises it (the others would otherwise wait for a plan)
        return ("error", err.exit_code, str(err))
    except Exception as err:  # a bug or the storage failing: its traceback here, one line on every rank
        traceback.print_exc()
        return ("error", 1, f"planning the resume failed on rank 0: {type(err).__name__}: {err}")


def _identity(folder: Path) -> tuple[int, int, int] | None:
    """Which copy of a checkpoint a rank sees: on one filesystem every rank sees the same manifest file."""
    try:
        st = (folder / MANIFEST).stat()
    except OSError:
        return None
    return (st.st_ino, st.st_mtime_ns, st.st_size)


def _digest(folder: Path) -> str | None:
    try:
        return read_manifest(folder).get("manifest_sha256")
    except (OSError, ValueError):
        return None


def _check_copy(local: Path, seen: dict, mirror) -> str | None:
    """Why this rank's copy of rank 0's checkpoint is unusable (None: it is usable), pulling it first if missing."""
    if _identity(local) == seen["identity"]:
        return None  # the very file rank 0 verified
    if mirror is not None and seen["in_store"]:
        if local.is_dir() and _digest(local) != seen["digest"]:
            shutil.rmtree(local, ignore_errors=True)  # a staging copy is a cache: a stale one is refetched
        reason = mirror.pull_checkpoint(local.name)
        if reason is not None:
            return f"cannot pull it from {mirror.url}: {reason}"
    if not local.is_dir():
        return f"{local} does not exist here"
    reason = verify_checkpoint(local)  # once for this copy (a pull just hashed it: not again)
    if reason is None and _digest(local) != seen["digest"]:
        reason = f"{local} is another checkpoint than rank 0's (different manifest)"
    return reason
