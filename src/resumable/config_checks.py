"""The checks a `TrainConfig` passes at parse time: every error is one line naming the flag (and its value)."""

from __future__ import annotations

import math
import re
from dataclasses import fields
from pathlib import Path
from typing import Any

from resumable.errors import UserError

DATA_SUFFIXES = (".txt", ".csv", ".json", ".jsonl")
TASK_METRICS = {
    "causal_lm": ("eval/loss", "eval/perplexity"),
    "sequence_classification": ("eval/loss", "eval/accuracy", "eval/precision", "eval/recall", "eval/f1"),
    "seq2seq": ("eval/loss", "eval/rougeL", "eval/bleu"),
}


def check_config(cfg) -> None:
    """Raise `UserError` for the first bad flag or combination."""
    require(cfg.output_dir, "--output_dir is required")
    from resumable.sweep_agent import run_output_dir  # late: it imports logging

    cfg.output_dir = run_output_dir(cfg.output_dir)  # under `wandb agent`: this run's own dir
    out = Path(cfg.output_dir)
    require(not out.exists() or out.is_dir(), f"--output_dir {out} exists and is not a directory")
    for name in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps"):
        require(getattr(cfg, name) >= 1, f"--{name} must be >= 1, got {getattr(cfg, name)}")
    for name in (
        "checkpointing_steps",
        "eval_steps",
        "max_steps_per_run",
        "warmup_steps",
        "dataloader_num_workers",
        "keep_epoch_every",
        "keep_best",
        "max_nan_skips",
    ):
        require(getattr(cfg, name) >= 0, f"--{name} must be >= 0, got {getattr(cfg, name)}")
    for f in fields(cfg):  # inf and nan parse as floats; no float flag can mean them
        value = getattr(cfg, f.name)
        require(not isinstance(value, float) or math.isfinite(value), f"--{f.name} must be finite, got {value}")
    for name in ("adam_beta1", "adam_beta2"):
        require(0 <= getattr(cfg, name) < 1, f"--{name} must be in [0, 1), got {getattr(cfg, name)}")
    # epsilon 0 turns the Adam update of a never-seen embedding row into 0/0 = NaN
    require(cfg.adam_epsilon > 0, f"--adam_epsilon must be > 0, got {cfg.adam_epsilon}")
    for name in ("learning_rate", "adam_epsilon", "weight_decay", "max_grad_norm"):  # the optimizer's float32
        require(getattr(cfg, name) < 3e38, f"--{name} must be below 3e38 (float32), got {getattr(cfg, name)}")
    require(cfg.learning_rate > 0, f"--learning_rate must be > 0, got {cfg.learning_rate}")
    require(cfg.weight_decay >= 0, f"--weight_decay must be >= 0, got {cfg.weight_decay}")
    require(cfg.max_grad_norm >= 0, f"--max_grad_norm must be >= 0, got {cfg.max_grad_norm}")
    require(cfg.logging_steps >= 1, f"--logging_steps must be >= 1, got {cfg.logging_steps}")
    require(cfg.ddp_timeout >= 1, f"--ddp_timeout must be >= 1 (seconds), got {cfg.ddp_timeout}")
    require(cfg.max_steps > 0 or cfg.num_train_epochs > 0, "--num_train_epochs must be > 0 unless --max_steps is set")
    require(cfg.block_size >= 2, f"--block_size must be >= 2, got {cfg.block_size}")
    require(cfg.max_seq_length >= 2, f"--max_seq_length must be >= 2, got {cfg.max_seq_length}")
    for name in ("max_source_length", "max_target_length", "generation_max_length", "eval_generate_samples"):
        require(getattr(cfg, name) >= 1, f"--{name} must be >= 1, got {getattr(cfg, name)}")
    require(cfg.vocab_size >= 300, f"--vocab_size must be >= 300 (256 bytes + merges), got {cfg.vocab_size}")
    require(cfg.num_labels >= 2, f"--num_labels must be >= 2, got {cfg.num_labels}")
    require(0 < cfg.validation_split_percentage < 100, "--validation_split_percentage must be in 1..99")
    if cfg.save_total_limit is not None:
        require(cfg.save_total_limit >= 1, f"--save_total_limit must be >= 1, got {cfg.save_total_limit}")
    require(
        not (cfg.model_name_or_path and cfg.model_type),
        "--model_name_or_path and --model_type are exclusive (a pretrained model has its own type)",
    )
    require(
        not (cfg.dataset_name and (cfg.train_file or cfg.validation_file)),
        "--dataset_name and --train_file/--validation_file are exclusive",
    )
    require(not (cfg.validation_file and not cfg.train_file), "--validation_file needs --train_file")
    if cfg.streaming:
        from resumable.stream import check_stream_flags

        check_stream_flags(cfg)
    for name in ("train_file", "validation_file"):
        if getattr(cfg, name) and not (cfg.streaming and name == "train_file"):
            check_data_file(name, Path(getattr(cfg, name)))
    allowed = TASK_METRICS[cfg.task]
    if average := _check_averaging(cfg):
        allowed += tuple(m.replace("eval/", f"eval_{average}/") for m in allowed)
    if cfg.metric_for_best_model is None:
        cfg.metric_for_best_model = "eval/loss"
    require(
        cfg.metric_for_best_model in allowed,
        f"--metric_for_best_model {cfg.metric_for_best_model!r} is not a {cfg.task} metric; choose from {', '.join(allowed)}",
    )
    if cfg.greater_is_better is None:
        cfg.greater_is_better = not cfg.metric_for_best_model.endswith(("loss", "perplexity"))
    if cfg.max_run_time is not None:
        parse_duration(cfg.max_run_time)
    from resumable.preemption import parse_signals  # late: preemption imports nothing from here

    parse_signals(cfg.stop_signals)
    from resumable.trackers import choose_trackers

    choose_trackers(cfg.report_to)  # an explicit tracker that is not installed fails here, not after start-up


