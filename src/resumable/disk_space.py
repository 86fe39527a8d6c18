"""Will the run's checkpoints fit? The output dir writable, and free space for (kept + 1) checkpoints of this model.

The size is estimated without building weights: the model is built on the `meta` device (shapes only) and each
parameter costs 12 bytes in a checkpoint (4 for the fp32 weight in model.safetensors, 8 for AdamW's two moments in
optimizer.bin; mixed precision keeps fp32 master weights, so it changes nothing), plus a little per tensor and per
file. `scripts/train.py` runs `require_disk(cfg)` at start; `scripts/preflight.py` prints `check_disk(cfg)`.
"""

from __future__ import annotations

import math
import shutil
from dataclasses import dataclass
from pathlib import Path

from resumable.config import TrainConfig, cache_root
from resumable.disk import check_output_dir_writable
from resumable.errors import EnvironmentFailure, UserError
from resumable.logs import get_logger

log = get_logger(__name__)
BYTES_PER_PARAMETER = 4 + 8  # fp32 weight + AdamW exp_avg and exp_avg_sq
EXTRA_BYTES = 24 * 1024  # RNG states, scheduler, progress.json, manifest.json (measured ~20 KB on the tiny model)
EXTRA_BYTES_PER_TENSOR = 1024  # optimizer.bin's per-tensor records and step counters, the safetensors header


@dataclass(frozen=True)
class Finding:
    """One line of the pre-flight report. WARN never blocks a run; FAIL does."""

    level: str  # "OK", "WARN" or "FAIL"
    check: str
    message: str

    def __str__(self) -> str:
        return f"{self.level:<4}  {self.check}: {self.message}"


def human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"  # pragma: no cover - the loop always returns


class _VocabOnly:
    """What `build_model_config` reads from a tokenizer, for a tokenizer that is not built yet: the trained BPE
    has `--vocab_size` tokens, with its special tokens first (EOS 0, PAD 1; see data.py)."""

    bos_token_id = eos_token_id = 0
    pad_token_id = 1

    def __init__(self, size: int) -> None:
        self.size = size

    def __len__(self) -> int:
        return self.size


def model_config(cfg: TrainConfig, local_files_only: bool = True):
    """The model config a run would build, without its tokenizer; None if a pretrained one is not available here."""
    from resumable.modeling import build_model_config

    if not cfg.model_name_or_path:
        return build_model_config(cfg, _VocabOnly(cfg.vocab_size))
    from transformers import AutoConfig

    extra = {"num_labels": cfg.num_labels} if cfg.task == "sequence_classification" else {}
    try:
        config = AutoConfig.from_pretrained(cfg.model_name_or_path, local_files_only=local_files_only, **extra)
    except (OSError, ValueError):  # not cached (offline) or not a model: the model check says which
        return None
    if cfg.config_overrides:
        config.update_from_string(cfg.config_overrides)
    return config


def count_parameters(cfg: TrainConfig) -> tuple[int, int] | None:
    """(parameters, parameter tensors) of the model the run trains, built on the meta device: no memory, no
    weights read. None when a pretrained model's config is not available offline."""
    import torch

    from resumable.modeling import AUTO_MODEL

    config = model_config(cfg)
    if config is None:
        return None
    with torch.device("meta"):
        model = AUTO_MODEL[cfg.task].from_config(config)
    params = list(model.parameters())  # tied weights (GPT-2's lm_head) appear once, as safetensors stores them
    return sum(p.numel() for p in params), len(params)


def estimate_checkpoint_bytes(cfg: TrainConfig, num_parameters: int | None = None, num_tensors: int = 0) -> int | None:
    """Bytes one checkpoint of this run takes: parameters x 12 + small extras. Pass `num_parameters` when the
    model is already built (then nothing is built here). None if the model's size cannot be known offline."""
    if num_parameters is None:
        counted = count_parameters(cfg)
        if counted is None:
            return None
        num_parameters, num_tensors = counted
    return num_parameters * BYTES_PER_PARAMETER + EXTRA_BYTES + EXTRA_BYTES_PER_TENSOR * num_tensors


