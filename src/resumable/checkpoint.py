"""The checkpoint store: saving and loading the training state, discovery of the newest valid checkpoint.

Layout: `{output_dir}/checkpoints/step-00000100/` holds what `accelerator.save_state` writes (model.safetensors,
optimizer.bin, scheduler.bin, random_states_{rank}.pkl, ...), our `progress.json`, and `manifest.json`, written
last (resumable/manifest.py: format version, sizes and sha256, verification). Commit: every rank writes into
`.tmp-step-.../`; after a barrier the main process fsyncs the files, writes the manifest and renames the folder
into place. No symlinks (Drive, NFS and Lustre handle them badly). A full disk during a save removes the
temporary folder and stops the run with one line (EnvironmentFailure); the previous checkpoints are untouched.
"""

from __future__ import annotations

import gc
import hashlib
import json
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator

from resumable.backend import check_layout, layout, refuse_unsafe_pickles
from resumable.disk import disk_full_failure, folder_bytes, is_disk_full
from resumable.errors import UserError
from resumable.logs import get_logger
from resumable.manifest import (  # noqa: F401 (re-exported: the store's public names stay importable from here)
    FORMAT,
    MANIFEST,
    PROGRESS,
    _hash_files,
    _sha256,
    _write_json,
    amend_checkpoint,
    bad_file_name,
    commit_checkpoint,
    format_problem,
    fsync_files,
    manifest_digest,
    newer_format,
    read_manifest,
    swap_in,
    verify_checkpoint,
)
from resumable.preemption import inject_delay
from resumable.random_state import unrestored_generators
from resumable.ranks import collect_rank_files, discard_separate, drop_owner, prepare_separate, ranks

log = get_logger(__name__)


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
    skipped_steps: int = 0  # updates skipped for a non-finite loss or gradient norm (--nan_policy skip_step)
    nonfinite_in_a_row: int = 0  # of those, how many in a row up to `step`


def step_name(step: int) -> str:
    return f"step-{step:08d}"


@dataclass
class TensorFile:
    """A safetensors file of a checkpoint (rank 0's weight average): written as is by a synchronous save; with
    --async_save its tensors are copied to CPU at the step and written in the background with the weights."""

    tensors: dict[str, torch.Tensor]
    metadata: dict[str, str]

    def __call__(self, path: Path) -> None:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in self.tensors.items()}, str(path), self.metadata)


def save_checkpoint(
    accelerator: Accelerator, checkpoints_dir: Path, progress: Progress, extra: dict | None = None,
    rank_files: dict | None = None,
) -> Path:  # fmt: skip
    """Commit the full training state at `progress.step`; every process must call this. Returns the folder.

    `rank_files`: this process's own files (a stream position, rank 0's weight average), committed beside
    accelerate's RNG files: {name: dict (written as JSON), TensorFile, or a function that writes the file at the path given}.

    A full disk removes the temporary folder and raises EnvironmentFailure (exit 74) naming the checkpoint that
    is still intact; nothing committed before is touched.
    """
    final = checkpoints_dir / step_name(progress.step)
    tmp = checkpoints_dir / f".tmp-{final.name}"
    started, team = time.perf_counter(), ranks(accelerator)  # rank 0 writes the model and hashes alone: patient waits
    try:
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)  # left by a crash mid-save
            tmp.mkdir(parents=True)
        team.wait()
        prepare_separate(team, tmp)  # another node's staging folder starts empty too
        accelerator.save_state(str(tmp))
        for name, content in (rank_files or {}).items():  # a dict is JSON; else a function writing the file
            _write_json(tmp / name, content) if isinstance(content, dict) else content(tmp / name)
        team.wait()
        separate = collect_rank_files(team, tmp)  # another node's staging folder: its files go to rank 0
        if accelerator.is_main_process:
            drop_owner(tmp)
            inject_delay("rank0_commit")
            _write_json(tmp / PROGRESS, asdict(progress))
            commit_checkpoint(tmp, final, progress.step, _manifest_fields(accelerator, progress, extra))
    except Exception as err:
        if not is_disk_full(err):
            raise
        full = True
    else:
        full = False
    if full:  # outside the except block: the failed writer's open file (which holds its blocks) can be collected
        gc.collect()
        raise _disk_full(checkpoints_dir, tmp, final)
    team.wait()
    discard_separate(tmp, separate)
    log.debug(f"saved checkpoint {final.name} in {time.perf_counter() - started:.3f} s")  # benchmarks read this
    return final


