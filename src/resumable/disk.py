"""The machine's side of writing a run: an output dir that cannot be written, a disk that fills up.

Both are `EnvironmentFailure` (exit 74): one line saying what happened and what to do, never a traceback. A full
disk reaches us in three shapes: `OSError(ENOSPC)` from Python's own writes, safetensors' `SafetensorError(... No
space left on device (os error 28))`, and torch's zip writer, which only says a write came up short
(`RuntimeError: [enforce fail at inline_container.cc:...] . unexpected pos ...`).
"""

from __future__ import annotations

import contextlib
import errno
import functools
import io
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from resumable.errors import EnvironmentFailure, UserError

T = TypeVar("T")
FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
FULL_TEXTS = ("No space left on device", "Disk quota exceeded", "os error 28", "os error 122")


def is_disk_full(err: BaseException) -> bool:
    """Whether `err` (or what it was raised from) is a write that failed for lack of space."""
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError) and err.errno in FULL_ERRNOS:
            return True
        text = str(err)
        if any(t in text for t in FULL_TEXTS):
            return True
        # torch's zip writer drops the errno: a short write while saving is a full disk (or quota) in practice
        if "inline_container.cc" in text and ("unexpected pos" in text or "write failed" in text):
            return True
        err = err.__cause__ or err.__context__
    return False


def size_text(n: float) -> str:
    """A byte count for a one-line message: 134 kB, 12.3 MB, 1.5 GB."""
    if n < 1e6:
        return f"{n / 1e3:.0f} kB"
    return f"{n / 1e6:.1f} MB" if n < 1e9 else f"{n / 1e9:.1f} GB"


def free_bytes(path: Path) -> int | None:
    """Free space on the filesystem holding `path` (or its nearest existing parent); None if unknown."""
    for folder in (Path(path), *Path(path).parents):
        if folder.exists():
            try:
                return shutil.disk_usage(folder).free
            except OSError:
                return None
    return None


def folder_bytes(folder: Path) -> int:
    """Bytes of the files in `folder`, subfolders included (0 if it is gone)."""
    try:
        return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())
    except OSError:
        return 0


def disk_full_failure(action: str, where: Path, needed: int | None = None, note: str = "") -> EnvironmentFailure:
    """The one line for a full disk while `action`: what it needs, what is free, what is still safe, what to do."""
    free = free_bytes(where)
    sizes = [
        f"needs about {size_text(needed)}" if needed else "",
        f"{size_text(free)} free" if free is not None else "",
    ]
    detail = "; ".join(x for x in (", ".join(s for s in sizes if s), note) if x)
    return EnvironmentFailure(
        f"no space left on device while {action}{f' ({detail})' if detail else ''}: "
        "free space and run the same command to resume"
    )


def _file_written(err: BaseException) -> str | None:
    """The file a failed write was writing: the error's own filename, else an open file in the failing frames."""
    if getattr(err, "filename", None):
        return str(err.filename)
    tb, found = err.__traceback__, None
    while tb is not None:  # innermost wins: the writer closest to the failure
        for value in tb.tb_frame.f_locals.values():
            if isinstance(value, io.IOBase) and isinstance(getattr(value, "name", None), str):
                found = value.name
        tb = tb.tb_next
    return found


def disk_full_exits(main: Callable[..., T]) -> Callable[..., T]:
    """Wrap a script's `main` (inside `exit_on_user_error`): any write that fails for lack of space, wherever it
    happens (a log line, the final model), becomes one `EnvironmentFailure` line naming the file."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except UserError:
            raise
        except Exception as err:
            if not is_disk_full(err):
                raise
            name = _file_written(err)
            if name:
                raise disk_full_failure(f"writing {name}", Path(name)) from None
            # not known to be the output dir (a DataLoader worker's /dev/shm, a temp dir): say what failed
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise EnvironmentFailure(f"no space left on device: {first}") from None

    return wrapper


def check_output_dir_writable(path: Path) -> None:
    """Fail at start, in one line, if the output dir (or, before it exists, the folder it will be made in) cannot be
    written: a read-only mount, missing permissions, an immutable folder. Probes with a real file, because
    `os.access` says yes to root on most of these."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserError(f"--output_dir {path}: exists and is not a directory")
    probe_dir = next((p for p in (path, *path.parents) if p.exists()), None)
    if probe_dir is None:  # pragma: no cover - "/" always exists
        return
    if not probe_dir.is_dir():
        raise UserError(f"--output_dir {path}: {probe_dir} is not a directory")
    probe = probe_dir / f".resumable-write-test-{os.getpid()}"
    try:
        with open(probe, "wb") as fh:
            fh.write(b"x")
            fh.flush()
            os.fsync(fh.fileno())
    except OSError as err:
        if is_disk_full(err):
            raise disk_full_failure(f"testing that --output_dir {path} is writable", probe_dir) from None
        where = "" if probe_dir == path else f" (cannot create it in {probe_dir})"
        raise EnvironmentFailure(
            f"--output_dir {path}: not writable{where}: {err.strerror or err}; "
            "fix its permissions or mount, or choose another --output_dir"
        ) from None
    finally:
        with contextlib.suppress(OSError):
            probe.unlink()
