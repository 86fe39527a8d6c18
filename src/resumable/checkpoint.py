"""The checkpoint store: atomic commits, checksummed manifests, discovery of the newest valid checkpoint.

Layout: `{output_dir}/checkpoints/step-00000100/` holds what `accelerator.save_state` writes (model.safetensors,
optimizer.bin, scheduler.bin, random_states_{rank}.pkl, ...), our `progress.json`, and `manifest.json`, written
last. A folder counts only if its manifest exists and every file it lists has the recorded size and sha256.
Commit: every rank writes into `.tmp-step-.../`; after a barrier the main process fsyncs the files, writes the
manifest and renames the folder into place. No symlinks (Drive, NFS and Lustre handle them badly).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator

from resumable.errors import UserError
from resumable.preemption import inject_fault

log = logging.getLogger("resumable")
MANIFEST, PROGRESS = "manifest.json", "progress.json"
FORMAT = 1


@dataclass
class Progress:
    """Everything the loop counts, saved as JSON next to accelerate's state."""

    step: int = 0  # optimizer updates done
    epoch: int = 0  # epoch the next micro-batch belongs to
    batches_in_epoch: int = 0  # micro-batches each process has consumed in `epoch`
    samples_in_epoch: int = 0  # examples consumed in `epoch`, all processes together (elastic resume)
    samples_seen: int = 0  # training examples consumed, all processes together
    best_metric: float | None = None
    best_step: int | None = None
    last_eval: dict = field(default_factory=dict)
    last_eval_step: int | None = None
    eval_pending: bool = False  # an evaluation at `step` was interrupted; run it first on resume
    tracker_run_id: str = ""
    world_size: int = 1
    per_device_train_batch_size: int = 0
    gradient_accumulation_steps: int = 0
    branch: dict | None = None  # how this line of checkpoints began (resume_plan.py): a branch or a start-over
    data_fingerprint: dict | None = None  # the training data this position is a position in (data.py)
    total_steps: int = 0  # the step the run was planned to end at when saved: the LR schedule's length
    replanned: bool = False  # the layout changed at some resume: the total counts steps done + steps left


def step_name(step: int) -> str:
    return f"step-{step:08d}"


def _sha256(path: Path) -> str:
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _hash_files(folder: Path) -> dict[str, dict]:
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.name != MANIFEST)
    with ThreadPoolExecutor(max_workers=4) as pool:  # hashlib releases the GIL
        digests = list(pool.map(_sha256, files))
    return {p.name: {"size": p.stat().st_size, "sha256": d} for p, d in zip(files, digests)}


def manifest_digest(manifest: dict) -> str:
    body = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def _write_json(path: Path, obj: dict) -> None:
    with open(path, "w") as fh:
        json.dump(obj, fh, indent=1, sort_keys=True)
        fh.flush()
        os.fsync(fh.fileno())


def save_checkpoint(
    accelerator: Accelerator, checkpoints_dir: Path, progress: Progress, extra: dict | None = None
) -> Path:
    """Commit the full training state at `progress.step`; every process must call this. Returns the folder."""
    final = checkpoints_dir / step_name(progress.step)
    tmp = checkpoints_dir / f".tmp-{final.name}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)  # left by a crash mid-save
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        _write_json(tmp / PROGRESS, asdict(progress))
        fields = {
            "epoch": progress.epoch,
            "epochs_done": progress.epoch if progress.batches_in_epoch == 0 and progress.step else None,
            "samples_seen": progress.samples_seen,
            "world_size": accelerator.num_processes,
            "per_device_train_batch_size": progress.per_device_train_batch_size,
            "gradient_accumulation_steps": progress.gradient_accumulation_steps,
            "metrics": progress.last_eval,
            "metrics_step": progress.last_eval_step,
            "versions": {"torch": torch.__version__, **_lib_versions()},
            **(extra or {}),
        }
        if "settings" in fields:  # one value to compare, beside the readable dict the error message lists
            fields["settings_sha256"] = hashlib.sha256(
                json.dumps(fields["settings"], sort_keys=True).encode()
            ).hexdigest()
        commit_checkpoint(tmp, final, progress.step, fields)
    accelerator.wait_for_everyone()
    return final


