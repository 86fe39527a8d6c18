"""Experiment trackers (TensorBoard, W&B) that show one run with each step once, however many times it resumed."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import re
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from resumable.errors import UserError
from resumable.logs import get_logger

log = get_logger(__name__)
KNOWN = ("tensorboard", "wandb")
INSTALL = {"tensorboard": "pip install tensorboard", "wandb": "pip install -e '.[wandb]'"}


def is_installed(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def wandb_problem() -> str:
    """Why W&B cannot start here ("" when it can): without a key or an offline mode, `wandb.init` fails after the
    whole start-up. Checks what wandb reads: WANDB_MODE, WANDB_API_KEY, ~/.netrc, its settings file."""
    mode = os.environ.get("WANDB_MODE", "").lower()
    if mode in ("offline", "disabled", "dryrun") or os.environ.get("WANDB_API_KEY"):
        return ""
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname or "api.wandb.ai"
    config_dir = Path(os.environ.get("WANDB_CONFIG_DIR", Path.home() / ".config" / "wandb"))
    for path, needle in ((Path(os.environ.get("NETRC", Path.home() / ".netrc")), host), (config_dir / "settings", "")):
        with contextlib.suppress(OSError):
            text = path.read_text()
            if (needle and needle in text) or (not needle and re.search(r"^mode\s*=\s*(offline|disabled)", text, re.M)):
                return ""
    return "not logged in (run `wandb login`, or set WANDB_API_KEY, or WANDB_MODE=offline)"


def _unavailable(name: str) -> str:
    if not is_installed(name):
        return f"not installed ({INSTALL[name]})"
    return wandb_problem() if name == "wandb" else ""


def choose_trackers(report_to: str) -> list[str]:
    """`--report_to` -> the trackers that will run. An explicit one that cannot run (not installed, W&B not logged
    in) is an error; `all` takes those that can (and the start-up line says why the others do not)."""
    if report_to == "none":
        return []
    if report_to == "all":
        return [name for name in KNOWN if not _unavailable(name)]
    if problem := _unavailable(report_to):
        raise UserError(f"--report_to {report_to}: {report_to} is {problem}, or use --report_to none")
    return [report_to]


def describe(report_to: str, trackers: list[str]) -> str:
    left_out = [f"{name} {_unavailable(name)}" for name in KNOWN if report_to == "all" and name not in trackers]
    return f"Trackers: {', '.join(trackers) or 'none'}" + (f" ({'; '.join(left_out)})" if left_out else "")


def start_trackers(accelerator, cfg, trackers: list[str], settings: dict[str, Any], step: int, run_id: str) -> None:
    """Start the trackers so that a resumed run overwrites, never duplicates, what a killed attempt logged past `step`.

    TensorBoard: `purge_step` makes its reader drop the earlier files' events from `step + 1` on, and the settings go
    into the run itself (accelerate's `add_hparams` would add one timestamped sub-run per start). W&B: the same run id
    resumes the same run; its config is updated in place.
    """
    if not trackers:
        return
    init_kwargs = {"tensorboard": {"purge_step": step + 1}, "wandb": {"id": run_id, "resume": "allow"}}
    accelerator.init_trackers(cfg.project_name, config=None, init_kwargs=init_kwargs)
    if not accelerator.is_main_process:
        return
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            if step == 0:
                _write_hparams(tracker.writer, settings)
        else:
            tracker.store_init_configuration(settings)


def _write_hparams(writer, settings: dict[str, Any]) -> None:
    from torch.utils.tensorboard.summary import hparams

    values = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in settings.items()}
    file_writer = writer._get_file_writer()
    for summary in hparams(values, {}):
        file_writer.add_summary(summary)


def mark_preempting(reason: str | None) -> None:
    """Tell W&B (when this run logs to it) that the run is being preempted, so that its sweep requeues it.

    Only for a stop a scheduler asked for: SIGUSR1 (Slurm's signal lead), SIGTERM inside a Slurm job, a budget
    (--max_run_time, --max_steps_per_run). A plain SIGTERM is also how `wandb agent` stops a run (hyperband, the
    UI's stop button) and Ctrl+C is a person: marking those would make the sweep run them again.
    """
    wandb = sys.modules.get("wandb")  # imported only when --report_to started it
    run = getattr(wandb, "run", None) if wandb else None
    signalled = (reason or "").startswith("received ")
    by_scheduler = not signalled or "SIGUSR1" in reason or ("SIGTERM" in reason and "SLURM_JOB_ID" in os.environ)
    if run is None or not reason or not by_scheduler:
        return
    try:
        run.mark_preempting()
    except Exception as err:  # the checkpointed exit matters more than the W&B record
        log.warning(f"could not mark the W&B run {run.id} as preempting ({err}); it may show as crashed")
        return
    log.info(f"marked the W&B run {run.id} as preempting (its sweep requeues it)")
