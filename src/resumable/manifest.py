"""Manifests and the commit protocol: what makes a folder of files a checkpoint, and how it is checked.

`manifest.json` is written last: the format version, every file's size and sha256, and a checksum of the manifest
itself. A folder counts only if its manifest exists, its format is one this version reads, and every file listed
has the recorded size and sha256. Commits and amendments write a `.tmp-*` folder and rename it into place, so a
crash or a full disk never leaves a half-written `step-*` folder.

Format history (bump FORMAT when a reader of the old version would misread a new checkpoint; every format keeps
`format` and `manifest_sha256` as they are, so an old reader tells a newer checkpoint from a corrupted one):
  1  the first; manifests written before the field existed have no "format" and are format 1.
  2  file names may be relative paths into subfolders (DeepSpeed's per-rank shards in `pytorch_model/`): a format 1
     reader would refuse them as "outside its folder" and fall back to an older checkpoint. Flat checkpoints are
     still written as format 1, so older versions keep reading what they can.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

from resumable.disk import disk_full_failure, is_disk_full
from resumable.logs import get_logger
from resumable.preemption import inject_fault

if TYPE_CHECKING:
    from resumable.checkpoint import Progress

MANIFEST, PROGRESS = "manifest.json", "progress.json"
FORMAT = 2  # the newest checkpoint format this version writes and reads
log = get_logger(__name__)
_VERIFIED: set = set()  # deep verifications that passed in this process: (manifest digest, every file's stat)


def _sha256(path: Path) -> str:
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def state_files(folder: Path) -> list[Path]:
    """Every file under `folder` (subfolders included: DeepSpeed writes its shards into one), manifest excluded."""
    return sorted(p for p in folder.rglob("*") if p.is_file() and p != folder / MANIFEST)


def _hash_files(folder: Path) -> dict[str, dict]:
    files = state_files(folder)
    with ThreadPoolExecutor(max_workers=4) as pool:  # hashlib releases the GIL
        digests = list(pool.map(_sha256, files))
    return {p.relative_to(folder).as_posix(): {"size": p.stat().st_size, "sha256": d} for p, d in zip(files, digests)}


def bad_file_name(name: object) -> bool:
    """A manifest entry that is not a plain relative path inside the checkpoint (absolute, `..`, empty parts)."""
    if not isinstance(name, str) or not name or "\\" in name or "\x00" in name or name.startswith("/"):
        return True
    return any(part in ("", ".", "..") for part in name.split("/"))


def manifest_digest(manifest: dict) -> str:
    body = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def _write_json(path: Path, obj: dict) -> None:
    with open(path, "w") as fh:
        json.dump(obj, fh, indent=1, sort_keys=True)
        fh.flush()
        os.fsync(fh.fileno())


def fsync_files(folder: Path) -> None:
    for p in state_files(folder):
        with open(p, "rb") as fh:
            os.fsync(fh.fileno())
    for sub in {p.parent for p in state_files(folder)} - {folder}:
        _fsync_dir(sub)


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


# --- writing


def commit_checkpoint(tmp: Path, final: Path, step: int, fields: dict) -> None:
    """Make the files in `tmp` checkpoint `final`: fsync, manifest (sizes, sha256) written last, atomic rename."""
    fsync_files(tmp)  # other ranks' files too: one fsync pass on the node that commits
    inject_fault("kill_before_manifest", step)
    inject_fault("sigterm_during_save", step)
    files = _hash_files(tmp)
    fmt = FORMAT if any("/" in name for name in files) else 1  # flat checkpoints stay readable by older versions
    manifest = {"format": fmt, "step": step, "created": time.time(), **fields, "files": files}
    manifest["manifest_sha256"] = manifest_digest(manifest)
    _write_json(tmp / MANIFEST, manifest)
    _fsync_dir(tmp)
    swap_in(tmp, final)


def amend_checkpoint(folder: Path, progress: Progress) -> None:
    """Record new progress in a committed checkpoint, e.g. the result of an evaluation re-run after a resume.

    The state files are hard-linked (copied where the filesystem has no links) into a temporary folder beside a new
    progress.json; the manifest keeps their verified sizes and hashes, and the folder is swapped in as at a commit.
    Main process only. The training state itself is unchanged: evaluation draws no randomness.
    A full disk leaves `folder` as it was (the temporary folder is removed) and raises EnvironmentFailure.
    """
    manifest = read_manifest(folder)
    tmp = folder.with_name(f".tmp-{folder.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        _write_amended(folder, tmp, manifest, progress)
    except Exception as err:
        if not is_disk_full(err):
            raise
        shutil.rmtree(tmp, ignore_errors=True)
        raise disk_full_failure(
            f"recording an evaluation in checkpoint {folder}", folder.parent, None, f"{folder.name} is intact"
        ) from None
    swap_in(tmp, folder)


def _write_amended(folder: Path, tmp: Path, manifest: dict, progress: Progress) -> None:
    tmp.mkdir()
    for name in manifest["files"]:
        if name != PROGRESS:
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
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
    fsync_files(tmp)  # the links' subfolders (DeepSpeed's shards) too
    _fsync_dir(tmp)


# --- reading and verification


def read_manifest(folder: Path) -> dict:
    return json.loads((folder / MANIFEST).read_text())


def format_problem(manifest: dict) -> str | None:
    """Why this version cannot read a checkpoint of this manifest's format; None if it can (no field: format 1)."""
    fmt = manifest.get("format", 1)
    if not isinstance(fmt, int) or isinstance(fmt, bool) or fmt < 1:
        return f"{MANIFEST} has an unknown checkpoint format {fmt!r}"
    if fmt > FORMAT:
        return (
            f"checkpoint format {fmt} is newer than this version of resumable reads (format {FORMAT}); "
            "upgrade resumable to use it"
        )
    return None