def commit_checkpoint(tmp: Path, final: Path, step: int, fields: dict) -> None:
    """Make the files in `tmp` checkpoint `final`: fsync, manifest (sizes, sha256) written last, atomic rename."""
    fsync_files(tmp)  # other ranks' files too: one fsync pass on the node that commits
    inject_fault("kill_before_manifest", step)
    inject_fault("sigterm_during_save", step)
    manifest = {"format": FORMAT, "step": step, "created": time.time(), **fields, "files": _hash_files(tmp)}
    manifest["manifest_sha256"] = manifest_digest(manifest)
    _write_json(tmp / MANIFEST, manifest)
    _fsync_dir(tmp)
    swap_in(tmp, final)


def amend_checkpoint(folder: Path, progress: Progress) -> None:
    """Record new progress in a committed checkpoint, e.g. the result of an evaluation re-run after a resume.

    The state files are hard-linked (copied where the filesystem has no links) into a temporary folder beside a new
    progress.json; the manifest keeps their verified sizes and hashes, and the folder is swapped in as at a commit.
    Main process only. The training state itself is unchanged: evaluation draws no randomness.
    """
    manifest = read_manifest(folder)
    tmp = folder.with_name(f".tmp-{folder.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    for name in manifest["files"]:
        if name != PROGRESS:
            try:
                os.link(folder / name, tmp / name)
            except OSError:
                shutil.copy2(folder / name, tmp / name)
    _write_json(tmp / PROGRESS, asdict(progress))
    progress_file = {"size": (tmp / PROGRESS).stat().st_size, "sha256": _sha256(tmp / PROGRESS)}
    files = {**manifest["files"], PROGRESS: progress_file}
    fields = {k: v for k, v in manifest.items() if k not in ("files", "manifest_sha256", "created")}
    fields.update(metrics=progress.last_eval, metrics_step=progress.last_eval_step, amended=time.time())
    new = {**fields, "created": manifest.get("created"), "files": files}
    new["manifest_sha256"] = manifest_digest(new)
    _write_json(tmp / MANIFEST, new)
    _fsync_dir(tmp)
    swap_in(tmp, folder)


def fsync_files(folder: Path) -> None:
    for p in folder.iterdir():
        with open(p, "rb") as fh:
            os.fsync(fh.fileno())


def swap_in(tmp: Path, final: Path) -> None:
    """Rename `tmp` to `final`, replacing an existing `final` without a moment with no copy; fsync the parent."""
    if final.exists():
        trash = final.with_name(f".trash-{final.name}")
        shutil.rmtree(trash, ignore_errors=True)
        os.replace(final, trash)
        os.replace(tmp, final)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(tmp, final)
    _fsync_dir(final.parent)


def _lib_versions() -> dict[str, str]:
    import accelerate
    import transformers

    return {"transformers": transformers.__version__, "accelerate": accelerate.__version__}


# --- discovery and verification


def read_manifest(folder: Path) -> dict:
    return json.loads((folder / MANIFEST).read_text())


def verify_checkpoint(folder: Path, deep: bool = True) -> str | None:
    """None if `folder` is a complete, intact checkpoint; else the reason it is not (naming the file)."""
    try:
        manifest = read_manifest(folder)
    except FileNotFoundError:
        return f"{MANIFEST} missing (incomplete save)"
    except (OSError, ValueError) as err:
        return f"{MANIFEST} unreadable ({err})"
    if not isinstance(manifest, dict) or manifest.get("manifest_sha256") != manifest_digest(manifest):
        return f"{MANIFEST} checksum mismatch (corrupted)"
    files = manifest.get("files", {})
    if PROGRESS not in files:
        return f"{MANIFEST} lists no {PROGRESS}"
    for name, meta in files.items():
        if "/" in name or "\\" in name or name in ("", ".", ".."):
            return f"{MANIFEST} names a path outside its folder: {name!r}"
        path = folder / name
        if not path.is_file():
            return f"{name} missing"
        if path.stat().st_size != meta["size"]:
            return f"{name} has {path.stat().st_size} bytes, manifest says {meta['size']}"
        if deep and _sha256(path) != meta["sha256"]:
            return f"{name} sha256 mismatch (corrupted)"
    return None


def list_checkpoints(checkpoints_dir: Path) -> list[Path]:
    """Committed-looking checkpoint folders, oldest first (temporary folders excluded)."""
    if not checkpoints_dir.is_dir():
        return []
    return sorted(p for p in checkpoints_dir.iterdir() if p.is_dir() and p.name.startswith("step-"))


def find_latest_checkpoint(checkpoints_dir: Path, deep: bool = True) -> Path | None:
    """The newest checkpoint that verifies; WARNING for each newer one skipped. Raise if none of several is valid."""
    candidates = list_checkpoints(checkpoints_dir)
    for folder in reversed(candidates):
        reason = verify_checkpoint(folder, deep=deep)
        if reason is None:
            return folder
        log.warning("skipping checkpoint %s: %s", folder, reason)
    if candidates:
        raise UserError(
            f"{checkpoints_dir}: {len(candidates)} checkpoint(s) but none is valid; "
            "pass --resume_from_checkpoint none to start over (nothing will be deleted)"
        )
    return None


def read_progress(folder: Path) -> Progress:
    data = json.loads((folder / PROGRESS).read_text())
    known = Progress.__dataclass_fields__
    return Progress(**{k: v for k, v in data.items() if k in known})


# --- loading


def check_settings(folder: Path, settings: dict) -> None:
    """Refuse to resume a checkpoint trained with a different model, task or data: list every mismatch."""
    saved = read_manifest(folder).get("settings")
    if saved is None:
        return
    diff = [
        f"{k} (checkpoint: {saved.get(k)!r}, now: {settings.get(k)!r})"
        for k in sorted(saved.keys() | settings.keys())
        if saved.get(k) != settings.get(k)
    ]
    if diff:
        raise UserError(
            f"{folder} was trained with different settings: {'; '.join(diff)}; use another --output_dir or --resume_from_checkpoint none"
        )


def load_checkpoint(accelerator: Accelerator, folder: Path, seed: int) -> Progress:
    """Restore model, optimizer, scheduler, scaler and this process's RNG from `folder`; return its progress.

    Elastic: a checkpoint from another number of processes loads too (model and optimizer state are the same on
    every DDP rank). A rank with no saved RNG gets a seed derived from (seed, step, rank), logged.
    """
    progress = read_progress(folder)
    rank = accelerator.process_index
    try:  # accelerate loads with weights_only=True: a planted pickle payload is refused, not executed
        accelerator.load_state(str(folder))
    except Exception as err:
        raise UserError(f"{folder}: could not load the training state ({str(err).splitlines()[0][:300]})") from None
    rng_file = folder / f"random_states_{rank}.pkl"
    if rng_file.is_file():
        # accelerate only logs (at INFO) when RNG restore fails: a silent source of non-exact resumes. Check it.
        from accelerate.utils import load

        try:
            saved = load(rng_file)  # weights_only=True with numpy globals allow-listed
        except Exception as err:
            raise UserError(
                f"{rng_file}: could not load the training state ({str(err).splitlines()[0][:300]})"
            ) from None
        if not torch.equal(saved["torch_manual_seed"], torch.get_rng_state()):
            raise RuntimeError(f"{rng_file}: random state was not restored")
    else:
        from accelerate.utils import set_seed

        derived = (seed * 1_000_003 + progress.step * 7919 + rank) % 2**32
        set_seed(derived)
        log.warning(
            "%s has no RNG state for process %d (saved by %d); seeded it with %d",
            folder,
            rank,
            progress.world_size,
            derived,
        )
    return progress
