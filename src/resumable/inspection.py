"""What `checkpoints.py inspect` prints about each file of a checkpoint, read without running anything in it.

tensors come from safetensors; optimizer.bin and scheduler.bin only through `torch.load(..., weights_only=True)`,
which refuses any pickled code; random_states_*.pkl are never opened.
"""

from __future__ import annotations

import fnmatch
import json
import math
import pickle
import time
import warnings
from pathlib import Path
from typing import Any

import torch

from resumable.checkpoint import MANIFEST, PROGRESS
from resumable.errors import UserError

WEIGHTS, OPTIMIZER, SCHEDULER = "model.safetensors", "optimizer.bin", "scheduler.bin"


def human(n: float) -> str:
    """A byte count for people: 386.1 KiB."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def weights_summary(path: Path) -> list[str]:
    """Name, shape and dtype of every tensor in a safetensors file, read from its header only (no tensor data)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as fh:
        names = fh.keys()  # a safe_open handle is not iterable
        slices = [(name, fh.get_slice(name)) for name in names]
        total = sum(math.prod(sl.get_shape()) for _, sl in slices)
        table = [(name, str(tuple(sl.get_shape())), sl.get_dtype()) for name, sl in slices]
    width = [max((len(row[i]) for row in table), default=0) for i in (0, 1)]
    lines = [f"{len(table)} tensors, {total:,} values"]
    return lines + [f"{name.ljust(width[0])}  {shape.ljust(width[1])}  {dtype}" for name, shape, dtype in table]


def load_safely(path: Path) -> Any:
    """torch.load that refuses pickled code; mmap so a multi-GB optimizer state is not read just to summarise it."""
    with warnings.catch_warnings():  # torch warns about pickle protocols of planted files: the error says enough
        warnings.simplefilter("ignore")
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception:  # mmap needs the zip format: retry plainly, so the error reported is the real one
            pass
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError:  # torch's own message suggests the unsafe load: never repeat that advice
            raise UserError(f"{path}: refused: it holds objects other than tensors and plain data") from None
        except Exception as err:
            raise UserError(f"{path}: could not be loaded ({str(err).strip().splitlines()[0]})") from None


def optimizer_summary(path: Path) -> list[str]:
    """Param groups' hyperparameters, the number of per-parameter states and the step they record."""
    state, lines = load_safely(path), []
    for i, group in enumerate(state.get("param_groups", [])):
        hyper = {k: v for k, v in group.items() if k != "params" and v is not None and v is not False}
        lines.append(f"group {i}: {len(group.get('params', []))} params, " + _pairs(hyper))
    entries = state.get("state", {})
    steps = {float(s["step"]) for s in entries.values() if isinstance(s, dict) and "step" in s}
    step = ", ".join(f"{s:g}" for s in sorted(steps)) or "-"
    lines.append(f"state: {len(entries)} entries, step {step}")
    return lines


def scheduler_summary(path: Path) -> list[str]:
    state = load_safely(path)
    last_lr = state.get("_last_lr")
    lines = [f"last_epoch {state.get('last_epoch')} (scheduler steps taken), last lr {_fmt(last_lr)}"]
    if "base_lrs" in state:
        lines.append(f"base lrs {_fmt(state['base_lrs'])}")
    return lines


def manifest_summary(path: Path) -> list[str]:
    manifest = json.loads(path.read_text())
    created = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(manifest.get("created", 0)))
    keys = ("step", "epoch", "epochs_done", "samples_seen", "world_size", "layout", "per_device_train_batch_size",
            "gradient_accumulation_steps")  # fmt: skip
    lines = [_pairs({k: manifest.get(k) for k in keys}), f"created {created}"]
    if manifest.get("metrics"):
        lines.append(f"metrics at step {manifest.get('metrics_step')}: {_pairs(manifest['metrics'])}")
    lines.append(f"versions: {_pairs(manifest.get('versions', {}))}")
    settings = {k: v for k, v in manifest.get("settings", {}).items() if v is not None}
    lines.append(f"settings: {_pairs(settings)}" if settings else "settings: (not recorded)")
    return lines


def progress_summary(path: Path) -> list[str]:
    return [_pairs(json.loads(path.read_text()))]


def stream_summary(path: Path) -> list[str]:
    """Where one process stands in a --streaming run: per worker, the shard (in the epoch's order) and byte."""
    try:
        return _stream_lines(json.loads(path.read_text()))
    except (KeyError, TypeError, AttributeError) as err:
        raise ValueError(f"not a stream position this version can read ({type(err).__name__}: {err})") from None


def _stream_lines(state: dict) -> list[str]:
    lines = [f"epoch {state['epoch']}, {state['batches']} micro-batches into it, {len(state['blocks'])} blocks of "
             f"{state['block_size']} tokens read but not trained on yet; {state['world']} process(es) x "
             f"{state['roles']} stream(s)"]  # fmt: skip
    for role, cur in enumerate(state["cursors"]):
        where = "not started" if cur is None else "read to the end of the epoch" if cur["done"] else (
            f"shard {cur['shard']} at byte/row {cur['offset']}, {cur['rows']} rows dealt, window {cur['window']}, "
            f"{len(cur['carry'])} tokens carried")  # fmt: skip
        lines.append(f"worker {role}: {where}")
    return lines


# file name -> summary lines; files not named here (random_states_*.pkl: pickles) are never opened
SUMMARIES = {
    MANIFEST: manifest_summary,
    PROGRESS: progress_summary,
    WEIGHTS: weights_summary,
    OPTIMIZER: optimizer_summary,
    SCHEDULER: scheduler_summary,
    "stream_state_*.json": stream_summary,  # a pattern: one per process
}


def summary_for(name: str):
    """The summary function for a checkpoint file name, or None (never opened)."""
    return next((f for pattern, f in SUMMARIES.items() if fnmatch.fnmatchcase(name, pattern)), None)


def summary_order(name: str) -> tuple[int, str]:
    """Files in the order of SUMMARIES (the manifest first), then by name."""
    patterns = list(SUMMARIES)
    return next((i for i, p in enumerate(patterns) if fnmatch.fnmatchcase(name, p)), len(patterns)), name


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_fmt(v) for v in value) + "]"
    return str(value)


def _pairs(mapping: dict) -> str:
    return ", ".join(f"{k}={_fmt(v)}" for k, v in mapping.items())