def newer_format(folder: Path) -> str | None:
    """`format_problem` of `folder`'s intact manifest; None when it has none or is corrupted (verify says why)."""
    try:
        manifest = read_manifest(folder)
    except (OSError, ValueError):
        return None
    if not isinstance(manifest, dict) or manifest.get("manifest_sha256") != manifest_digest(manifest):
        return None
    return format_problem(manifest)


def verify_checkpoint(folder: Path, deep: bool = True) -> str | None:
    """None if `folder` is a complete, intact checkpoint this version reads; else the reason (naming the file)."""
    try:
        manifest = read_manifest(folder)
    except FileNotFoundError:
        return f"{MANIFEST} missing (incomplete save)"
    except (OSError, ValueError) as err:
        return f"{MANIFEST} unreadable ({err})"
    if not isinstance(manifest, dict):
        return f"{MANIFEST} is not a JSON object (corrupted)"
    problem = format_problem(manifest)
    if manifest.get("manifest_sha256") != manifest_digest(manifest):  # every format keeps this checksum
        return f"{MANIFEST} checksum mismatch (corrupted{'; it also claims: ' + problem if problem else ''})"
    if problem is not None:
        return problem
    files = manifest.get("files", {})
    if PROGRESS not in files:
        return f"{MANIFEST} lists no {PROGRESS}"
    stats = []
    for name, meta in files.items():
        if bad_file_name(name) or (manifest.get("format", 1) < 2 and "/" in name):
            return f"{MANIFEST} names a path outside its folder: {name!r}"
        path = folder / name
        if not path.is_file():
            return f"{name} missing"
        st = path.stat()
        if st.st_size != meta["size"]:
            return f"{name} has {st.st_size} bytes, manifest says {meta['size']}"
        if path.is_symlink() or not path.resolve().is_relative_to(folder.resolve()):
            return f"{name} is a symbolic link or leads out of the checkpoint (refused: it could be anything)"
        stats.append((name, st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns))
    key = (manifest["manifest_sha256"], tuple(stats))  # (device, inode) is the file, wherever renamed to
    if not deep or key in _VERIFIED:  # this process hashed these very files already (the same inodes, unchanged)
        return None
    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=4) as pool:  # hashlib releases the GIL
        digests = list(pool.map(_sha256, (folder / name for name in files)))
    for (name, meta), digest in zip(files.items(), digests):
        if digest != meta["sha256"]:
            return f"{name} sha256 mismatch (corrupted)"
    _VERIFIED.add(key)
    size = sum(meta["size"] for meta in files.values())
    log.debug(f"verified {folder.name}: sha256 of {len(files)} files, {size} bytes, in "
              f"{time.perf_counter() - started:.3f} s", main_process_only=False)  # fmt: skip
    return None
