"""Logs a person can read: every line has its level, rank 0 speaks for the run, `{output_dir}/train.log` keeps them all.

    log = get_logger(__name__)
    log.info("Tokenizing ...")                       # main process only
    log.warning("...", main_process_only=False)      # every rank, prefixed with its rank

Works before the Accelerator exists (the rank comes from the launcher's environment until accelerate's state is up),
so start-up planning can log too.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import sys
from pathlib import Path

ROOT = "resumable"
FORMAT = "%(asctime)s %(levelname)s %(message)s"
DATEFMT = "%Y-%m-%d %H:%M:%S"
LEVELS = ("debug", "info", "warning", "error")

# Library messages a user cannot act on, matched by logger and text, so every other warning still shows.
QUIET = (
    # accelerate's save_state on tied embeddings (GPT-2's lm_head is wte): safetensors stores one copy by design
    ("accelerate.utils.other", "Removed shared tensor"),
    # transformers finds no loss name in GPT2LMHeadModel's class name and falls back to the causal LM loss it is
    ("transformers.modeling_utils", "`loss_type=None` was set in the config but it is unrecognized"),
    # DeepSpeed on a machine without a GPU, where the CPU is what the launch config asked for
    ("DeepSpeed", "Setting accelerator to CPU"),
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
        return not any(record.name == src and text in str(record.msg) for src, text in QUIET)


class _TqdmHandler(logging.StreamHandler):
    """Writes above the progress bar instead of through it."""

    def emit(self, record: logging.LogRecord) -> None:
        from tqdm.auto import tqdm

        try:
            tqdm.write(self.format(record), file=self.stream)
        except Exception:
            self.handleError(record)


class _Buffer(logging.Handler):
    """Lines logged before the output dir may be touched (a bad input must leave it as it was); `log_to_file`
    writes them first."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        if len(self.records) < 10_000:
            self.records.append(record)


class _FileHandler(logging.FileHandler):
    """train.log on a full disk: the run's failure (exit 74 through `disk.disk_full_exits`, naming the file), not a
    `--- Logging error ---` traceback for every later line."""

    def handleError(self, record: logging.LogRecord) -> None:
        err = sys.exc_info()[1]
        if isinstance(err, OSError) and err.errno == errno.ENOSPC:
            raise err
        super().handleError(record)


def log_to_files_only(message: str) -> None:
    """Append an ERROR line to train.log only: the `error: ...` line (or the traceback) a script already printed on
    stderr, so the log a user attaches to a bug report ends with why the run stopped."""
    root = logging.getLogger(ROOT)
    record = root.makeRecord(root.name, logging.ERROR, __file__, 0, message, None, None)
    for handler in root.handlers:
        if isinstance(handler, logging.FileHandler):
            with contextlib.suppress(Exception):  # the disk that failed the run may be this one
                handler.handle(record)


def setup_logging(level: str = "info") -> None:
    """Send `resumable.*` to stderr at `level`; silence exactly the known noise of the libraries (see QUIET)."""
    root = logging.getLogger(ROOT)
    root.setLevel(level.upper())
    root.propagate = False
    if not any(isinstance(h, _TqdmHandler) for h in root.handlers):
        handler = _TqdmHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(FORMAT, DATEFMT))
        root.addHandler(handler)
        root.addHandler(_Buffer())
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
    handler = _FileHandler(target, mode="a", encoding="utf-8", delay=False)
    handler.setFormatter(logging.Formatter(FORMAT, DATEFMT))
    for buffer in [h for h in root.handlers if isinstance(h, _Buffer)]:
        for record in buffer.records:
            handler.handle(record)
        root.removeHandler(buffer)
    root.addHandler(handler)
