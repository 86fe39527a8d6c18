"""Slurm pre-flight: does the signal lead (`#SBATCH --signal=B:USR1@120`) leave time for one step and one save?

The README's rule (section "Signal lead time"): lead >= 2 x (one optimizer step + one checkpoint save), a save
costing about 4 s per GB of checkpoint. The step and save times measured by an earlier run of the same output dir
are used when there are any.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import statistics
import subprocess
from pathlib import Path

from resumable.config import TrainConfig
from resumable.disk_space import Finding, human, local_output_dir

SAVE_SECONDS_PER_GB = 4.0  # ~3 s/GB to save + ~1 s/GB for fsync and checksums (benchmarks/checkpoint_io.py)
HASH_SECONDS_PER_GB = 0.5  # sha256 after the manifest's `created` stamp (benchmarks/checkpoint_io.py: 0.49 s/GB)


def _secs(x: float) -> str:
    return f"{x:.1f} s" if x >= 1 else f"{x:.2f} s"


def parse_signal_lead(text: str) -> int | None:
    """Seconds of `--signal=[B:]USR1@120` (sbatch option, #SBATCH line) or `Signal=USR1@120`; sbatch's default
    lead is 60 s when `@time` is left out."""
    option = r"(?:--signal[= ]|\bSignal=)\s*(?:[RB]{1,2}:)?(?:SIG)?[A-Za-z0-9]+(?:@(\d+))?"
    # a batch script's #SBATCH line wins over a --signal met elsewhere in it (an `scancel --signal` comment)
    m = re.search(r"^#SBATCH\s+" + option, text, re.MULTILINE) or re.search(option, text)
    if not m:
        return None
    return int(m.group(1)) if m.group(1) else 60


def slurm_signal_lead(job_id: str) -> tuple[int | None, str]:
    """The lead this job was submitted with, from `scontrol show job`, else its batch script's #SBATCH lines."""
    if not shutil.which("scontrol"):
        return None, "scontrol not found"
    for cmd in (["scontrol", "show", "job", job_id], ["scontrol", "write", "batch_script", job_id, "-"]):
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=15).stdout
        except (OSError, subprocess.SubprocessError):
            continue
        lead = parse_signal_lead(out)
        if lead is not None:
            return lead, " ".join(cmd[:3])
    return None, f"not in scontrol's view of job {job_id}"


def measured_costs(output_dir: Path) -> tuple[float | None, float | None]:
    """(median seconds per optimizer step, slowest seconds per save) measured by an earlier run of this output dir.

    train_log.jsonl stamps each step's record before its evaluation and save; a checkpoint's manifest is stamped
    (`created`) once its files are written and fsynced, just before hashing. So a save that no evaluation preceded
    took `created - time` plus the hashing; a `save_seconds` field in the manifest, when present, is used as is."""
    times, evaluated = {}, set()
    log_file = Path(output_dir) / "train_log.jsonl"
    lines = log_file.read_text().splitlines() if log_file.is_file() else []
    for line in lines:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by a kill
        if "train/loss" in record and "time" in record:
            times[record["step"]] = record["time"]
        elif any(key.startswith("eval/") for key in record):
            evaluated.add(record.get("step"))
    steps = sorted(times)
    gaps = [times[b] - times[a] for a, b in zip(steps, steps[1:]) if b == a + 1]
    saves = []
    for manifest_file in Path(output_dir).glob("checkpoints/step-*/manifest.json"):
        try:
            manifest = json.loads(manifest_file.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if "save_seconds" in manifest:
            saves.append(float(manifest["save_seconds"]))
        elif manifest.get("step") in times and manifest["step"] not in evaluated and "created" in manifest:
            size = sum(f.get("size", 0) for f in manifest.get("files", {}).values())
            saves.append(manifest["created"] - times[manifest["step"]] + HASH_SECONDS_PER_GB * size / 1e9)
    return (statistics.median(gaps) if gaps else None), (max(saves) if saves else None)


def shutdown_timeout(output_dir: Path | str, floor: int = 30, unmeasured: int = 120) -> int:
    """Seconds torchrun should give the training processes between its SIGTERM and its SIGKILL
    (TORCH_ELASTIC_SHUTDOWN_TIMEOUT, 30 by default whatever the checkpoint size): 2 x (one step + one save) as
    measured by earlier runs of this output dir, plus 10 s to exit; `unmeasured` before any was."""
    if "://" in str(output_dir):  # a remote run measures in its local staging folder (RESUMABLE_CACHE)
        from resumable.config import cache_root
        from resumable.object_store import staging_dir

        output_dir = staging_dir(str(output_dir), cache_root())
    step_s, save_s = measured_costs(Path(output_dir))
    if save_s is None:
        return unmeasured
    return max(floor, math.ceil(2 * ((step_s or 0.0) + save_s)) + 10)


def check_slurm(cfg: TrainConfig, lead_flag: int | None, checkpoint_bytes: int | None) -> list[Finding]:
    """Under Slurm (or with --slurm_signal_lead): lead >= 2 x (one step + one save), the README's rule of thumb.
    A lead shorter than one step plus one save is a blocker: the job is killed before its checkpoint commits."""
    job = os.environ.get("SLURM_JOB_ID")
    if lead_flag is None and not job:
        return []
    lead, source = (lead_flag, "--slurm_signal_lead") if lead_flag is not None else slurm_signal_lead(job)
    if lead is None:
        return [Finding("WARN", "slurm", f"job {job}: no --signal lead found ({source}); add "
                        "#SBATCH --signal=B:USR1@120, or the time limit kills the run without a checkpoint")]  # fmt: skip
    out, _ = local_output_dir(cfg)
    step_s, save_s = measured_costs(out)
    if save_s is not None:
        save_how = f"{_secs(save_s)} per save (measured in {out})"
    elif checkpoint_bytes is not None:
        save_s = SAVE_SECONDS_PER_GB * checkpoint_bytes / 1e9
        save_how = f"{_secs(save_s)} per save ({human(checkpoint_bytes)} at {SAVE_SECONDS_PER_GB:.0f} s/GB)"
    else:
        return [Finding("WARN", "slurm", f"signal lead {lead} s ({source}); save cost unknown (model size unknown)")]
    step_how = f"{_secs(step_s)} per step (measured)" if step_s is not None else "step time not measured yet (0 s)"
    need = 2 * ((step_s or 0.0) + save_s)
    upload = f"; uploads to {cfg.output_dir} not counted" if "://" in str(cfg.output_dir) else ""
    message = f"signal lead {lead} s ({source}) vs 2 x ({step_how} + {save_how}) = {need:.0f} s{upload}"
    level = "OK" if lead >= need else "WARN" if lead >= need / 2 else "FAIL"
    return [Finding(level, "slurm", message + ("" if level == "OK" else f": raise --signal to @{int(need) + 1}"))]


if __name__ == "__main__":  # python -m resumable.signal_lead --shutdown-timeout OUTPUT_DIR (Makefile, sbatch scripts)
    import sys

    if sys.argv[1:2] != ["--shutdown-timeout"] or len(sys.argv) != 3:
        sys.exit("usage: python -m resumable.signal_lead --shutdown-timeout OUTPUT_DIR")
    print(shutdown_timeout(sys.argv[2]))
