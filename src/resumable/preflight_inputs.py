"""Pre-flight checks of a run's inputs: its data, its model and its tokenizer, loadable here (offline cache)."""

from __future__ import annotations

import functools
import json
import os
import socket
import threading
from pathlib import Path
from urllib.parse import urlparse

from resumable.config import TrainConfig, cache_root
from resumable.disk_space import Finding, human


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0][:200]


def hub_unreachable(*flags: str) -> str | None:
    """Why the Hugging Face hub cannot be used ("HF_HUB_OFFLINE is set", "huggingface.co is unreachable"), or None."""
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", *flags):
        if os.environ.get(var, "").strip().lower() in ("1", "true", "yes", "on"):
            return f"{var} is set"
    host = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co").hostname or "huggingface.co"
    return None if _reachable(host) else f"{host} is unreachable"


@functools.cache  # one probe per report, however many checks ask
def _reachable(host: str) -> bool:
    reached: list[bool] = []

    def probe() -> None:
        try:
            socket.create_connection((host, 443), timeout=3).close()
            reached.append(True)
        except OSError:
            pass

    thread = threading.Thread(target=probe, daemon=True)  # a DNS lookup ignores the socket timeout
    thread.start()
    thread.join(4)
    return bool(reached)


def _check_file(flag: str, path: Path, cfg: TrainConfig) -> Finding:
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            head = fh.read(1 << 20)
    except OSError as err:
        return Finding("FAIL", "data", f"--{flag} {path}: not readable ({err.strerror or err})")
    if not head.strip():
        return Finding("FAIL", "data", f"--{flag} {path}: no text in it")
    need = [cfg.text_column] + ([cfg.label_column] if cfg.task == "sequence_classification" else [])
    columns = None
    if path.suffix == ".csv":
        import csv

        columns = next(csv.reader([head.splitlines()[0]]), [])
    elif path.suffix == ".jsonl":
        try:
            first = json.loads(next(line for line in head.splitlines() if line.strip()))
            columns = list(first) if isinstance(first, dict) else []
        except json.JSONDecodeError:
            return Finding("FAIL", "data", f"--{flag} {path}: the first line is not JSON")
    missing = [c for c in need if columns is not None and c not in columns]
    if missing:
        return Finding("FAIL", "data", f"--{flag} {path}: no column {missing[0]!r} (columns: {', '.join(columns)})")
    return Finding("OK", "data", f"--{flag} {path}: readable, {human(path.stat().st_size)}")


def _dataset_cached(cfg: TrainConfig) -> bool:
    from huggingface_hub.constants import HF_HUB_CACHE

    name = cfg.dataset_name
    hub = Path(HF_HUB_CACHE) / f"datasets--{name.replace('/', '--')}"
    ours = cache_root(cfg) / "datasets"  # what data.py passes to load_dataset as cache_dir
    prepared = ours.is_dir() and any(ours.glob(f"{name.replace('/', '___')}*"))
    return Path(name).exists() or hub.is_dir() or prepared


def check_data(cfg: TrainConfig) -> list[Finding]:
    if cfg.train_file and cfg.streaming:  # a glob of shards, checked when the flags were parsed
        from resumable.stream import stream_files

        shards = stream_files(cfg.train_file)
        found = [Finding("OK", "data", f"--train_file {cfg.train_file}: {len(shards)} shard(s) to stream")]
        return found + [_check_file("validation_file", Path(cfg.validation_file), cfg)]
    if cfg.train_file:
        files = [("train_file", cfg.train_file)] + (
            [("validation_file", cfg.validation_file)] * bool(cfg.validation_file)
        )
        return [_check_file(flag, Path(p), cfg) for flag, p in files]
    if cfg.dataset_name:
        if _dataset_cached(cfg):
            return [Finding("OK", "data", f"--dataset_name {cfg.dataset_name}: in the local cache")]
        offline = hub_unreachable("HF_DATASETS_OFFLINE")
        if offline:
            return [Finding("FAIL", "data", f"--dataset_name {cfg.dataset_name}: not in the local cache and {offline}")]
        return [Finding("WARN", "data", f"--dataset_name {cfg.dataset_name}: not cached; the run downloads it")]
    from resumable.corpus import stdlib_root

    root = stdlib_root()
    modules = len(list(root.glob("*.py"))) if root.is_dir() else 0
    if not modules:
        return [Finding("FAIL", "data", f"embedded default: no Python standard library source at {root}")]
    return [Finding("OK", "data", f"embedded default: built from the stdlib source at {root} ({modules} modules)")]


def _weights_cached(name: str) -> bool:
    files = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
    if Path(name).is_dir():
        return any((Path(name) / f).is_file() for f in files)
    from huggingface_hub import try_to_load_from_cache

    return any(isinstance(try_to_load_from_cache(name, f), str) for f in files)


def _check_pretrained(what: str, name: str, load) -> Finding:
    """`what` (--model_name_or_path or --tokenizer_name) loads from a local folder or the offline cache."""
    try:
        load(name, local_files_only=True)
        if what == "--model_name_or_path" and not _weights_cached(name):
            raise OSError("config found but no weights file")
    except Exception as err:
        if Path(name).expanduser().exists() or name.startswith((".", "/", "~")):
            return Finding("FAIL", "model", f"{what} {name}: cannot be loaded ({_first_line(err)})")
        offline = hub_unreachable()
        if offline:
            return Finding("FAIL", "model", f"{what} {name}: not in the local cache and {offline}")
        return Finding("WARN", "model", f"{what} {name}: not in the local cache; the run downloads it")
    where = "local folder" if Path(name).is_dir() else "local cache"
    return Finding("OK", "model", f"{what} {name}: loads from the {where}")


def check_model(cfg: TrainConfig, parameters: tuple[int, int] | None = None) -> list[Finding]:
    from transformers import AutoConfig, AutoTokenizer

    findings = []
    if cfg.model_name_or_path:
        findings.append(_check_pretrained("--model_name_or_path", cfg.model_name_or_path, AutoConfig.from_pretrained))
    else:
        size = f" ({parameters[0]:,} parameters)" if parameters else ""
        findings.append(Finding("OK", "model", f"{cfg.model_type or 'tiny default'} from scratch{size}"))
    name = cfg.tokenizer_name or cfg.model_name_or_path
    if name:
        findings.append(_check_pretrained("--tokenizer_name" if cfg.tokenizer_name else "tokenizer of", name,
                                          AutoTokenizer.from_pretrained))  # fmt: skip
    else:
        findings.append(
            Finding("OK", "model", f"tokenizer: BPE trained on the training data ({cfg.vocab_size} tokens)")
        )
    return findings
