"""Object storage through fsspec (s3://, gs://, ...): URL parsing, the staging folder, retried primitives."""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from resumable.errors import UserError
from resumable.logs import get_logger

log = get_logger(__name__)
T = TypeVar("T")
# Errors not worth another try: answers (s3fs maps NoSuchKey, AccessDenied, ... to these) and bugs. Everything
# else is retried: after s3fs's own retries, network trouble still surfaces as botocore or aiohttp exceptions
# that share no base class with OSError.
ANSWERS = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, FileExistsError)
PERMANENT = (*ANSWERS, TypeError, ValueError, AttributeError, NotImplementedError)


def is_remote(path: str) -> bool:
    """True for `scheme://...` with a scheme other than file (s3://, gs://, memory://, ...)."""
    m = re.match(r"([A-Za-z][A-Za-z0-9+.-]*)://", str(path))
    return m is not None and m.group(1).lower() not in ("file", "local")


def staging_dir(url: str, cache_root: Path) -> Path:
    """The local folder a run with this remote output_dir trains in: stable per URL, so a rerun on the same
    machine finds its checkpoints without downloading them again."""
    digest = hashlib.sha256(url.rstrip("/").encode()).hexdigest()[:16]
    return Path(cache_root) / "staging" / digest


class ObjectStore:
    """A folder in object storage with retries: the primitives RemoteMirror builds its commit rules on."""

    def __init__(
        self,
        url: str,
        local_dir: Path,
        storage_options: dict | None = None,
        retries: int = 4,
        backoff_s: float = 1.0,
    ):
        import fsspec  # lazily: a run with a local output_dir never needs it

        self.url = url.rstrip("/")
        try:
            self.fs, self.root = fsspec.core.url_to_fs(self.url, **(storage_options or {}))
        except (ImportError, ValueError) as err:  # no s3fs/gcsfs installed, or a protocol fsspec does not know
            hint = "pip install 'resumable[remote]' for s3://, gcsfs for gs://"
            raise UserError(f"--output_dir {url}: {str(err).splitlines()[0]} ({hint})") from None
        self.root = self.root.rstrip("/")
        self.local_dir = Path(local_dir)
        self.retries, self.backoff_s = retries, backoff_s

    # --- plumbing

    def _remote(self, *parts: str) -> str:
        return "/".join([self.root, *parts])

    def _retry(self, what: str, fn: Callable[..., T], *args) -> T:
        """Run fn(*args); on a transient error wait (1, 2, 4, ... x backoff_s) and try again, `retries` times."""
        for attempt in range(self.retries + 1):
            try:
                return fn(*args)
            except PERMANENT:
                raise
            except Exception as err:
                if "Credentials" in type(err).__name__:  # botocore's NoCredentialsError and friends: a setup error
                    raise UserError(
                        f"{self.url}: {err} (set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or a profile)"
                    ) from None
                if attempt == self.retries:
                    raise
                delay = self.backoff_s * 2**attempt
                log.warning("%s failed (%s); retrying in %.1f s", what, err, delay)
                time.sleep(delay)
        raise AssertionError("unreachable")

    def _put(self, local: Path, *parts: str) -> None:
        rpath = self._remote(*parts)
        self._retry(f"upload {rpath}", self.fs.put_file, str(local), rpath)

    def _get(self, local: Path, *parts: str) -> None:
        """Download to `local` through a temporary name: a kill never leaves a truncated file under the real one."""
        rpath, tmp = self._remote(*parts), local.with_name(f".part-{local.name}")
        local.parent.mkdir(parents=True, exist_ok=True)  # a shard in a subfolder (DeepSpeed's pytorch_model/)
        self._retry(f"download {rpath}", self.fs.get_file, rpath, str(tmp))
        os.replace(tmp, local)

    def _rm(self, *parts: str, recursive: bool = False) -> None:
        rpath = self._remote(*parts)
        with contextlib.suppress(FileNotFoundError):  # already gone: deleting is idempotent
            self._retry(f"delete {rpath}", self.fs.rm, rpath, recursive)

    def _sizes(self, *parts: str, recursive: bool = False) -> dict[str, int]:
        """File name -> size of the objects directly in a remote folder (empty if there is none); `recursive`: every
        object below it, named by its path relative to the folder (a checkpoint's shards in subfolders)."""
        rpath = self._remote(*parts)
        self.fs.invalidate_cache(rpath)  # listings are cached per filesystem instance; another process may write
        try:
            if recursive:
                found = self._retry(f"list {rpath}", self.fs.find, rpath, None, False, True)
                entries = list(found.values())
            else:
                entries = self._retry(f"list {rpath}", self.fs.ls, rpath, True)
        except FileNotFoundError:
            return {}
        prefix = rpath.rstrip("/") + "/"  # the root has no protocol: fsspec names objects the same way
        return {
            e["name"][len(prefix) :] if recursive else e["name"].rstrip("/").rsplit("/", 1)[-1]: e["size"]
            for e in entries
            if e["type"] == "file" and (not recursive or e["name"].startswith(prefix))
        }

    def exists(self, name: str) -> bool:
        return name in self._sizes()

    def _copy(self, src: tuple[str, ...], dst: tuple[str, ...], recursive: bool = False) -> None:
        """Server-side copy within the store (S3 CopyObject): nothing passes through this machine."""
        a, b = self._remote(*src), self._remote(*dst)
        self._retry(f"copy {a}", self.fs.copy, a, b, recursive)

    def is_empty(self) -> bool:
        """Nothing at all under the URL (a deleted run, or one never pushed)."""
        self.fs.invalidate_cache(self.root)
        try:
            return not self._retry(f"list {self.root}", self.fs.ls, self.root, False)
        except FileNotFoundError:
            return True