def _manifest_fields(accelerator: Accelerator, progress: Progress, extra: dict | None) -> dict:
    fields = {
        "epoch": progress.epoch,
        "epochs_done": progress.epoch if progress.batches_in_epoch == 0 and progress.step else None,
        "samples_seen": progress.samples_seen,
        "world_size": accelerator.num_processes,
        "layout": layout(accelerator),  # ddp (one full copy) or per-rank shards (backend.py)
        "per_device_train_batch_size": progress.per_device_train_batch_size,
        "gradient_accumulation_steps": progress.gradient_accumulation_steps,
        "metrics": progress.last_eval,
        "metrics_step": progress.last_eval_step,
        "versions": {"torch": torch.__version__, **_lib_versions()},
        **(extra or {}),
    }
    if "settings" in fields:  # one value to compare, beside the readable dict the error message lists
        fields["settings_sha256"] = hashlib.sha256(json.dumps(fields["settings"], sort_keys=True).encode()).hexdigest()
    return fields


def _disk_full(checkpoints_dir: Path, tmp: Path, final: Path):
    """Clean up after a save the disk could not hold; the error to raise says what is safe and what it needs."""
    written = folder_bytes(tmp)
    shutil.rmtree(tmp, ignore_errors=True)  # a half save must not keep the space a retry needs
    intact = next(
        (f for f in reversed(list_checkpoints(checkpoints_dir)) if verify_checkpoint(f, deep=False) is None), None
    )
    needed = max(written, folder_bytes(intact) if intact else 0)
    note = f"the previous checkpoint {intact.name} is intact" if intact else "no checkpoint was saved before this one"
    return disk_full_failure(f"saving checkpoint {final.name} to {checkpoints_dir}", checkpoints_dir, needed, note)


def _lib_versions() -> dict[str, str]:
    import accelerate
    import transformers

    return {"transformers": transformers.__version__, "accelerate": accelerate.__version__}


# --- discovery and verification


def list_checkpoints(checkpoints_dir: Path) -> list[Path]:
    """Committed-looking checkpoint folders, oldest first (temporary folders excluded)."""
    if not checkpoints_dir.is_dir():
        return []
    return sorted(p for p in checkpoints_dir.iterdir() if p.is_dir() and p.name.startswith("step-"))


def find_latest_checkpoint(checkpoints_dir: Path, deep: bool = True) -> Path | None:
    """The newest checkpoint that verifies; WARNING for each newer one skipped. Raise if none of several is valid."""
    candidates = list_checkpoints(checkpoints_dir)
    for folder in reversed(candidates):
        refuse_newer_format(folder)  # never skipped for an older one: that would silently undo the newer run's work
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


def refuse_newer_format(folder: Path) -> None:
    """Raise if `folder` is an intact checkpoint of a format newer than this version reads."""
    problem = newer_format(folder)
    if problem is not None:
        raise UserError(f"{folder}: {problem}, or resume it with the version that wrote it")


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
    refuse_newer_format(folder)
    progress = read_progress(folder)
    check_layout(folder, read_manifest(folder).get("layout"), progress.world_size, accelerator)
    rank = accelerator.process_index
    refuse_unsafe_pickles(folder)  # DeepSpeed's shards: accelerate's own files load with weights_only=True
    try:
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
        if not_restored := unrestored_generators(saved):
            raise UserError(
                f"{rng_file}: the random state of {', '.join(not_restored)} was not restored (saved on another kind "
                "of machine?); a resume here would not be exact"
            )
    elif rank < progress.world_size:
        raise UserError(
            f"{folder} lacks {rng_file.name} although {progress.world_size} processes saved it (committed without "
            "that rank's state); resume an older checkpoint with --resume_from_checkpoint PATH"
        )
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
            main_process_only=False,  # only ranks beyond the saved world size get here, never rank 0
        )
    return progress