def _check_averaging(cfg) -> str:
    """--ema_decay / --swa_start_epoch / --swa_lr; returns the average's name ("ema", "swa" or "")."""
    require(0 <= cfg.ema_decay < 1, f"--ema_decay must be in [0, 1), got {cfg.ema_decay}")
    swa = cfg.swa_start_epoch
    require(cfg.swa_lr is None or swa is not None, "--swa_lr needs --swa_start_epoch (the epoch SWA starts at)")
    if swa is None:
        return "ema" if cfg.ema_decay else ""
    require(not cfg.ema_decay, "--ema_decay and --swa_start_epoch: choose one weight average")
    require(swa >= 0, f"--swa_start_epoch must be >= 0 (epochs count from 0), got {swa}")
    require(cfg.swa_lr is None or cfg.swa_lr > 0, f"--swa_lr must be > 0, got {cfg.swa_lr}")
    require(not (cfg.swa_lr and cfg.streaming), "--swa_lr needs epochs of a known length; a --streaming epoch's "
            "is unknown until it ends (average with --swa_start_epoch alone)")  # fmt: skip
    return "swa"  # whether an epoch from `swa` on ever ends is checked at start-up (averaging.py)


def require(ok: Any, message: str) -> None:
    if not ok:
        raise UserError(message)


def check_data_file(flag: str, path: Path) -> None:
    require(path.suffix in DATA_SUFFIXES, f"--{flag} {path}: unsupported extension (use {', '.join(DATA_SUFFIXES)})")
    require(path.is_file(), f"--{flag} {path}: file not found")
    require(path.stat().st_size > 0, f"--{flag} {path}: file is empty")


_DURATION = re.compile(r"^(?:(\d+)d)?(?:(\d+)h)?(?:(\d+)m)?(?:(\d+(?:\.\d+)?)s?)?$")


def parse_duration(text: str) -> float:
    """'3h50m', '90m', '1d2h', '7200' or '7200s' -> seconds."""
    m = _DURATION.match(text.strip())
    if not text.strip() or not m or not any(m.groups()):
        raise UserError(f"--max_run_time {text!r}: expected a duration like 3h50m, 45m, 90s or 7200")
    d, h, mi, s = (float(g) if g else 0.0 for g in m.groups())
    seconds = d * 86400 + h * 3600 + mi * 60 + s
    require(seconds > 0, f"--max_run_time {text!r} must be positive")
    return seconds
