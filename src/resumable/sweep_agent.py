"""What a run started by `wandb agent SWEEP_ID` does differently: its own output dir, and a preemption reported.

The agent sets WANDB_SWEEP_ID and WANDB_RUN_ID in the run's environment (and the same run id again when it resumes
a preempted run), so `{--output_dir}/sweep-{sweep id}/{run id}` is that run's alone: no run of the sweep resumes
another's checkpoints, and the agent's resume continues from the run's newest checkpoint. A stop signal marks the
W&B run as preempting before the checkpointed exit (75): W&B's contract requeues a preempting run that exits
non-zero, instead of counting it as crashed (`trackers.mark_preempting`).
"""

from __future__ import annotations

import os
import re

from resumable.errors import UserError

_ID = re.compile(r"^[A-Za-z0-9_.-]{1,128}$")


def agent_run() -> tuple[str, str] | None:
    """(sweep id, run id) when a W&B sweep agent started this process, else None."""
    sweep, run = os.environ.get("WANDB_SWEEP_ID"), os.environ.get("WANDB_RUN_ID")
    if not (sweep and run):
        return None
    for name, value in (("WANDB_SWEEP_ID", sweep), ("WANDB_RUN_ID", run)):
        if not _ID.match(value) or value in (".", ".."):
            raise UserError(f"{name}={value!r}: not a W&B id (letters, digits, '_', '-', '.')")
    return sweep, run


def run_output_dir(output_dir: str) -> str:
    """--output_dir of a run under a sweep agent: `{output_dir}/sweep-{sweep}/{run}` (also for s3:// URLs; a dir
    that already is that run's is left as it is)."""
    ids = agent_run()
    if ids is None:
        return output_dir
    suffix = f"sweep-{ids[0]}/{ids[1]}"
    base = output_dir.rstrip("/")
    return base if base.endswith("/" + suffix) else f"{base}/{suffix}"
