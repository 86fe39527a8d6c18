"""Logs a person can read: every line has its level, rank 0 speaks for the run, `{output_dir}/train.log` keeps them all.

    log = get_logger(__name__)
    log.info("Tokenizing ...")                       # main process only
    log.warning("...", main_process_only=False)      # every rank, prefixed with its rank

Works before the Accelerator exists (the rank comes from the launcher's environment until accelerate's state is up),
so start-up planning can log too.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

ROOT = "resumable"
FORMAT = "%(asctime)s %(levelname)s %(message)s"
DATEFMT = "%Y-%m-%d %H:%M:%S"
LEVELS = ("debug", "info", "warning", "error")

# Library messages a user cannot act on. Matched exactly, so every other warning still shows.
QUIET = (
    # accelerate's save_state on tied embeddings (GPT-2's lm_head is wte): safetensors stores one copy by design
    ("accelerate", "Removed shared tensor"),
)


def process_index() -> int:
    """This process's rank: accelerate's once it is initialised, else what the launcher put in the environment."""
    from accelerate.state import PartialState

    if PartialState._shared_state:
        return PartialState().process_index
    return int(os.environ.get("RANK", "0"))


class RankAdapter(logging.LoggerAdapter):
    """accelerate's `MultiProcessAdapter` contract (`main_process_only=True` by default), usable before accelerate
    is initialised."""

    def log(self, level: int, msg: object, *args, main_process_only: bool = True, **kwargs) -> None:
        if not self.isEnabledFor(level):
            return
        rank = process_index()
        if main_process_only and rank != 0:
            return
        if not main_process_only and rank != 0:
            msg = f"[rank {rank}] {msg}"
        kwargs.setdefault("stacklevel", 2)
        self.logger.log(level, msg, *args, **kwargs)

    def process(self, msg, kwargs):  # the logger adapter API; nothing to add
        return msg, kwargs


def get_logger(name: str) -> RankAdapter:
    """A rank-aware logger under the `resumable` namespace."""
    return RankAdapter(logging.getLogger(name if name.startswith(ROOT) else f"{ROOT}.{name}"), {})


class _Quiet(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not any(record.name.startswith(src) and str(record.msg).startswith(text) for src, text in QUIET)


def setup_logging(level: str = "info") -> None:
    """Send `resumable.*` to stderr at `level`; silence exactly the known noise of the libraries (see QUIET)."""
    root = logging.getLogger(ROOT)
    root.setLevel(level.upper())
    root.propagate = False
    if not any(getattr(h, "_resumable", False) for h in root.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(FORMAT, DATEFMT))
        handler._resumable = True
        root.addHandler(handler)
    for source, _ in QUIET:
        logger = logging.getLogger(source)
        if not any(isinstance(f, _Quiet) for f in logger.filters):
            logger.addFilter(_Quiet())


def log_to_file(path: Path) -> None:
    """Append every line this process logs to `path` too (rank 0's `train.log`, kept across resumes)."""
    root = logging.getLogger(ROOT)
    target = str(Path(path).resolve())
    if any(getattr(h, "baseFilename", None) == target for h in root.handlers):
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(target, mode="a", encoding="utf-8", delay=False)
    handler.setFormatter(logging.Formatter(FORMAT, DATEFMT))
    root.addHandler(handler)
