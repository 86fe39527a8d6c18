"""The end of a run: the final model in `save_pretrained` form, final metrics, the loss curve, the completion marker."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from resumable.checkpoint import Progress
from resumable.metrics import TrainLog, plot_loss_curve
from resumable.preemption import EXIT_FINISHED, write_run_status

COMPLETE = "COMPLETE"


def save_pretrained_atomically(model, tokenizer, target: Path, state_dict: dict | None = None) -> None:
    """`save_pretrained` into a temporary folder, then swap it in: a kill never leaves a half-written model.
    `state_dict`: the weights to write when `model` holds only shards (ZeRO-3, FSDP)."""
    tmp, old = target.with_name(f".tmp-{target.name}"), target.with_name(f".old-{target.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True, state_dict=state_dict)
    if tokenizer is not None:
        fit_model_max_length(tokenizer, model.config)
        tokenizer.save_pretrained(tmp)
    if target.exists():
        os.replace(target, old)
    os.replace(tmp, target)
    shutil.rmtree(old, ignore_errors=True)


def fit_model_max_length(tokenizer, config) -> None:
    """Cap the tokenizer's `model_max_length` at what the model accepts, so `truncation=True` (pipelines) works.

    A tokenizer trained here, and many on the hub, say 1e30 ("no limit"): `pipeline(..., truncation=True)` then
    keeps a 5,000-word input whole and the model fails on its 128 positions. Lowered only, never raised.
    """
    from resumable.modeling import model_positions  # late: this module is imported before the heavy libraries

    limit = model_positions(config)
    if limit is not None and (tokenizer.model_max_length or float("inf")) > limit:
        tokenizer.model_max_length = limit


def finish_run(
    out: Path, model, weights: dict | None, tokenizer, progress: Progress, extra_metrics: dict, complete: dict
) -> dict:
    """Write final/, final_metrics.json, loss_curve.png, then COMPLETE last. Main process only. `weights`: the
    gathered state dict when the model is sharded (else None: the model's own)."""
    save_pretrained_atomically(model, tokenizer, out / "final", weights)
    metrics = {
        "step": progress.step,
        "epoch": progress.epoch,
        "samples_seen": progress.samples_seen,
        **progress.last_eval,
        **extra_metrics,
        "best_metric": progress.best_metric,
        "best_step": progress.best_step,
    }
    (out / "final_metrics.json").write_text(json.dumps(metrics, indent=1) + "\n")
    plot_loss_curve(TrainLog(out / "train_log.jsonl"), out / "loss_curve.png")
    (out / COMPLETE).write_text(json.dumps(complete) + "\n")  # what a later run checks: asked for more? same settings?
    write_run_status(out, "finished", EXIT_FINISHED, progress.step)
    return metrics
