"""A remote `--output_dir` (s3://bucket/run, gs://..., any fsspec URL): train in a local staging folder, mirror it.

The remote is the durable copy; the staging folder is a cache that a new machine rebuilds by pulling the newest
remote checkpoint that verifies. The commit rules of the local store carry over to object storage:
- upload: every data file first, `manifest.json` last, so a checkpoint whose upload died has no manifest;
- delete: `manifest.json` first, so a checkpoint whose delete died has no manifest either;
- download: manifest first, then the files it lists into a temporary folder, verified (sizes, sha256), then
  renamed into place, so a kill mid-pull never leaves a `step-*` folder that looks complete;
- `COMPLETE` is pushed last of all: a remote run without it is not finished, whatever else is there.
Credentials and endpoint come from the usual environment (AWS_ACCESS_KEY_ID, AWS_ENDPOINT_URL, ... for s3;
botocore reads AWS_ENDPOINT_URL and AWS_ENDPOINT_URL_S3 itself) or from `storage_options`.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import re
import shutil
from pathlib import Path

from resumable.checkpoint import (
    MANIFEST,
    bad_file_name,
    fsync_files,
    list_checkpoints,
    manifest_digest,
    read_manifest,
    swap_in,
    verify_checkpoint,
)
from resumable.logs import get_logger
from resumable.object_store import ObjectStore, is_remote, staging_dir  # noqa: F401 (re-exported)
from resumable.remote_retention import RemoteRetention

log = get_logger(__name__)
STEP_DIR = re.compile(r"step-(\d+)")
PULLED_FILES = ("train_log.jsonl", "train.log", "run_status.json")  # the small files a resumed run continues from
LOCAL_FIRST = ("train.log",)  # appended to after the last push (the stop, the error): a local copy is never older
FINAL_FILES = ("final_metrics.json", "loss_curve.png", "train_log.jsonl", "train.log", "run_status.json")
PUSHED = ".pushed"  # in the staging folder once it has pushed a checkpoint: its remote run existed
COMPLETE = "COMPLETE"  # same name as resumable.export.COMPLETE (not imported: export pulls in matplotlib)


class RemoteMirror(RemoteRetention, ObjectStore):
    """The remote copy of one run's output folder. Main process only, except `pull_latest_valid` (locked)."""

    def remote_checkpoints(self) -> list[str]:
        """Names of the remote `checkpoints/step-*` folders, oldest first (complete or not)."""
        rpath = self._remote("checkpoints")
        self.fs.invalidate_cache(rpath)
        try:
            entries = self._retry(f"list {rpath}", self.fs.ls, rpath, True)
        except FileNotFoundError:
            return []
        names = [e["name"].rstrip("/").rsplit("/", 1)[-1] for e in entries if e["type"] == "directory"]
        return sorted((n for n in names if STEP_DIR.fullmatch(n)), key=lambda n: int(n[5:]))

    def _remote_manifest(self, name: str) -> bytes | None:
        rpath = self._remote("checkpoints", name, MANIFEST)
        try:
            return self._retry(f"read {rpath}", self.fs.cat_file, rpath)
        except FileNotFoundError:
            return None

    # --- pull

    def is_complete(self) -> bool:
        """The remote run has finished (its COMPLETE marker was pushed, which happens last)."""
        return self.exists(COMPLETE)

    def pull_latest_valid(self) -> str | None:
        """Make the newest remote checkpoint that verifies present in `local_dir/checkpoints`; return its name.

        Newer remote ones that are incomplete or corrupted are skipped with a WARNING naming the file and reason.
        A checkpoint already present locally and valid is not downloaded again. Brings train_log.jsonl and
        run_status.json too when the remote is at least as new as the local folder. A finished remote run
        brings only COMPLETE and run_status.json (None returned). Every process may call this: a lock file
        makes the others wait for the first, then find everything in place.
        """
        with self._lock():
            sizes = self._sizes()
            if COMPLETE in sizes:  # nothing to resume: train.py's own COMPLETE check ends the run
                for fname in ("run_status.json", COMPLETE):
                    if fname in sizes:
                        self._get(self.local_dir / fname, fname)
                return None
            if (self.local_dir / COMPLETE).exists():
                # finished here, but the push of the end never got through: finishing again pushes it
                log.warning("%s has %s but %s has not; the run will finish again", self.local_dir, COMPLETE, self.url)
                (self.local_dir / COMPLETE).unlink()
            pulled = self._pull_newest()
            local_valid = [
                f for f in list_checkpoints(self.local_dir / "checkpoints") if not verify_checkpoint(f, deep=False)
            ]
            newest_local = max((int(f.name[5:]) for f in local_valid), default=-1)
            if pulled is not None and int(pulled[5:]) >= newest_local:  # else this folder holds the newer log
                self.fetch_files(PULLED_FILES, sizes)
            return pulled

    @contextlib.contextmanager
    def _lock(self):
        """One process per staging folder pulls at a time; the others then find its downloads in place."""
        self.local_dir.mkdir(parents=True, exist_ok=True)
        with open(self.local_dir / ".pull.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also if this process dies
            yield

    def _pull_newest(self) -> str | None:
        for name in reversed(self.remote_checkpoints()):
            reason = self._pull_one(name)
            if reason is None:
                return name
            log.warning("skipping remote checkpoint %s/checkpoints/%s: %s", self.url, name, reason)
        return None

    def pull_newest(self) -> str | None:
        """The newest remote checkpoint that verifies, made present locally (a finished run being extended)."""
        with self._lock():
            return self._pull_newest()

    def pull_checkpoint(self, name: str) -> str | None:
        """Make remote checkpoint `name` present and valid locally; None on success, else why it cannot be.

        A valid local copy is kept as it is; an invalid one is replaced only once the download verifies.
        """
        with self._lock():
            return self._pull_one(name)

    def _pull_one(self, name: str) -> str | None:
        checkpoints = self.local_dir / "checkpoints"
        if (checkpoints / name).is_dir() and verify_checkpoint(checkpoints / name) is None:
            return None
        return self._download(name, checkpoints)

    def _check_remote(self, name: str) -> tuple[bytes, dict, str | None]:
        """Remote checkpoint `name`: its manifest (raw, parsed) and why it is not complete (None: it looks it).

        Checks what costs no download: the manifest's own checksum, and every listed file's name and size.
        """
        raw = self._remote_manifest(name)
        if raw is None:
            return b"", {}, f"{MANIFEST} missing (incomplete upload)"
        try:
            manifest = json.loads(raw)
        except ValueError as err:
            return raw, {}, f"{MANIFEST} unreadable ({err})"
        if not isinstance(manifest, dict) or manifest.get("manifest_sha256") != manifest_digest(manifest):
            return raw, {}, f"{MANIFEST} checksum mismatch (corrupted)"
        files = manifest.get("files")
        if not isinstance(files, dict) or not files:
            return raw, manifest, f"{MANIFEST} lists no files"
        sizes = self._sizes("checkpoints", name, recursive=True)
        for fname, meta in files.items():
            if bad_file_name(fname) or (manifest.get("format", 1) < 2 and "/" in fname):
                return raw, manifest, f"{MANIFEST} names a path outside its folder: {fname!r}"
            if fname not in sizes:
                return raw, manifest, f"{fname} missing"
            if sizes[fname] != meta.get("size"):
                return raw, manifest, f"{fname} has {sizes[fname]} bytes, manifest says {meta.get('size')}"
        return raw, manifest, None

    def _download(self, name: str, checkpoints: Path) -> str | None:
        """Fetch and verify one remote checkpoint, rename it into place; None on success, else why not."""
        raw, manifest, reason = self._check_remote(name)
        if reason is not None:  # found before fetching gigabytes
            return reason
        files = manifest["files"]
        tmp = checkpoints / f".tmp-pull-{name}"
        shutil.rmtree(tmp, ignore_errors=True)  # left by a kill mid-pull
        tmp.mkdir(parents=True)
        for fname in files:
            self._get(tmp / fname, "checkpoints", name, fname)
        (tmp / MANIFEST).write_bytes(raw)
        reason = verify_checkpoint(tmp, deep=True)
        if reason is not None:
            shutil.rmtree(tmp, ignore_errors=True)
            return reason
        fsync_files(tmp)
        swap_in(tmp, checkpoints / name)
        return None

    # --- push

    def push_checkpoint(self, local_folder: Path) -> None:
        """Upload a committed local checkpoint to url/checkpoints/<name>/: data files first, manifest last."""
        local_folder = Path(local_folder)
        name, manifest = local_folder.name, read_manifest(local_folder)
        # The same step pushed again (a rerun saved it anew): its old manifest goes first, so that the folder is
        # never a mix of old manifest and new files that looks complete.
        self._rm("checkpoints", name, MANIFEST)
        for fname in manifest["files"]:
            self._put(local_folder / fname, "checkpoints", name, fname)
        stale = set(self._sizes("checkpoints", name, recursive=True)) - set(manifest["files"]) - {MANIFEST}
        for fname in sorted(stale):  # e.g. random_states_3.pkl of an earlier run with more processes
            self._rm("checkpoints", name, fname)
        self._put(local_folder / MANIFEST, "checkpoints", name, MANIFEST)
        (self.local_dir / PUSHED).touch()

    def push_missing(self) -> list[str]:
        """Push every valid local checkpoint whose remote copy lacks the same manifest (a push cut short by a
        kill, a staging folder that outlived its remote). Returns the names pushed."""
        folders = list_checkpoints(self.local_dir / "checkpoints")
        return [f.name for f in folders if verify_checkpoint(f, deep=False) is None and self.ensure_pushed(f)]

    def ensure_pushed(self, folder: Path) -> bool:
        """Push a committed local checkpoint unless the remote holds it with the same manifest; True if pushed."""
        if self._remote_manifest(folder.name) == (folder / MANIFEST).read_bytes():
            return False
        self.push_checkpoint(folder)
        return True

    def push_file(self, name: str) -> None:
        """Upload local_dir/name to url/name (one object: it appears whole or not at all)."""
        self._put(self.local_dir / name, name)

    def push_dir(self, name: str) -> None:
        """Upload local_dir/name/ recursively, then delete remote files there that the local folder lacks."""
        base = self.local_dir / name
        local_files = sorted(p.relative_to(base).as_posix() for p in base.rglob("*") if p.is_file())
        for rel in local_files:
            self._put(base / rel, name, rel)
        prefix = self._remote(name) + "/"
        self.fs.invalidate_cache(self._remote(name))
        for rpath in self._retry(f"list {prefix}", self.fs.find, prefix):
            if rpath[len(prefix) :] not in local_files:
                self._rm(rpath[len(self.root) + 1 :])

    def push_complete(self) -> None:
        """Push the end of a finished run: final/, the small files, then COMPLETE last of all."""
        self.push_dir("final")
        if (self.local_dir / "final_raw").is_dir():  # --ema_decay: the raw model beside the average
            self.push_dir("final_raw")
        for fname in FINAL_FILES:
            if (self.local_dir / fname).is_file():
                self.push_file(fname)
        self.push_file(COMPLETE)

    # --- a run's life: gone, extended, branched

    def forget_if_deleted(self) -> bool:
        """The remote run was deleted although this staging folder pushed to it: the user wants to start over, and
        the staging folder is only a cache, so it is discarded (never pushed back as if it were the run)."""
        with self._lock():  # every process calls this; the first one clears, the others then find nothing pushed
            if not (self.local_dir / PUSHED).exists() or not self.is_empty():
                return False
            for child in self.local_dir.iterdir():
                if child.name != ".pull.lock":  # the lock stays: others may be waiting on it
                    shutil.rmtree(child) if child.is_dir() else child.unlink()
        log.warning("%s is empty but its staging copy %s had pushed to it: the remote run was deleted; starting "
                    "over (the staging copy was a cache and is cleared)", self.url, self.local_dir)  # fmt: skip
        return True

    def fetch_complete(self) -> bool:
        """Bring the remote COMPLETE marker (and run status) of a finished run; True if the run is finished."""
        with self._lock():  # every process calls this
            return COMPLETE in self.fetch_files(("run_status.json", COMPLETE))

    def fetch_files(self, names: tuple[str, ...], sizes: dict | None = None) -> set[str]:
        """Download the named top-level files that exist remotely (a LOCAL_FIRST one only when it is missing here);
        return the names that exist remotely."""
        sizes = self._sizes() if sizes is None else sizes
        for fname in names:
            if fname in sizes and not (fname in LOCAL_FIRST and (self.local_dir / fname).exists()):
                self._get(self.local_dir / fname, fname)
        return set(names) & set(sizes)

    def unfinish(self) -> None:
        """A finished run asked for more: its remote COMPLETE goes first, so a kill leaves a run that resumes."""
        self._rm(COMPLETE)

    def set_aside(self, dest: str, after_step: int) -> None:
        """Move remote checkpoints after `after_step` (-1: the whole run) and a finished run's end under `dest/`.

        Copies first, then deletes (manifest first), so an interrupted move never loses a checkpoint; a remote
        checkpoint still in place is moved again by the next start-up, which plans the same branch.
        """
        if self.exists(COMPLETE):
            self._rm(COMPLETE)
            (self.local_dir / COMPLETE).unlink(missing_ok=True)
        for name in [n for n in self.remote_checkpoints() if int(n[5:]) > after_step]:
            self._copy(("checkpoints", name), (dest, "checkpoints", name), recursive=True)
            self.delete_remote([name])
        ends = ("final_metrics.json", "loss_curve.png") + (
            ("train_log.jsonl", "train.log", "run_status.json") if after_step < 0 else ()
        )
        sizes = self._sizes()
        if after_step >= 0 and "train_log.jsonl" in sizes:  # the abandoned line's log, kept beside it
            self._copy(("train_log.jsonl",), (dest, "train_log.jsonl"))
        for fname in [f for f in ends if f in sizes]:
            self._copy((fname,), (dest, fname))
            self._rm(fname)
        for folder in ("final", "final_raw"):
            if self._sizes(folder):
                self._copy((folder,), (dest, folder), recursive=True)
                self._rm(folder, recursive=True)