def planned_saves(cfg: TrainConfig) -> int | None:
    """How many checkpoints a run with no rolling limit ends up keeping, when that is cheap to know (a fixed
    --max_steps): one per --checkpointing_steps, one per evaluation (a new best is saved), and the end.
    An upper bound; None when the length depends on the data (epochs)."""
    if cfg.max_steps <= 0:
        return None
    n, every = cfg.max_steps, [e for e in (cfg.checkpointing_steps, cfg.eval_steps if cfg.keep_best else 0) if e]
    # multiples of either period up to n (counted, not listed: --max_steps may be huge), plus the end
    count = sum(n // e for e in every) - (n // math.lcm(*every) if len(every) == 2 else 0)
    return count + (not any(n % e == 0 for e in every))


def kept_checkpoints(cfg: TrainConfig) -> tuple[int | None, str]:
    """(the most checkpoints retention keeps at once, how that number was reached); None if unbounded/unknown.

    Pools can overlap, so their sum is an upper bound (see retention.py): rolling (--save_total_limit), best
    (--keep_best, possibly outside the rolling window), epoch (every --keep_epoch_every-th epoch end)."""
    if cfg.save_total_limit is None:
        saves = planned_saves(cfg)
        if saves is None:
            return None, "no --save_total_limit: every checkpoint is kept (unbounded)"
        return saves, f"no --save_total_limit: all {saves} checkpoints of {cfg.max_steps} steps"
    parts = [f"{cfg.save_total_limit} rolling"]
    kept = cfg.save_total_limit
    if cfg.keep_best:
        kept += cfg.keep_best
        parts.append(f"{cfg.keep_best} best")
    if cfg.keep_epoch_every:
        if cfg.max_steps > 0:
            return None, f"--keep_epoch_every {cfg.keep_epoch_every} with --max_steps: epoch count unknown"
        epochs = math.floor(cfg.num_train_epochs / cfg.keep_epoch_every)
        kept += epochs
        parts.append(f"{epochs} epoch")
    return kept, " + ".join(parts)


def local_output_dir(cfg: TrainConfig) -> tuple[Path, str]:
    """Where checkpoints are written on this machine: the output dir, or a remote run's staging folder."""
    from resumable.object_store import is_remote, staging_dir

    if is_remote(cfg.output_dir):
        return staging_dir(cfg.output_dir, cache_root(cfg)), f" (staging folder of {cfg.output_dir})"
    return Path(cfg.output_dir), ""


def check_writable(path: Path) -> Finding:
    """`disk.check_output_dir_writable` as a report line: a real file is written and removed (root ignores
    permission bits, so `os.access` would say yes to a read-only mount); a missing folder is probed in its parent."""
    path = Path(path)
    try:
        check_output_dir_writable(path)
    except UserError as err:  # EnvironmentFailure too: a read-only mount, missing permissions, a full disk
        return Finding("FAIL", "output dir", str(err).removeprefix("--output_dir "))
    return Finding("OK", "output dir", f"{path}: writable" + ("" if path.exists() else " (it will be created)"))


def existing_checkpoint_bytes(checkpoints_dir: Path) -> int:
    """Bytes already on disk in committed checkpoints: a resumed run needs room only for the rest."""
    total = 0
    for folder in Path(checkpoints_dir).glob("step-*"):
        total += sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
    return total


def check_disk(cfg: TrainConfig, checkpoint_bytes: int | None = None) -> list[Finding]:
    """The output dir is writable and has room for (kept checkpoints + 1 being written) x one checkpoint."""
    out, where = local_output_dir(cfg)
    writable = check_writable(out)
    if writable.level == "FAIL":
        return [writable]
    findings = [Finding(writable.level, writable.check, writable.message + where)]
    size = checkpoint_bytes
    if size is None:
        try:
            size = estimate_checkpoint_bytes(cfg)
        except UserError:  # an unknown --model_type or bad --config_overrides: reported by the model check
            size = None
    existing = next(p for p in (out, *out.parents) if p.exists())
    free = shutil.disk_usage(existing).free
    if size is None:
        findings.append(Finding("WARN", "disk", f"{human(free)} free; checkpoint size unknown (model not available)"))
        return findings
    kept, how = kept_checkpoints(cfg)
    if kept is None:
        findings.append(
            Finding("WARN", "disk", f"{human(free)} free, {human(size)} per checkpoint; {how}: set --save_total_limit")
        )
        return findings
    on_disk = existing_checkpoint_bytes(out / "checkpoints")
    needed = max(size, (kept + 1) * size - on_disk)
    detail = f"({how} kept + 1 being written) x {human(size)}" + (
        f" - {human(on_disk)} already saved" if on_disk else ""
    )
    if free < needed:
        message = f"{human(free)} free < {human(needed)} needed = {detail}; free space or lower --save_total_limit"
        findings.append(Finding("FAIL", "disk", message))
    else:
        findings.append(Finding("OK", "disk", f"{human(free)} free >= {human(needed)} needed = {detail}"))
    return findings


def require_disk(cfg: TrainConfig, num_parameters: int | None = None, num_tensors: int = 0) -> None:
    """For `scripts/train.py` at start (main process): raise `EnvironmentFailure` (exit 74) when the output dir is
    not writable or cannot hold even one checkpoint (an unknown or unbounded need is an INFO line). Too little room for every kept checkpoint is a WARNING: the
    run can still make progress, and a save that finds the disk full stops cleanly (exit 74, nothing lost)."""
    size = None if num_parameters is None else estimate_checkpoint_bytes(cfg, num_parameters, num_tensors)
    for finding in check_disk(cfg, size):
        if finding.level == "FAIL" and finding.check == "disk" and size is not None:
            out, _ = local_output_dir(cfg)
            free = shutil.disk_usage(next(p for p in (out, *out.parents) if p.exists())).free
            if free >= size:
                log.warning("disk: %s; the run will stop (exit 74) when the disk fills", finding.message)
                continue
        if finding.level == "FAIL":
            raise EnvironmentFailure(f"{finding.check}: {finding.message}")
        if finding.level == "WARN":  # unknown or unbounded, not short: preflight flags it, training just says it
            log.info("%s: %s", finding.check, finding.message)
