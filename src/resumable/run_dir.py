"""Opening what a command line names: a run directory, its checkpoints folder, one checkpoint; local or remote.

A remote run (s3://...) is pulled into the local staging folder train.py uses, every checkpoint that verifies;
the ones that do not are remembered in REMOTE_INVALID so `list` and `verify` can report them.
"""

from __future__ import annotations

from pathlib import Path

from resumable.checkpoint import MANIFEST, list_checkpoints, read_manifest
from resumable.config import cache_root
from resumable.errors import UserError
from resumable.export import COMPLETE
from resumable.remote import RemoteMirror, is_remote, staging_dir

MIRRORS: dict[Path, RemoteMirror] = {}  # staging checkpoints folder -> its remote run
REMOTE_INVALID: dict[str, str] = {}  # remote checkpoint name -> why it could not be pulled


def _pull_remote(url: str) -> Path:
    """A remote run (s3://...): pull every checkpoint that verifies into the local staging folder train.py uses."""
    mirror = RemoteMirror(url, staging_dir(url, cache_root()))
    mirror.pull_latest_valid()  # also brings COMPLETE / run_status.json
    for name in mirror.remote_checkpoints():
        reason = mirror.pull_checkpoint(name)
        if reason:
            REMOTE_INVALID[name] = f"remote: {reason}"
    MIRRORS[mirror.local_dir / "checkpoints"] = mirror
    (mirror.local_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
    return mirror.local_dir


def _local(arg: str, what: str) -> Path:
    if is_remote(arg):
        if what != "run directory":
            raise UserError(f"{arg}: for a remote run, pass the run URL (its checkpoints are pulled and checked)")
        return _pull_remote(arg)
    path = Path(arg).expanduser()
    if not path.exists():
        raise UserError(f"{arg}: no such {what}")
    if not path.is_dir():
        raise UserError(f"{arg}: not a directory (expected a {what})")
    return path


def open_store(arg: str) -> tuple[Path, Path | None]:
    """(checkpoints folder, run folder or None) from a run directory or its checkpoints/ folder."""
    path = _local(arg, "run directory")
    if (path / "checkpoints").is_dir():
        return path / "checkpoints", path
    if path.name == "checkpoints":
        return path, path.parent
    if list_checkpoints(path):  # a checkpoints folder by another name
        return path, None
    if (path / MANIFEST).is_file():
        raise UserError(f"{arg}: is a single checkpoint; pass the run directory that holds it")
    raise UserError(f"{arg}: not a run directory (no checkpoints/ folder inside)")


def open_checkpoint(arg: str) -> Path:
    path = _local(arg, "checkpoint folder")
    if (path / MANIFEST).is_file() or path.name.startswith("step-"):
        return path
    inner = list_checkpoints(path / "checkpoints") or list_checkpoints(path)
    hint = f", e.g. {inner[-1]}" if inner else ""
    raise UserError(f"{arg}: not a checkpoint folder (no {MANIFEST}); pass one of step-* folders{hint}")


def manifest_or_none(folder: Path) -> dict | None:
    try:
        manifest = read_manifest(folder)
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) else None


def listed_bytes(folder: Path) -> int:
    """Bytes of the files the manifest lists (what a deep verify reads, at most)."""
    files = (manifest_or_none(folder) or {}).get("files", {})
    return sum(meta.get("size", 0) for name, meta in files.items() if (folder / name).is_file())


def leftovers(checkpoints: Path) -> list[str]:
    """Folders of interrupted saves or deletes; training removes them after its next commit."""
    return sorted(p.name for p in checkpoints.glob(".t*-step-*"))


def run_state(run: Path | None) -> str:
    if run is None:
        return "run: unknown (not inside a run directory)"
    if (run / COMPLETE).exists():
        return f"run: complete (final model in {run / 'final'})"
    return f"run: not complete (no {COMPLETE} marker: still training, stopped, or killed)"
