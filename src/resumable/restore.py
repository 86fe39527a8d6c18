"""Restoring a run's state from its checkpoint: weights, optimizer, RNG, and where in the data it stood."""

from __future__ import annotations

import secrets
from pathlib import Path

from resumable.checkpoint import Progress, load_checkpoint
from resumable.config import TrainConfig
from resumable.feed import check_same_data
from resumable.logs import get_logger
from resumable.resume_plan import ResumePlan, reschedule

log = get_logger(__name__)
RUN_ID_FILE = "tracker_run_id"  # listed in resume_plan.RUN_FILES


def restore(accelerator, cfg: TrainConfig, plan: ResumePlan, layout: tuple[int, int, int], feed, scheduler,
            total_steps: int) -> tuple[Progress, str]:  # fmt: skip
    """Load `plan.resume` into the prepared objects (every process) and return the progress to continue from, with
    the line to print once the first batch is in hand ("" for a fresh start)."""
    world, bs, ga = layout
    progress, message = Progress(tracker_run_id=fresh_run_id(accelerator, cfg), world_size=world), ""
    resume_dir: Path | None = plan.resume
    if resume_dir is not None:
        progress = load_checkpoint(accelerator, resume_dir, cfg.seed)
        check_same_data(cfg, resume_dir, progress.data_fingerprint, feed.fingerprint)
        saved = (progress.world_size, progress.per_device_train_batch_size, progress.gradient_accumulation_steps)
        where = feed.resume(resume_dir, progress, saved, layout)  # the batch (or stream position) to go on from
        progress.replanned = progress.replanned or saved != layout
        if saved[0] * saved[1] * saved[2] != world * bs * ga:
            log.warning(f"global batch changed from {saved[0] * saved[1] * saved[2]} to {world * bs * ga}")
        message = f"Resuming from {resume_dir}: step {progress.step}, epoch {progress.epoch}, {where}"
    progress.world_size, progress.per_device_train_batch_size, progress.gradient_accumulation_steps = layout
    progress.branch, progress.data_fingerprint = plan.branch or progress.branch, feed.fingerprint
    if progress.total_steps not in (0, total_steps):  # every process moves its scheduler to the new schedule
        log.warning(reschedule(scheduler, cfg, progress.step, progress.total_steps, total_steps))
    progress.total_steps = total_steps
    if resume_dir is not None and (changed := set_peak_learning_rate(scheduler, cfg.learning_rate, progress.step)):
        log.warning(changed)
    return progress, message


def fresh_run_id(accelerator, cfg: TrainConfig) -> str:
    """The tracker run id of a run with no checkpoint yet, kept in `{output_dir}/tracker_run_id`: a run killed before
    its first checkpoint resumes the same W&B run instead of starting a second one. (A start-over moves the file
    aside with the rest of the run, so it gets a new id.)"""
    from accelerate.utils import broadcast_object_list

    from resumable.sweep_agent import agent_run

    path, run_id = Path(cfg.output_dir) / RUN_ID_FILE, [""]
    if accelerator.is_main_process:
        if not path.is_file():
            tmp = path.with_name(path.name + ".tmp")
            ids = agent_run()  # under `wandb agent`: the run id the agent gave this run
            tmp.write_text(ids[1] if ids else secrets.token_hex(4))
            tmp.replace(path)
        run_id[0] = path.read_text().strip()
    return broadcast_object_list(run_id)[0]  # other nodes may not see rank 0's output dir


def set_peak_learning_rate(scheduler, learning_rate: float, step: int) -> str:
    """`--learning_rate` differs from the checkpoint's (e.g. lowered after a divergence): the loaded scheduler holds
    the old peak, so the run would silently keep it. Move the schedule to the new peak at the same position.
    Returns the WARNING to print, or "" when nothing changed."""
    inner = getattr(scheduler, "scheduler", scheduler)  # accelerate's wrapper around the torch scheduler
    old = inner.base_lrs[0]
    if all(base == learning_rate for base in inner.base_lrs):
        return ""
    inner.base_lrs = [learning_rate] * len(inner.base_lrs)
    for group in inner.optimizer.param_groups:
        group["initial_lr"] = learning_rate
    inner.last_epoch -= 1
    inner.step()  # every group's rate at `step`, from the new peak
    return (
        f"--learning_rate {learning_rate:g} differs from the checkpoint's {old:g}: the LR schedule continues from "
        f"step {step} with the new peak, at lr {inner.get_last_lr()[0]:.3g}"
    )
